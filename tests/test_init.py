"""A student that starts from weights (issue 25 item 2): ``--init PATH`` (a train-student
checkpoint, a timm checkpoint, a safetensors state dict) and ``--pretrained`` (timm's weights
from the local cache only). Small ViTs on 16-px views: seconds each."""
import logging

import pytest
import timm
import torch

from test_train import _in_process, _Records, _small, steps, unlabeled  # noqa: F401  (the fixture)

VIT = {"img_size": 16, "patch_size": 4}


@pytest.fixture(autouse=True)
def _info_logged():
    """The one-line reports are INFO records (the CLI shows INFO)."""
    logger = logging.getLogger("tinydistill")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def _student(init=None, pretrained=False, num_classes=10, seed=0, **kw):
    from tinydistill.config import TrainConfig
    from tinydistill.train import create_student

    cfg = TrainConfig(data="x", student="test_vit", out="x", model_kwargs=VIT, init=init, pretrained=pretrained, **kw)
    torch.manual_seed(seed)
    return create_student(cfg, num_classes, 16)


def _vit_state(num_classes, seed=3):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=num_classes, **VIT).state_dict()


def _same(a: dict, b: dict, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def trained(unlabeled, tmp_path_factory):
    """A train-student run (6 steps, with an EMA): its last.pth."""
    from tinydistill.train import train_student

    out = tmp_path_factory.mktemp("init") / "run"
    train_student(_small(unlabeled, out, ema=0.5))
    return out / "last.pth"


def test_init_from_a_train_student_checkpoint_takes_its_best_weights(trained, tmp_path):
    ck = torch.load(trained, weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in ck["ema"].items()}  # ModelEmaV3 keeps its copy as `module`
    assert not torch.equal(ck["model"]["head.weight"], ema["head.weight"])
    with _Records() as records:
        m = _student(init=str(trained))
    _same(m.state_dict(), ck["model"])  # no validation: the trained model is its best
    assert "classifier head kept (10 classes)" in records.text(logging.INFO), records.text(logging.INFO)
    # a checkpoint whose EMA scored higher than the model: the EMA's weights
    ck["metrics"] = {**(ck["metrics"] or {}), "val_top1": 50.0, "ema_val_top1": 60.0}
    torch.save(ck, tmp_path / "best.pth")
    with _Records() as records:
        _same(_student(init=str(tmp_path / "best.pth")).state_dict(), ema)
    assert "its EMA weights" in records.text(logging.INFO)


def test_init_from_timm_and_safetensors_keeps_or_reinitialises_the_classifier(tmp_path):
    from safetensors.torch import save_file

    fresh = _student(num_classes=5).state_dict()  # the seeded random init of a 5-class student
    sd10 = _vit_state(10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd10.items()}, "epoch": 3}, tmp_path / "timm.pth")
    save_file(sd10, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "timm.pth", tmp_path / "w.safetensors"):
        _same(_student(init=str(path)).state_dict(), sd10)  # the head fits: kept
        with _Records() as records:
            m = _student(init=str(path), num_classes=5).state_dict()
        _same(m, sd10, skip={"head.weight", "head.bias"})
        assert torch.equal(m["head.weight"], fresh["head.weight"]) and m["head.weight"].shape == (5, 64)
        lines = records.text(logging.INFO)
        assert "classifier head dropped (10 classes, the student has 5) and re-initialised" in lines, lines


@pytest.mark.parametrize("make,needle", [
    (None, "--init weights file not found"),
    (lambda p: p.write_bytes(b"not a checkpoint"), "cannot read --init weights"),
    (lambda p: torch.save({"a": [1, 2]}, p), "not a state dict of tensors"),
    (lambda p: torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), p),
     "does not fit the student test_vit: "),
])
def test_bad_init_is_one_line_naming_the_file(unlabeled, tmp_path, make, needle):
    path = tmp_path / "w.pth"
    if make:
        make(path)
    data, store = unlabeled
    code, errors, output = _in_process("--data", data, "--logits", store, "--student", "test_vit", "--model-kwargs",
                                       "img_size=16", "--model-kwargs", "patch_size=4", "--epochs", "1",
                                       "--workers", "0", "--no-progress", "--init", str(path),
                                       "--out", str(tmp_path / "o"))
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert str(path) in errors[0] and needle in errors[0], errors[0]
    if "does not fit" in needle:  # counted: every ViT key missing, every ResNet key unexpected
        assert "missing" in errors[0] and "unexpected" in errors[0]
    assert not (tmp_path / "o" / "steps.jsonl").exists()


def test_init_and_pretrained_run_from_the_cli_and_resume_compares_them(unlabeled, trained, tmp_path):
    from tinydistill.checkpoint import RUN_ONLY

    assert "init" not in RUN_ONLY and "pretrained" not in RUN_ONLY
    data, store = unlabeled
    args = ["--data", data, "--logits", store, "--student", "test_vit", "--model-kwargs", "img_size=16",
            "--model-kwargs", "patch_size=4", "--epochs", "1", "--batch-size", "16", "--workers", "0",
            "--no-progress", "--out", str(tmp_path / "o")]
    code, errors, output = _in_process(*args, "--init", str(trained))
    assert code == 0, output
    assert len(steps(tmp_path / "o")) == 6
    code, errors, output = _in_process(*args, "--resume")
    assert code == 1 and len(errors) == 1 and "trained with --init" in errors[0], output
    code, errors, output = _in_process(*args, "--resume", "--init", str(trained), "--pretrained")
    assert code == 1 and len(errors) == 1 and "--pretrained" in errors[0], output


def _fake_hub(root, sd):
    """timm's pretrained file for test_vit where huggingface_hub's cache keeps it."""
    from safetensors.torch import save_file

    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg("test_vit").hf_hub_id  # timm/test_vit.r160_in1k
    d = root / "hub" / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    (d / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(sd, str(d / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_pretrained_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tinydistill.errors import TrainError

    with pytest.raises(TrainError) as e:  # nothing cached: refused, nothing fetched
        _student(pretrained=True)
    assert "\n" not in str(e.value) and "test_vit.r160_in1k" in str(e.value) and "not in the local cache" in str(e.value)
    sd = _vit_state(1000)  # timm's test_vit is an ImageNet-1k model
    _fake_hub(tmp_path, sd)
    with _Records() as records:
        m = _student(pretrained=True, num_classes=10).state_dict()
    _same(m, sd, skip={"head.weight", "head.bias"})
    assert m["head.weight"].shape == (10, 64)
    assert "classifier dropped (1000 classes, the student has 10)" in records.text(logging.INFO)
    _same(_student(pretrained=True, num_classes=1000).state_dict(), sd)
    with pytest.raises(TrainError, match="`init` and `pretrained` exclude each other"):
        _student(pretrained=True, init=str(tmp_path / "x.pth"))
