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


@pytest.mark.slow
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
@pytest.mark.slow
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


# ---- resume, AMP, dropped rows, unlabeled data, host syncs (small stores: seconds each) -----------

def _in_process(*args):
    """train-student through the CLI in this process: (exit code, its `Error` lines, output)."""
    from click.testing import CliRunner

    from tinydistill.cli import main

    r = CliRunner().invoke(main, ["train-student", *args])
    return r.exit_code, [l for l in r.output.strip().splitlines() if l.startswith("Error")], r.output


class _Records(list):
    """A logging handler's records (the CLI may turn the logger's propagation off)."""

    def __enter__(self):
        import logging

        self.h = logging.Handler()
        self.h.emit = self.append
        logging.getLogger("tinydistill").addHandler(self.h)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("tinydistill").removeHandler(self.h)

    def text(self, level):
        return "\n".join(r.getMessage() for r in self if r.levelno == level)


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """96 JPEG-only webdataset samples in 2 tar shards (no `cls` member) and a 2-epoch K=5 store of
    a random 10-class teacher over them."""
    import io

    import webdataset as wds
    from PIL import Image

    from helpers import random_teacher
    from tinydistill.augment import AugSpec
    from tinydistill.config import GenConfig
    from tinydistill.generate import gen_logits

    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    for s in range(2):
        with wds.TarWriter(str(root / f"shard-{s:02d}.tar")) as tw:
            for i in range(48):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
                tw.write({"__key__": f"s{s}i{i:03d}", "jpg": buf.getvalue()})
    data = str(root / "shard-{00..01}.tar")
    weights = random_teacher(root / "t.pth", 10)
    store = str(root / "u.zarr")
    gen_logits(GenConfig(data=data, teacher="test_resnet", teacher_weights=weights, teacher_input_size=16,
                         out=store, k=5, epochs=(0, 2), workers=0, batch_size=32, chunk_rows=32, shard_rows=64,
                         spec=AugSpec(img_size=16, mix_group=32), progress=False))
    return data, store


def _small(unlabeled, out, **kw):
    from tinydistill.train import TrainConfig

    data, store = unlabeled
    args = dict(data=data, logits=store, student="test_vit", out=str(out), epochs=1, batch_size=16, workers=0,
                lr=5e-4, warmup_epochs=0.2, progress=False, model_kwargs={"img_size": 16, "patch_size": 4})
    return TrainConfig(**{**args, **kw})


def test_unlabeled_webdataset_distils_without_labels(unlabeled, tmp_path):
    from tinydistill.sources import open_source
    from tinydistill.train import train_student

    data, store = unlabeled
    assert (open_source(data).labels == -1).all()  # no cls member: label -1 for every row
    r = train_student(_small(unlabeled, tmp_path / "a"))  # alpha 1: pure distillation, no labels needed
    assert r["mode"] == "offline" and r["step"] == 6 and r["views"] == 96 and r["dropped_views"] == 0
    assert len(steps(tmp_path / "a")) == 6 and all(np.isfinite(s["loss"]) for s in steps(tmp_path / "a"))


@pytest.mark.parametrize("extra,needle", [
    (["--no-kd"], "`no_kd`"),
    (["--alpha", "0.5"], "--alpha 0.5"),
    (["--loss", "hard"], "--loss hard"),
    (["--val-data", "DATA"], "--val-data"),
])
def test_unlabeled_data_where_labels_are_needed_is_a_clear_error(unlabeled, tmp_path, extra, needle):
    data, store = unlabeled
    extra = [data if a == "DATA" else a for a in extra]
    args = ["--data", data, "--student", "test_vit", "--model-kwargs", "img_size=16", "--model-kwargs",
            "patch_size=4", "--epochs", "1", "--workers", "0", "--no-progress", "--out", str(tmp_path / "x"), *extra]
    if "--no-kd" not in extra:
        args += ["--logits", store]
    code, errors, output = _in_process(*args)
    needle = needle.replace("`no_kd`", "--no-kd")
    assert code == 1 and len(errors) == 1, output
    assert data in errors[0] and "has no labels" in errors[0] and needle in errors[0], errors[0]
    assert "Traceback" not in output and not (tmp_path / "x" / "steps.jsonl").exists()


