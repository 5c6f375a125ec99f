import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch


VIEW = ["--img-size", "32", "--mix-group", "64", "--mixup", "0.8", "--cutmix", "1.0"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinydistill", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def peaky_teacher(tmp_path_factory):
    """A random test_resnet with a scaled-up head, so its outputs are peaky, not uniform."""
    torch.manual_seed(1)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    with torch.no_grad():
        m.fc.weight.mul_(40)
    path = tmp_path_factory.mktemp("t") / "peaky.pth"
    torch.save(m.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def store(peaky_teacher, tmp_path_factory):
    """K = C = 10, 2 epochs, chunks of 128 rows."""
    out = tmp_path_factory.mktemp("s") / "full.zarr"
    p = cli("gen-logits", "--data", "digits", "--teacher", "test_resnet", "--teacher-weights", peaky_teacher,
            "--teacher-input-size", "32", "--k", "10", "--epochs", "2", "--chunk-rows", "128", "--shard-rows", "256",
            "--workers", "2", "--no-progress", "--out", str(out), *VIEW)
    assert p.returncode == 0, p.stderr
    return str(out)


def steps(out):
    return [json.loads(l) for l in (Path(out) / "steps.jsonl").read_text().splitlines()]


TRAIN = ["--data", "digits", "--student", "test_vit", "--batch-size", "48", "--lr", "5e-4", "--no-progress",
         "--warmup-epochs", "0.2"]


@pytest.mark.slow
def test_offline_equals_online_with_k_equal_c(store, peaky_teacher, tmp_path):
    off = tmp_path / "off"
    p = cli("train-student", *TRAIN, "--logits", store, "--epochs", "1", "--workers", "0", "--out", str(off))
    assert p.returncode == 0, p.stderr
    on = tmp_path / "on"
    p = cli("train-student", *TRAIN, "--online-teacher", "test_resnet", "--teacher-weights", peaky_teacher,
            "--teacher-input-size", "32", "--like", store, "--epochs", "1", "--workers", "0",
            "--out", str(on))
    assert p.returncode == 0, p.stderr
    a, b = steps(off)[:8], steps(on)[:8]
    assert len(a) == len(b) == 8
    la, lb = np.array([s["loss"] for s in a]), np.array([s["loss"] for s in b])
    assert np.ptp(la) > 0.05  # real, varying targets, not a constant
    np.testing.assert_allclose(la, lb, rtol=2e-3)  # fp16 storage of log-probs is the only difference
    assert not np.array_equal(la, lb)  # ... and it is there: the offline run read the store


def test_offline_builds_and_calls_no_teacher(store, tmp_path, monkeypatch):
    import tinydistill.teachers as teachers
    from tinydistill.train import TrainConfig, train_student

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built during offline training")

    monkeypatch.setattr(teachers, "load_teacher", no_teacher)
    built = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, *a, **k: built.append(name) or real(name, *a, **k))
    forward_calls = []
    import torch.nn as nn
    real_call = nn.Module.__call__

    def spy(self, *a, **k):
        if type(self).__name__ == "ResNet":  # the teacher's class
            forward_calls.append(1)
        return real_call(self, *a, **k)

    monkeypatch.setattr(nn.Module, "__call__", spy)
    r = train_student(TrainConfig(data="digits", student="test_vit", out=str(tmp_path / "o"), logits=store, epochs=1,
                                  batch_size=64, workers=0, progress=False))
    assert r["mode"] == "offline" and r["step"] > 0
    assert built == ["test_vit"] and not forward_calls


@pytest.mark.slow
def test_resume_matches_uninterrupted(store, tmp_path):
    args = ["train-student", *TRAIN, "--logits", store, "--epochs", "2", "--workers", "1", "--ema", "0.99",
            "--val-data", "digits:val", "--val-crop-pct", "1.0"]
    full = tmp_path / "full"
    p = cli(*args, "--out", str(full))
    assert p.returncode == 0, p.stderr
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "tinydistill", *args, "--out", str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (part / "last.pth").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # during epoch 1 (or just after epoch 0's checkpoint)
    proc.wait()
    assert torch.load(part / "last.pth", weights_only=False)["epoch"] == 0
    p = cli(*args, "--out", str(part), "--resume")
    assert p.returncode == 0, p.stderr
    a = torch.load(full / "last.pth", weights_only=False)
    b = torch.load(part / "last.pth", weights_only=False)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 1
    for key in ("model", "ema"):
        for n, t in a[key].items():
            assert torch.equal(t, b[key][n]), (key, n)
    ma = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert ma[-1]["val_top1"] == mb[-1]["val_top1"] and "ema_val_top5" in ma[-1]


@pytest.mark.parametrize("extra,needle", [
    (["--data", "digits:val"], "not the data the store was made from"),
    (["--epochs", "3"], "--cycle-epochs"),
    (["--num-classes", "12"], "--num-classes 12"),
    (["--hflip", "0.1"], "a store replays its own views"),
    (["--student", "no_such_net"], "no_such_net: unknown student"),
])
def test_mismatch_is_a_clear_error_before_training(store, tmp_path, extra, needle):
    from click.testing import CliRunner

    from tinydistill.cli import main

    args = ["train-student", *TRAIN, "--logits", store, "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "x")]
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    r = CliRunner().invoke(main, args)  # in process: the error path is the CLI's, no interpreter start-up
    lines = [l for l in r.output.strip().splitlines() if l.startswith("Error")]
    assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "x" / "steps.jsonl").exists()


@pytest.mark.slow
def test_incomplete_store_and_cycle_epochs(store, tmp_path):
    import shutil
    part = tmp_path / "part.zarr"
    shutil.copytree(store, part)
    (part / "complete" / "c" / "1" / "2").unlink()
    p = cli("train-student", *TRAIN, "--logits", str(part), "--epochs", "2", "--workers", "0", "--out", str(tmp_path / "y"))
    assert p.returncode == 1 and "epoch 1 is" in p.stderr
    p = cli("train-student", *TRAIN, "--logits", store, "--epochs", "3", "--cycle-epochs", "--workers", "0",
            "--lr", "1e-4", "--out", str(tmp_path / "z"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["epoch"] == 2


@pytest.mark.slow
def test_baselines_and_distilled_student(store, tmp_path):
    p = cli("train-student", *TRAIN, "--no-kd", "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "nokd"), *VIEW)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["mode"] == "no_kd"
    args = [a if a != "test_vit" else "deit_tiny_distilled_patch16_224" for a in TRAIN]
    p = cli("train-student", *args, "--logits", store, "--epochs", "1", "--workers", "0", "--loss", "hard",
            "--val-data", "digits:val", "--val-crop-pct", "1.0", "--out", str(tmp_path / "deit"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["step"] > 0 and 0 <= r["val_top1"] <= 100


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train(store, tmp_path):
    out = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                        "-m", "tinydistill", "train-student", *TRAIN, "--logits", store, "--epochs", "1",
                        "--workers", "0", "--out", str(out), "--val-data", "digits:val", "--val-crop-pct", "1.0"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["step"] > 0 and r["views"] > 1000 and "val_top1" in r
    assert (out / "last.pth").exists()
