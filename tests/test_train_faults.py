"""train-student under faults (issue 27): a run folder is never trained over by accident, a
resume is refused when an option that changes the result differs, validation classes are
matched by name, and after kill -9 (in or after a checkpoint write), a full disk, SIGTERM or
SIGINT the resumed run's weights and logs equal an uninterrupted run's, line for line. Small
store (96 rows, 6 steps an epoch): seconds per case. Faults are injected where they would land
(the save, a step), and signals are real ones sent by the process to itself: nothing is timed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import _in_process, _metrics, _small, steps, unlabeled  # noqa: F401  (the fixture)

KW = dict(epochs=2, drop_path=0.2, ema=0.9, log_interval=4)


def _args(unlabeled, out, *extra):
    """The CLI form of ``_small(unlabeled, out, **KW)``."""
    data, store = unlabeled
    return ["--data", data, "--logits", store, "--student", "test_vit", "--model-kwargs", "img_size=16",
            "--model-kwargs", "patch_size=4", "--epochs", "2", "--batch-size", "16", "--workers", "0",
            "--no-progress", "--lr", "5e-4", "--warmup-epochs", "0.2", "--drop-path", "0.2", "--ema", "0.9",
            "--log-interval", "4", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def full(unlabeled, tmp_path_factory):
    """The uninterrupted run every fault is compared with."""
    from tinydistill.train import train_student

    out = tmp_path_factory.mktemp("full") / "run"
    train_student(_small(unlabeled, out, **KW))
    return out


def _same_as_full(full, out):
    a = torch.load(full / "last.pth", weights_only=True)
    b = torch.load(out / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 12 and b["partial"] is None
    for key in ("model", "ema"):
        for n, t in a[key].items():
            assert torch.equal(t, b[key][n]), (key, n)
    assert steps(full) == steps(out)  # line for line: no step twice, none missing
    assert _metrics(full) == _metrics(out)  # one row per epoch, the same values
    assert not (out / "last.tmp").exists()


# ---- a folder that holds a run ------------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(unlabeled, full, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(full, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, errors, output = _in_process(*_args(unlabeled, out))
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert str(out) in errors[0] and "--resume" in errors[0] and "--overwrite" in errors[0], errors[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    code, errors, output = _in_process(*_args(unlabeled, out, "--resume", "--overwrite"))
    assert code == 1 and "--resume and --overwrite exclude each other" in errors[0], output
    (out / "notes.txt").write_text("mine")
    code, errors, output = _in_process(*_args(unlabeled, out, "--overwrite", "--epochs", "1"))
    assert code == 0, output
    assert len(steps(out)) == 6 and len(_metrics(out)) == 1  # a fresh run's logs, not appended to the old
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 0
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are cleared


def test_logs_without_a_checkpoint_are_replaced_by_a_fresh_run(unlabeled, full, tmp_path):
    """A run stopped before its first checkpoint kept nothing to resume: the next run starts afresh."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "steps.jsonl").write_text('{"epoch": 0, "step": 1, "loss": 9.0, "lr": 0.1}\n')
    code, errors, output = _in_process(*_args(unlabeled, out))
    assert code == 0, output
    assert steps(out) == steps(full)


# ---- resume compares what changes the result -------------------------------------------------------

@pytest.fixture(scope="module")
def epoch0(unlabeled, tmp_path_factory):
    """A run stopped after epoch 0's checkpoint (the first of two epochs)."""
    from tinydistill.train import train_student

    out = tmp_path_factory.mktemp("e0") / "run"
    with pytest.raises(_Kill):
        train_student(_small(unlabeled, out, **KW), on_step=_raise_at(7))
    return out


class _Kill(Exception):
    pass


def _raise_at(step, exc=_Kill):
    def on_step(info):
        if info["step"] == step:
            raise exc

    return on_step