def test_nan_targets_are_dropped_counted_and_warned(unlabeled, tmp_path):
    import logging
    import shutil

    import zarr

    from tinydistill.train import train_student

    data, store = unlabeled
    bad = tmp_path / "nan.zarr"
    shutil.copytree(store, bad)
    g = zarr.open_group(str(bad), mode="r+")
    index = "index_gap" if "index_gap" in g else "index"
    for rows in (slice(5, 12), 70):  # as gen-logits stores views it skipped (e.g. a teacher's fp16 overflow)
        g["logp"][0, rows], g[index][0, rows], g["seed"][0, rows] = np.nan, -1, 2**64 - 2
    with _Records() as records:
        r = train_student(_small(unlabeled, tmp_path / "o", logits=str(bad), epochs=2))
    assert (r["dropped_views"], r["nan_target_views"], r["unreadable_views"], r["views"]) == (0, 0, 0, 96)
    rows = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["dropped_views"], m["nan_target_views"], m["unreadable_views"], m["views"]) for m in rows] == [
        (8, 8, 0, 88), (0, 0, 0, 96)]
    warned = records.text(logging.WARNING)
    assert str(bad) in warned and "epoch 0: 8 views dropped" in warned and "8 with NaN targets" in warned, warned
    assert "epoch 1" not in warned
    assert all(np.isfinite(s["loss"]) for s in steps(tmp_path / "o"))


def test_losses_are_read_every_log_interval_steps_without_item(unlabeled, tmp_path, monkeypatch):
    from tinydistill.train import train_student

    item = torch.Tensor.item
    on_graph = []

    def spy(self):  # the old loop read every step's loss with loss.item() (a host sync on a GPU)
        if self.grad_fn is not None:
            on_graph.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", spy)
    seen = []
    train_student(_small(unlabeled, tmp_path / "a", epochs=2, log_interval=4), on_step=seen.append)
    lines = steps(tmp_path / "a")
    assert [s["step"] for s in lines] == list(range(1, 13)) and not on_graph
    assert [s["step"] for s in seen] == list(range(1, 13)) and all(s["views"] == 16 for s in seen)
    read = [s["step"] for s in seen if "loss" in s]
    assert read == [4, 6, 10, 12]  # every 4 steps and at each epoch's end (6 steps an epoch)
    assert all(s["loss"] == lines[s["step"] - 1]["loss"] for s in seen if "loss" in s)
    m = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert m[1]["train_loss"] == pytest.approx(np.mean([s["loss"] for s in lines[6:]]), rel=1e-9)


def test_non_finite_loss_stops_at_the_next_read_naming_its_step(unlabeled, tmp_path, monkeypatch):
    import tinydistill.train as train_mod

    calls = []

    class Bad(train_mod.Objective):
        def __call__(self, *a, **k):
            calls.append(1)
            loss = super().__call__(*a, **k)
            return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "Objective", Bad)
    with pytest.raises(train_mod.TrainError, match=r"^epoch 0 step 3: loss is nan; lower `lr`"):
        train_mod.train_student(_small(unlabeled, tmp_path / "a", log_interval=5))
    assert len(calls) == 5  # found at the read after step 5, not at step 3 (no sync per step)
    assert [s["step"] for s in steps(tmp_path / "a")] == [1, 2] and not (tmp_path / "a" / "last.pth").exists()


def test_rng_state_covers_every_generator_and_loads_weights_only(tmp_path, monkeypatch):
    import random

    from tinydistill import checkpoint

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    checkpoint.seed_rng(7)
    a0 = draws()
    checkpoint.seed_rng(7)
    assert draws() == a0
    checkpoint.seed_rng(8)  # seed + rank: another rank draws other masks
    assert all(x != y for x, y in zip(draws(), a0))
    state = checkpoint.rng_state("cpu")
    assert state["cuda"] is None and checkpoint.cuda_rng_device("cpu") is None  # CPU: no CUDA state
    torch.save({"rng": state}, tmp_path / "ck.pth")
    after = draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "ck.pth", weights_only=True)["rng"], "cpu")
    assert draws() == after


