import json

import pytest
import timm
import torch

from tinydistill.teachers import ALIASES, TeacherError, load_teacher, resolve_name


def test_names_and_aliases():
    assert resolve_name("clip-vit-l14") == ("timm", "vit_large_patch14_clip_224.openai_ft_in12k_in1k")
    assert resolve_name("clip-vit-l14-in12k") == ("timm", "vit_large_patch14_clip_224.openai_ft_in12k")
    assert resolve_name("timm:resnet18") == ("timm", "resnet18") == resolve_name("resnet18")
    assert resolve_name("open_clip:ViT-B-32/openai") == ("open_clip", "ViT-B-32/openai")
    for name in ALIASES.values():
        assert timm.is_model(name.split(".")[0]) and name in timm.list_pretrained(name.split(".")[0] + "*")


def test_local_weights_set_the_head(tmp_path):
    from safetensors.torch import save_file

    m = timm.create_model("test_resnet", pretrained=False, num_classes=37)
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model": m.state_dict(), "epoch": 3}, tmp_path / "ck.pth")
    for f in ("w.safetensors", "ck.pth"):
        t = load_teacher("timm:test_resnet", str(tmp_path / f))
        assert t.num_classes == 37 and t.weights_digest.startswith("sha256:") and not t.model.training
        torch.testing.assert_close(t.model.fc.weight, m.fc.weight)
    with pytest.raises(TeacherError, match="not found"):
        load_teacher("test_resnet", str(tmp_path / "missing.pth"))
    torch.save(timm.create_model("test_vit", num_classes=5).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(TeacherError, match="not a test_resnet classifier|does not fit"):
        load_teacher("test_resnet", str(tmp_path / "vit.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(TeacherError, match="cannot load"):
        load_teacher("test_resnet", str(tmp_path / "junk.pth"))


def test_open_clip_zero_shot_from_class_names(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "td-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "td-tiny-clip.json")
    names = ["zero", "one", "two", "three"]
    torch.manual_seed(0)  # random init: the same weights for both loads below
    t = load_teacher("open_clip:td-tiny-clip", class_names=names)
    assert t.num_classes == 4 and t.input_size == 32 and t.meta["templates"]
    with torch.inference_mode():
        out = t.model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    # the classifier is the class names' text embeddings: another name list gives another head
    torch.manual_seed(0)
    t2 = load_teacher("open_clip:td-tiny-clip", class_names=["cat", "dog", "two", "three"])
    assert not torch.allclose(t.model.text[:2], t2.model.text[:2]) and torch.allclose(t.model.text[2:], t2.model.text[2:])
    with pytest.raises(TeacherError, match="class names"):
        load_teacher("open_clip:td-tiny-clip", class_names=[])