@pytest.mark.parametrize("extra,name,old,new", [
    (["--lr", "1e-3"], "--lr", "0.0005", "0.001"),
    (["--batch-size", "32"], "--batch-size", "16", "32"),
    (["--loss", "kl"], "--loss", "soft_ce", "kl"),
    (["--seed", "1"], "--seed", "0", "1"),
    (["--drop-path", "0.1"], "--drop-path", "0.2", "0.1"),
    (["--ema", "0.5"], "--ema", "0.9", "0.5"),
    (["--logits", "OTHER"], "--logits", "STORE", "OTHER"),
    (["--model-kwargs", "depth=1"], "--model-kwargs", '{"img_size": 16, "patch_size": 4}', '"depth": 1'),
])
def test_resume_refuses_a_changed_result_option_naming_it(unlabeled, epoch0, tmp_path, extra, name, old, new):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(epoch0, out)
    config = (out / "config.json").read_bytes()
    other = tmp_path / "other.zarr"
    extra = [str(other) if a == "OTHER" else a for a in extra]
    args = _args(unlabeled, out, "--resume")
    for i in range(0, len(extra), 2):  # replace the option's value (or add it)
        if extra[i] in args and extra[i] != "--model-kwargs":
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    code, errors, output = _in_process(*args)
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    old, new = old.replace("STORE", unlabeled[1]), new.replace("OTHER", str(other))
    msg = errors[0]
    assert f"trained with {name} {old}" in msg and new in msg and f"resume with {name} {old}" in msg, msg
    assert (out / "config.json").read_bytes() == config and steps(out) == steps(epoch0)