def test_cuda_rng_is_each_ranks_own_device(tmp_path, monkeypatch):
    """Issue 26.4: a rank saves its own device's CUDA generator and restores it onto the device it
    runs on after the resume, whatever the device index (not every device's state by index)."""
    from tinydistill import checkpoint

    assert checkpoint.cuda_rng_device("cuda:1") == torch.device("cuda", 1)
    states = {1: torch.tensor([1, 2], dtype=torch.uint8), 0: torch.tensor([3, 4], dtype=torch.uint8)}
    read, restored = [], {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: read.append(d) or states[d.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.__setitem__(d, s.tolist()))
    state = checkpoint.rng_state(torch.device("cuda:1"))  # rank 1 of a run on cuda:0 and cuda:1
    assert read == [torch.device("cuda", 1)] and state["cuda"].tolist() == [1, 2]
    torch.save({"rng": state}, tmp_path / "ck.pth")
    # resumed where that rank now runs on cuda:0 (another CUDA_VISIBLE_DEVICES or process count)
    checkpoint.set_rng_state(torch.load(tmp_path / "ck.pth", weights_only=True)["rng"], torch.device("cuda:0"))
    assert restored == {torch.device("cuda", 0): [1, 2]}
    restored.clear()  # an older checkpoint (every device's state, by index): the index's
    checkpoint.set_rng_state({**state, "cuda": [states[0], states[1]]}, "cuda:1")
    assert restored == {torch.device("cuda", 1): [1, 2]}


class _Stop(Exception):
    pass


def test_resume_with_drop_path_matches_uninterrupted_and_amp_is_compared(unlabeled, tmp_path):
    from tinydistill.train import train_student

    kw = dict(epochs=2, drop_path=0.2, ema=0.9, log_interval=4)
    train_student(_small(unlabeled, tmp_path / "full", **kw))

    def stop(info):
        if info["epoch"] == 1 and info["step"] == 8:
            raise _Stop

    with pytest.raises(_Stop):  # killed in epoch 1, after epoch 0's checkpoint
        train_student(_small(unlabeled, tmp_path / "part", **kw), on_step=stop)
    ck = torch.load(tmp_path / "part" / "last.pth", weights_only=True)
    assert ck["epoch"] == 0 and ck["amp"] == "none" and "cuda" in ck["rng"] and len(ck["rng_ranks"]) == 1
    code, errors, output = _in_process(  # another AMP: the scaler state would not fit
        "--data", unlabeled[0], "--logits", unlabeled[1], "--student", "test_vit", "--model-kwargs", "img_size=16",
        "--model-kwargs", "patch_size=4", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--no-progress",
        "--lr", "5e-4", "--warmup-epochs", "0.2", "--drop-path", "0.2", "--ema", "0.9", "--log-interval", "4",
        "--out", str(tmp_path / "part"), "--resume", "--amp", "fp16")
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert str(tmp_path / "part" / "last.pth") in errors[0] and "--amp none" in errors[0], errors[0]
    assert "--amp fp16" in errors[0] and "resume with --amp none" in errors[0], errors[0]
    train_student(_small(unlabeled, tmp_path / "part", resume=True, **kw))
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for n, t in a[key].items():
            assert torch.equal(t, b[key][n]), (key, n)
    assert steps(tmp_path / "full") == steps(tmp_path / "part")  # cut back to the checkpoint: line for line
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "part")


def _metrics(out):
    """metrics.jsonl's rows without their timings (seconds, load), which no two runs share."""
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in rows]


def test_objective_says_when_it_needs_labels():
    from tinydistill.losses import DistillLoss, Objective

    logits, logp = torch.randn(4, 10), torch.log_softmax(torch.randn(4, 3), 1)
    index = torch.arange(3).repeat(4, 1)
    pure = Objective(DistillLoss(10))
    assert not pure.needs_labels() and torch.isfinite(pure(logits, None, {"logp": logp, "index": index}))  # no labels built
    assert pure.needs_labels(two_heads=True) and Objective(None).needs_labels()
    for kd in (DistillLoss(10, alpha=0.5), DistillLoss(10, kind="hard")):
        assert Objective(kd).needs_labels()
        with pytest.raises(ValueError, match="needs labels"):
            Objective(kd)(logits, None, {"logp": logp, "index": index})


@pytest.mark.parametrize("loss", ["dist", "bce"])
def test_dist_and_bce_train_offline_and_equal_online_at_the_start(unlabeled, tmp_path, loss):
    """`--loss dist|bce` from the CLI trains to the end; the same run with the teacher online
    (K = 5 of the same random teacher, the store's views) gives the same first losses."""
    from tinydistill.train import train_student

    data, store = unlabeled
    off = tmp_path / "off"
    code, errors, output = _in_process("--data", data, "--logits", store, "--student", "test_vit", "--model-kwargs",
                                       "img_size=16", "--model-kwargs", "patch_size=4", "--epochs", "1",
                                       "--batch-size", "16", "--workers", "0", "--lr", "5e-4", "--warmup-epochs",
                                       "0.2", "--log-interval", "1", "--no-progress", "--loss", loss,
                                       "--out", str(off))
    assert code == 0 and not errors, output
    assert json.loads((off / "config.json").read_text())["loss"] == loss
    train_student(_small(unlabeled, tmp_path / "on", logits=None, online_teacher="test_resnet", k=5, like=store,
                         teacher_weights=str(Path(store).parent / "t.pth"), teacher_input_size=16, loss=loss,
                         log_interval=1))
    a, b = [np.array([s["loss"] for s in steps(d)]) for d in (off, tmp_path / "on")]
    assert len(a) == len(b) == 6 and np.isfinite(a).all()
    # fp16 storage of log-probs is the only difference; DIST's correlations of this random teacher's
    # nearly flat outputs magnify it, and the students drift apart a little each step
    np.testing.assert_allclose(a[0], b[0], rtol=1e-3)
    np.testing.assert_allclose(a[:3], b[:3], rtol=1e-2)
    soft = train_student(_small(unlabeled, tmp_path / "soft", log_interval=1)) and steps(tmp_path / "soft")
    assert abs(soft[0]["loss"] - a[0]) > 1e-3  # another loss than soft_ce was computed
