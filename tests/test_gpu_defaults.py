"""What a GPU run sets up, checked on the CPU: the collectives' timeouts, the cuDNN / TF32 /
memory-layout defaults, and that they leave stored values unchanged."""

import pytest
import torch

import tinydistill.dist as dist_mod


@pytest.fixture
def fake_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist_mod.dist, "new_group", lambda **kw: seen.setdefault("gloo", kw))
    monkeypatch.setattr(dist_mod.dist, "get_backend", lambda *a: seen["backend"])
    monkeypatch.setattr(dist_mod, "active", lambda: False)
    monkeypatch.setattr(dist_mod, "_cpu_group", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("TINYDISTILL_DIST_TIMEOUT_S", "TINYDISTILL_NCCL_TIMEOUT_MIN"):
        monkeypatch.delenv(v, raising=False)
    return seen


def test_nccl_gets_a_short_timeout_and_gloo_barriers_the_long_one(fake_group, monkeypatch):
    dist_mod.setup("cuda")
    assert fake_group["backend"] == "nccl"
    assert fake_group["timeout"].total_seconds() == dist_mod.NCCL_TIMEOUT_MIN * 60 <= 3600
    dist_mod._objects_group()  # barriers and objects: a gloo group with the long timeout
    assert fake_group["gloo"]["backend"] == "gloo" and fake_group["gloo"]["timeout"].total_seconds() == dist_mod.TIMEOUT_S
    monkeypatch.setenv("TINYDISTILL_NCCL_TIMEOUT_MIN", "5")
    dist_mod.setup("cuda")
    assert fake_group["timeout"].total_seconds() == 300
    dist_mod.setup("cpu")  # gloo alone: the long timeout for everything
    assert fake_group["backend"] == "gloo" and fake_group["timeout"].total_seconds() == dist_mod.TIMEOUT_S


@pytest.fixture
def flags():
    """torch's global GPU flags, off for the test and restored after it."""
    where = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    old = [getattr(m, k) for m, k in where]
    for m, k in where:
        setattr(m, k, False)
    yield
    for (m, k), v in zip(where, old):
        setattr(m, k, v)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(3)
    for i in range(64):
        d = root / f"c{i % 4}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return str(root)


def test_teacher_places_cnns_channels_last_with_tf32_and_no_benchmark(flags, tmp_path):
    from helpers import random_teacher
    from tinydistill.teachers import load_teacher

    cnn = load_teacher("test_resnet", random_teacher(tmp_path / "r.pth", 4), input_size=16).place("cpu")
    vit = load_teacher("test_vit", random_teacher(tmp_path / "v.pth", 4, name="test_vit"), input_size=160).place("cpu")
    assert cnn.channels_last and not vit.channels_last
    w = next(m.weight for m in cnn.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark  # stored values must replay to the bit (verify)


def test_channels_last_teacher_gives_the_same_store_on_the_cpu(jpegs, tmp_path, monkeypatch):
    """A CNN teacher's store is the same, value for value, with NHWC as with NCHW (on the CPU)."""
    import zarr

    from helpers import random_teacher
    import tinydistill.teachers as teachers
    from tinydistill.augment import AugSpec
    from tinydistill.generate import GenConfig, gen_logits

    w = random_teacher(tmp_path / "t.pth", 4)
    spec = AugSpec(img_size=16, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, mix_group=32)
    arrays = {}
    for layout in ("nhwc", "nchw"):
        if layout == "nchw":
            monkeypatch.setattr(teachers, "wants_channels_last", lambda m: False)
        out = tmp_path / f"{layout}.zarr"
        gen_logits(GenConfig(data=jpegs, teacher="test_resnet", teacher_weights=w, teacher_input_size=16, out=str(out),
                             k=3, epochs=(0, 2), workers=0, batch_size=32, spec=spec, progress=False))
        g = zarr.open_group(str(out), mode="r")
        arrays[layout] = {k: g[k][:] for k in ("logp", "index_gap", "seed")}
    for k, v in arrays["nhwc"].items():
        assert (v == arrays["nchw"][k]).all(), k


def test_training_sets_benchmark_and_feeds_a_cnn_student_nhwc(flags, jpegs, tmp_path, monkeypatch):
    import tinydistill.train as train

    seen = []
    real = train.create_student

    def student(*a, **kw):
        m = real(*a, **kw)
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        return m

    monkeypatch.setattr(train, "create_student", student)
    train.train_student(train.TrainConfig(data=jpegs, student="test_resnet", no_kd=True, out=str(tmp_path / "t"),
                                          epochs=1, batch_size=32, workers=0, input_size=16, progress=False))
    assert seen and all(seen) and torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