def test_resume_may_change_how_it_runs_and_keeps_config_json(unlabeled, epoch0, full, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(epoch0, out)
    config = (out / "config.json").read_bytes()
    args = _args(unlabeled, out, "--resume")
    args[args.index("--workers") + 1] = "1"
    args[args.index("--log-interval") + 1] = "5"
    code, errors, output = _in_process(*args, "--progress")
    assert code == 0, output
    assert (out / "config.json").read_bytes() == config
    _same_as_full(full, out)


def test_run_only_options_are_listed_and_every_other_option_is_compared():
    import dataclasses

    from tinydistill.checkpoint import RUN_ONLY
    from tinydistill.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert RUN_ONLY <= names
    assert RUN_ONLY == {"out", "resume", "overwrite", "workers", "progress", "log_interval", "device", "cycle_epochs",
                        "allow_renderer_change", "num_classes", "expect_spec", "decode"}


# ---- faults, then resume: the same weights and logs as an uninterrupted run ------------------------

CHILD = r"""
import os, signal, sys
import torch
from tinydistill import checkpoint
real = checkpoint.save
fault = sys.argv[1]

def save(path, obj):
    if path.name == "last.pth" and obj["epoch"] == 1 and fault == "kill-during-save":
        torch.save(obj, path.with_suffix(".tmp"))
        with open(path.with_suffix(".tmp"), "r+b") as f:
            f.truncate(os.path.getsize(path.with_suffix(".tmp")) // 2)  # a write cut half way
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, obj)

checkpoint.save = save
from tinydistill.cli import main
main(sys.argv[2:])
"""


def test_kill_9_during_a_checkpoint_write_then_resume_equals_uninterrupted(unlabeled, full, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", CHILD, "kill-during-save", "train-student", *_args(unlabeled, out)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["epoch"] == 0 and ck["step"] == 6
    assert (out / "last.tmp").exists()  # what kill -9 leaves; the resumed run replaces it
    assert len(_metrics(out)) == 1 and len(steps(out)) == 12  # epoch 1's steps were logged, not checkpointed
    code, errors, output = _in_process(*_args(unlabeled, out, "--resume"))
    assert code == 0, output
    _same_as_full(full, out)


def test_stop_between_a_checkpoint_and_its_metrics_row_then_resume_equals_uninterrupted(unlabeled, full, tmp_path,
                                                                                         monkeypatch):
    """The process ends right after epoch 0's checkpoint, before its row (the files kill -9 would
    leave: the logs are flushed before every checkpoint): the resume writes the row it kept."""
    from tinydistill import checkpoint

    real = checkpoint.save

    def save(path, obj):
        real(path, obj)
        if path.name == "last.pth" and obj["epoch"] == 0:
            raise _Kill

    monkeypatch.setattr(checkpoint, "save", save)
    out = tmp_path / "run"
    with pytest.raises(_Kill):
        from tinydistill.train import train_student

        train_student(_small(unlabeled, out, **KW))
    assert _metrics(out) == [] and torch.load(out / "last.pth", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(checkpoint, "save", real)
    code, errors, output = _in_process(*_args(unlabeled, out, "--resume"))
    assert code == 0, output
    _same_as_full(full, out)


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(unlabeled, full, tmp_path, monkeypatch):
    from tinydistill import checkpoint

    real = torch.save

    def full_disk(obj, f):
        if obj["epoch"] == 1:  # epoch 1's checkpoint: the disk is full
            Path(f).write_bytes(b"PK\x03\x04 partial")
            return real(obj, "/dev/full")  # torch's own error for a write that fails with ENOSPC
        return real(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    code, errors, output = _in_process(*_args(unlabeled, out))
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert str(out / "last.pth") in errors[0] and "cannot save the checkpoint" in errors[0], errors[0]
    assert "previous checkpoint is kept" in errors[0], errors[0]
    assert not (out / "last.tmp").exists() and torch.load(out / "last.pth", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(checkpoint.torch, "save", real)
    code, errors, output = _in_process(*_args(unlabeled, out, "--resume"))
    assert code == 0, output
    _same_as_full(full, out)


@pytest.mark.parametrize("signum,at", [(signal.SIGTERM, 8), (signal.SIGINT, 3), (signal.SIGTERM, 6)])
def test_signal_saves_at_the_step_and_resume_equals_uninterrupted(unlabeled, full, tmp_path, monkeypatch,
                                                                    signum, at):
    """SIGTERM (preemption) or Ctrl-C: a checkpoint at the step the signal lands in (8: mid
    epoch 1; 3: mid epoch 0, before any checkpoint; 6: epoch 0's last step), then one line and
    128 + the signal's number; resumed mid-epoch, the run goes on to the same losses."""
    import tinydistill.train as train_mod

    real = train_mod._step

    def step(run, batch):
        out = real(run, batch)
        if run.step == at:
            os.kill(os.getpid(), signum)  # a real signal, through the CLI's handler
        return out

    monkeypatch.setattr(train_mod, "_step", step)
    out = tmp_path / "run"
    code, errors, output = _in_process(*_args(unlabeled, out))
    name = signal.Signals(signum).name
    assert code == 128 + signum and len(errors) == 1 and "Traceback" not in output, output
    assert f"stopped by {name}" in errors[0] and "kept last.pth" in errors[0] and "--resume" in errors[0], errors[0]
    assert "shards" not in errors[0]  # not gen-logits' message
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["step"] == at and [s["step"] for s in steps(out)] == list(range(1, at + 1))
    assert (ck["partial"] is None) == (at == 6)  # epoch 0 ended at step 6: an epoch's checkpoint
    monkeypatch.setattr(train_mod, "_step", real)
    code, errors, output = _in_process(*_args(unlabeled, out, "--resume"))
    assert code == 0, output
    _same_as_full(full, out)


def test_second_ctrl_c_ends_at_once_naming_what_was_kept(unlabeled, epoch0, tmp_path):
    import shutil

    from tinydistill.errors import Stopped
    from tinydistill.train import train_student

    out = tmp_path / "run"
    shutil.copytree(epoch0, out)
    with pytest.raises(Stopped) as e:
        train_student(_small(unlabeled, out, resume=True, **KW), on_step=_raise_at(9, KeyboardInterrupt))
    assert e.value.signum == signal.SIGINT and "\n" not in str(e.value)
    assert "kept last.pth (end of epoch 0, step 6)" in str(e.value) and "`resume`" in str(e.value), str(e.value)


def test_a_mid_epoch_checkpoint_resumes_only_with_its_world_size(unlabeled, tmp_path, monkeypatch):
    from tinydistill import dist
    from tinydistill.errors import Stopped, TrainError
    from tinydistill.signals import StopRequest
    from tinydistill.train import train_student

    stop = StopRequest()
    with pytest.raises(Stopped, match="stopped by SIGTERM at epoch 0 step 3"):
        train_student(_small(unlabeled, tmp_path / "a", **KW), stop=stop,
                      on_step=lambda info: info["step"] == 2 and stop.set(signal.SIGTERM))
    setup = dist.setup
    monkeypatch.setattr(dist, "setup", lambda device, workers=0: (0, 2, setup(device, workers)[2]))
    with pytest.raises(TrainError, match=r"saved during epoch 0 by 1 rank\(s\); resume it with 1 \(this run has 2\)"):
        train_student(_small(unlabeled, tmp_path / "a", resume=True, **KW))


def test_stop_on_signals_sets_the_request_and_a_second_ctrl_c_interrupts():
    from tinydistill.signals import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# ---- validation data with other classes ------------------------------------------------------------

def _folder(root, classes, per=3):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(root / c / f"{i}.png")
    return str(root)


def test_val_data_classes_are_matched_by_name_or_refused(tmp_path):
    from tinydistill.errors import TrainError
    from tinydistill.sources import open_source
    from tinydistill.train import val_labels

    head = [str(c) for c in range(10)]  # the store's classes, e.g. digits 0..9
    val = open_source(_folder(tmp_path / "v", ["3", "7"]))  # two of them: ids 0, 1 in the folder
    assert sorted(val.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert val_labels(val, head, "the store").tolist() == [{0: 3, 1: 7}[l] for l in val.labels.tolist()]
    same = open_source(_folder(tmp_path / "s", ["0", "1"]))
    assert val_labels(same, head, "the store").tolist() == same.labels.tolist()
    other = open_source(_folder(tmp_path / "o", ["3", "cat", "dog"]))
    with pytest.raises(TrainError) as e:
        val_labels(other, head, "the store S")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "o") in msg and "'cat', 'dog'" in msg and "10 classes of the store S" in msg


def test_val_data_with_other_classes_is_refused_before_training(unlabeled, tmp_path):
    val = _folder(tmp_path / "v", ["3", "cat"])
    code, errors, output = _in_process(*_args(unlabeled, tmp_path / "run", "--val-data", val))
    assert code == 1 and len(errors) == 1 and "'cat'" in errors[0] and "Traceback" not in output, output
    assert not (tmp_path / "run" / "steps.jsonl").exists()


# ---- a BatchNorm student and batches of one view ----------------------------------------------------

def test_epoch_batches_give_every_rank_two_views_and_the_same_steps():
    """Under BatchNorm (min_rows 2) no batch of any rank holds one view, every rank takes the
    same steps, and every row of a share is trained on (a one-view rest merges into the batch
    before it); the cut depends only on N, batch size and world size."""
    from tinydistill.stream import epoch_order, epoch_steps, train_items

    for n, b in ((96, 19), (97, 16), (100, 16), (33, 16), (4096 * 2 + 1, 64)):
        for world in (1, 2, 3):
            for min_rows in (1, 2):
                steps = epoch_steps(n, b, world, min_rows)
                per_rank = []
                for r in range(world):
                    order = epoch_order(n, 8, True, 5, 0, 1, 0, 4096, world, r)
                    items = train_items(order, 0, b, steps, min_rows)
                    assert sum(len(it.rows) for it in items) == len(order)  # nothing left out
                    per_rank.append([len(it.rows) for it in items])
                assert all(len(p) == steps for p in per_rank)  # every rank takes every step
                assert min(min(p) for p in per_rank) >= min_rows  # never one view under BatchNorm
    order = epoch_order(96, 8, True, 5, 0, 1, 0)
    assert [len(it.rows) for it in train_items(order, 0, 19, epoch_steps(96, 19, 1, 2), 2)] == [19] * 4 + [10, 10]
    assert [len(it.rows) for it in train_items(order, 0, 19, epoch_steps(96, 19, 1, 1), 1)] == [19] * 5 + [1]


def _resnet(unlabeled, out, **kw):
    return _small(unlabeled, out, student="test_resnet", model_kwargs={}, **kw)


def test_batchnorm_student_with_one_view_left_over_trains(unlabeled, tmp_path):
    from tinydistill.train import train_student

    r = train_student(_resnet(unlabeled, tmp_path / "a", batch_size=19))  # 96 = 5 x 19 + 1: 4 x 19 + 2 x 10
    assert r["step"] == 6 and r["views"] == 96


def test_batchnorm_student_with_a_batch_shrunk_to_one_view(unlabeled, tmp_path, monkeypatch):
    """Dropped views (NaN targets, unreadable images) leave one view in a batch: it is left out
    (counted in lone_views) with no step in one process, and with an empty step under DDP."""
    import tinydistill.train as train_mod
    from tinydistill import dist

    real, calls = train_mod._dropped, []

    def dropped(batch):
        calls.append(1)
        if len(calls) == 2:  # the second batch: all but one view dropped
            return torch.tensor([0]), len(batch) - 1, 0
        return real(batch)

    monkeypatch.setattr(train_mod, "_dropped", dropped)
    r = train_mod.train_student(_resnet(unlabeled, tmp_path / "a"))
    assert r["step"] == 5 and r["lone_views"] == 1 and r["views"] == 80 and r["dropped_views"] == 16
    calls.clear()  # rank 0 of two (the other ranks' figures are not summed here): an empty step, the ranks agree
    setup = dist.setup
    monkeypatch.setattr(dist, "setup", lambda device, workers=0: (0, 2, setup(device, workers)[2]))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **kw: model)
    r = train_mod.train_student(_resnet(unlabeled, tmp_path / "b"))
    assert r["step"] == 3 and r["lone_views"] == 1 and r["views"] == 32


# ---- torchrun: the ranks agree where to stop ------------------------------------------------------

RANK_SIGNAL = r"""
import os, signal, sys
import tinydistill.train as t
real = t._step

def step(run, batch):
    out = real(run, batch)
    if run.step == 4 and run.rank == 1:  # only rank 1 is signalled, during step 4
        os.kill(os.getpid(), signal.SIGTERM)
    return out

t._step = step
from tinydistill.cli import main
main(sys.argv[1:], prog_name="tinydistill")
"""


@pytest.mark.slow
def test_torchrun_sigterm_to_one_rank_stops_all_at_the_next_read_and_resumes(unlabeled, tmp_path):
    """Two CPU ranks, 3 steps an epoch, losses read every 2 steps: SIGTERM to rank 1 in step 4
    stops both ranks after step 5 (the next read, where they agree) with a checkpoint holding both
    ranks' places; resumed under torchrun, the run equals an uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "child.py"
    script.write_text(RANK_SIGNAL)

    def torchrun(target, out, *extra, port):
        args = _args(unlabeled, out, *extra)
        args[args.index("--log-interval") + 1] = "2"
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), *target, "train-student", *args],
                              capture_output=True, text=True, env=env)

    p = torchrun(["-m", "tinydistill"], tmp_path / "full", port=29561)
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun([str(script)], tmp_path / "part", port=29562)
    assert p.returncode != 0 and "stopped by SIGTERM at epoch 1 step 5" in p.stderr, p.stderr[-3000:]
    ck = torch.load(tmp_path / "part" / "last.pth", weights_only=True)
    assert ck["step"] == 5 and [r["seen"] for r in ck["partial"]] == [2, 2] and len(ck["rng_ranks"]) == 2
    p = torchrun(["-m", "tinydistill"], tmp_path / "part", "--resume", port=29563)
    assert p.returncode == 0, p.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for n, t in a[key].items():
            assert torch.equal(t, b[key][n]), (key, n)
    assert steps(tmp_path / "full") == steps(tmp_path / "part")
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "part")
