"""gen-logits and the store under faults: a second writer, a failed creation, epochs past the
store, SIGTERM / SIGINT, and the cost of completion listings (issues 27 and 23)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import tinydistill as td
from tinydistill import signals
from tinydistill.augment import AugSpec
from tinydistill.cli import main
from tinydistill.config import GenConfig
from tinydistill.errors import UnfinishedStoreError
from tinydistill.generate import gen_logits
from tinydistill.store import lease as lease_mod
from tinydistill.store.lease import PREFIX, Lease, LeaseError

from helpers import fill, random_teacher, unit_data

# digits:val (359 rows), 6 shards of 64 rows an epoch, 2 epochs: 12 units, a few seconds a run
ARGS = ["--data", "digits:val", "--teacher", "test_resnet", "--teacher-input-size", "32", "--epochs", "2",
        "--img-size", "32", "--mix-group", "32", "--chunk-rows", "32", "--shard-rows", "64", "--k", "3",
        "--mixup", "0.8", "--no-progress", "--batch-size", "32", "--workers", "0"]
SPEC = {"img_size": 32, "mix_group": 32, "mixup": 0.8}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_teacher(tmp_path_factory.mktemp("w") / "teacher.pth", 10)


def config(weights, out, **kw):
    base = dict(data="digits:val", teacher="test_resnet", teacher_weights=weights, teacher_input_size=32,
                epochs="2", k=3, chunk_rows=32, shard_rows=64, batch_size=32, workers=0, progress=False,
                device="cpu", out=str(out), spec=AugSpec.from_dict(SPEC))
    return GenConfig(**{**base, **kw})


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {n: g[n][:] for n in ("logp", "index_gap", "seed", "complete")}


def same(a, b):
    return all(np.array_equal(a[n], b[n], equal_nan=True) for n in a)


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    s = gen_logits(config(weights, out))
    assert s["units_written"] == 12 and s["complete"] == [1.0, 1.0]
    return out


def leases(path):
    d = Path(path) / PREFIX
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def cli(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def one_error_line(output):
    lines = [l for l in output.strip().splitlines() if l.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# ---- 27.10: epochs past --total-epochs -------------------------------------------------------------

def test_epochs_past_total_epochs_refused_before_the_store_exists(weights, tmp_path):
    out = tmp_path / "e.zarr"
    code, output = cli("gen-logits", *ARGS, "--epochs", "0:3", "--total-epochs", "2", "--teacher-weights", weights,
                       "--out", str(out))
    line = one_error_line(output)
    assert code == 1 and "--epochs 0:3 goes past --total-epochs 2" in line
    assert not out.exists()


# ---- 27.11: a creation that failed half way --------------------------------------------------------

def test_failed_creation_is_finished_by_the_next_run(weights, reference, tmp_path, monkeypatch):
    out = tmp_path / "full.zarr"
    real = zarr.Group.create_array

    def disk_full(self, name, *a, **kw):  # arrays before "complete" are made, then the disk is full
        if name == "complete":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, *a, **kw)

    monkeypatch.setattr(zarr.Group, "create_array", disk_full)
    code, output = cli("gen-logits", *ARGS, "--teacher-weights", weights, "--out", str(out))
    assert code == 1 and "No space left on device" in one_error_line(output)
    monkeypatch.setattr(zarr.Group, "create_array", real)
    with pytest.raises(UnfinishedStoreError, match="did not finish.*`overwrite`"):
        td.open_store(out)
    code, output = cli("inspect", str(out))  # readers say what happened, naming --overwrite
    assert code == 1 and "creation did not finish" in one_error_line(output) and "--overwrite" in output
    s = gen_logits(config(weights, out))  # the next run creates it again, then fills it
    assert s["units_written"] == 12
    assert same(arrays(reference), arrays(out))


def test_full_disk_mid_unit_keeps_the_units_before_and_resume_is_identical(weights, reference, tmp_path,
                                                                            monkeypatch):
    out, real, calls = tmp_path / "mid.zarr", zarr.Array.__setitem__, []

    def setitem(self, key, value):  # the disk fills up in the middle of the third unit
        if self.basename in ("logp", "index_gap", "seed"):
            calls.append(1)
            if len(calls) == 8:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    code, output = cli("gen-logits", *ARGS, "--teacher-weights", weights, "--out", str(out))
    line = one_error_line(output)
    assert code == 1 and "epoch 0 shard 2: write failed, unit left incomplete" in line and "No space" in line
    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    assert td.open_store(out).complete_mask(refresh=True).sum() == 2 and leases(out) == []
    s = gen_logits(config(weights, out))
    assert s["units_written"] == 10 and same(arrays(reference), arrays(out))


def test_a_foreign_group_names_overwrite(weights, tmp_path):
    out = tmp_path / "g.zarr"
    zarr.open_group(str(out), mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="i4")
    code, output = cli("gen-logits", *ARGS, "--teacher-weights", weights, "--out", str(out))
    line = one_error_line(output)
    assert code == 1 and "not a tinydistill store" in line and "--overwrite" in line


# ---- 27.7: two writers -----------------------------------------------------------------------------

def foreign(st, epochs, expires_in=100.0, **rec):
    """A lease of another (live) run on another host, written as gen-logits writes one."""
    now = time.time()
    rec = {"run": "other", "host": "elsewhere", "pid": 1, "machine": "elsewhere//", "epochs": list(epochs),
           "renewed": now, "expires": now + expires_in, **rec}
    key = f"{PREFIX}{rec['run']}.json"
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    sync(st._group.store.set(key, default_buffer_prototype().buffer.from_bytes(json.dumps(rec).encode())))
    return key


@pytest.mark.parametrize("where", ["local", "memory", pytest.param("s3", marks=pytest.mark.slow)])
def test_lease_refuses_an_overlapping_run_and_allows_disjoint_epochs(tmp_path, where, request):
    path = {"local": str(tmp_path / "l.zarr"), "memory": f"memory://td-lease-{tmp_path.name}/l.zarr"}.get(where) \
        or request.getfixturevalue("s3") + "/l.zarr"  # the test S3 API server
    td.create_store(path, num_classes=5, k=2, epochs=4, keys=[f"k{i}" for i in range(10)], chunk_rows=2, shard_rows=4)
    a = td.open_store(path, mode="r+").lease((0, 2)).take()
    try:
        with pytest.raises(LeaseError) as e:
            td.open_store(path, mode="r+").lease((1, 3)).take()
        msg = str(e.value)
        assert f"run {a.run} on host {socket.gethostname()}" in msg and "epochs 0:2" in msg
        assert "expires at" in msg and f"in {a.ttl:.0f} s" in msg and "\n" not in msg
        b = td.open_store(path, mode="r+").lease((2, 4)).take()  # disjoint epochs: several jobs, one store
        listed = td.open_store(path, mode="r+").lease((0, 4)).others()
        assert sorted(r["run"] for r in listed) == sorted([a.run, b.run])  # the refused one left nothing
        b.release()
    finally:
        a.release()
    assert td.open_store(path, mode="r+").lease((0, 4)).others() == []


def test_stale_leases_are_taken_over_and_live_ones_say_how_long(small_store):
    st = small_store
    foreign(st, (0, 2), expires_in=-1)  # expired: a run killed on another host
    Lease(st._group.store, st.path, (0, 2)).take().release()
    foreign(st, (0, 2), host=socket.gethostname(), machine=lease_mod._machine(), pid=2 ** 22 + 7)  # dead pid here
    Lease(st._group.store, st.path, (0, 2)).take().release()
    foreign(st, (0, 2), expires_in=75)  # live, elsewhere: refused, saying when it would expire
    with pytest.raises(LeaseError, match=r"run other on host elsewhere, pid 1.*expires at .* \(in 7[45] s"):
        Lease(st._group.store, st.path, (1, 2)).take()
    assert leases(st.path) == ["other.json"]


def test_two_runs_that_race_back_off(small_store, monkeypatch):
    """Both write their lease before either lists again: neither goes on (never both)."""
    st = small_store
    real = Lease._write

    def racing(self):
        real(self)
        foreign(st, (0, 1), run="racer")

    monkeypatch.setattr(Lease, "_write", racing)
    with pytest.raises(LeaseError, match="started at the same moment"):
        Lease(st._group.store, st.path, (0, 2)).take()
    assert leases(st.path) == ["racer.json"]  # ours is gone again


def test_lease_renewal_loss_and_release(small_store):
    st = small_store
    a = Lease(st._group.store, st.path, (0, 2), ttl_s=30).take()
    first = json.loads((Path(st.path) / a.key).read_text())
    assert a.renew() and json.loads((Path(st.path) / a.key).read_text())["expires"] >= first["expires"]
    a.check("epoch 0 shard 0")
    (Path(st.path) / a.key).unlink()  # another run found it stale and took over
    assert not a.renew() and a.lost
    with pytest.raises(LeaseError, match="lost.*stopped before epoch 1 shard 2"):
        a.check("epoch 1 shard 2")
    beat = a._thread
    assert beat.is_alive()
    a.release()
    assert not beat.is_alive()  # the heartbeat thread is joined


def test_gen_logits_refuses_a_store_another_run_is_filling(weights, reference, tmp_path):
    import shutil
    out = tmp_path / "busy.zarr"
    shutil.copytree(reference, out)
    st = td.open_store(out, mode="r+")
    # epoch 1 is being filled by a live run elsewhere: a run on epochs 0:2 and an --overwrite are refused
    foreign(st, (1, 2))
    before = arrays(out)
    for extra in ([], ["--overwrite"]):
        code, output = cli("gen-logits", *ARGS, *extra, "--teacher-weights", weights, "--out", str(out))
        line = one_error_line(output)
        assert code == 1 and "another gen-logits run is writing" in line and "run other on host elsewhere" in line
    assert same(before, arrays(out))
    code, output = cli("gen-logits", *ARGS, "--epochs", "0:1", "--teacher-weights", weights, "--out", str(out))
    assert code == 0, output  # epoch 0 is not in the other run's range
    assert leases(out) == ["other.json"]  # our own lease is gone once the run ends


HELD = """
import pathlib, sys, time
from tinydistill.store import LogitStore
from tinydistill.cli import main
go, hold, real, calls = pathlib.Path(sys.argv[1]), int(sys.argv[2]), LogitStore.write_shard, []
def held(self, *a, **kw):  # write number `hold` waits until the test says go: the run is surely live
    calls.append(1)
    while len(calls) == hold and not go.exists():
        time.sleep(0.02)
    return real(self, *a, **kw)
LogitStore.write_shard = held
main(sys.argv[3:])
"""


def held_run(out, go, hold, weights, workers="0", **kw):
    """gen-logits on one epoch (6 units) in a child process whose write number ``hold`` waits for ``go``."""
    args = list(ARGS)
    args[args.index("--epochs") + 1], args[args.index("--workers") + 1] = "1", workers
    args = ["gen-logits", *args, "--teacher-weights", weights, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", HELD, str(go), str(hold), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
    return proc, args


def wait_for(proc, cond):
    deadline = time.time() + 120
    while not cond():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_process_on_the_same_epochs_is_refused(weights, tmp_path):
    out, go = tmp_path / "two.zarr", tmp_path / "go"
    first, args = held_run(out, go, 1, weights)
    wait_for(first, lambda: leases(out))  # the first run holds its lease (and waits at its first unit)
    second = subprocess.run([sys.executable, "-m", "tinydistill", *args], capture_output=True, text=True)
    go.write_text("go")
    assert first.wait(120) == 0, first.stderr.read()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and "another gen-logits run is writing epochs that overlap 0:1" in err[0], err
    assert json.loads(first.stdout.read())["units_written"] == 6 and leases(out) == []


# ---- SIGTERM / SIGINT ------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_keeps_whole_units_says_so_and_resume_is_identical(weights, reference, tmp_path, sig):
    out = tmp_path / "stop.zarr"
    steps = []

    def on_step(_):
        steps.append(1)
        if len(steps) == 6:  # about half way: two shards' worth of batches
            os.kill(os.getpid(), sig)

    with pytest.raises(signals.Stopped) as e:
        gen_logits(config(weights, out), on_step=on_step)
    assert e.value.exit_code == 128 + sig
    st = td.open_store(out)
    done = int(st.complete_mask(refresh=True).sum())
    msg = str(e.value)
    assert msg.startswith(f"gen-logits stopped by {signal.Signals(sig).name}: ") and "\n" not in msg
    assert f"keeps {done} of 12 units of epochs 0:2 complete ({done} written by this run)" in msg
    assert "re-run the same command to resume" in msg and 0 < done < 12
    assert leases(out) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if sig == signal.SIGINT:
        return  # the same clean-up: one resume below is enough
    s = gen_logits(config(weights, out))
    assert s["units_written"] == 12 - done and same(arrays(reference), arrays(out))


def test_cli_exit_status_of_a_stopped_run(weights, tmp_path, monkeypatch):
    import tinydistill.generate as gen

    def preempted(*a, **kw):
        raise signals.Terminated(signal.SIGTERM)

    monkeypatch.setattr(gen, "_gen_logits", preempted)
    r = CliRunner().invoke(main, ["gen-logits", *ARGS, "--teacher-weights", weights, "--out", str(tmp_path / "x")])
    assert r.exit_code == 143 and "gen-logits stopped by SIGTERM" in one_error_line(r.output)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers(weights, tmp_path):
    """As SLURM does it: every process of the job (main and DataLoader workers) gets SIGTERM."""
    out, go = tmp_path / "slurm.zarr", tmp_path / "go"
    proc, _ = held_run(out, go, 3, weights, workers="1", start_new_session=True)
    marks = out / "complete" / "c"
    wait_for(proc, lambda: marks.exists() and sum(1 for p in marks.rglob("*") if p.is_file()) == 2)
    os.killpg(proc.pid, signal.SIGTERM)  # the third unit is held: the run cannot have ended
    go.write_text("go")
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.strip().splitlines() if not l.startswith("tinydistill: ")]  # log lines aside
    assert proc.returncode == 143 and len(lines) == 1 and "stopped by SIGTERM" in lines[0], err
    done = int(td.open_store(out).complete_mask(refresh=True).sum())
    assert 2 <= done < 6 and f"keeps {done} of 6 units" in lines[0] and leases(out) == []
    assert td.open_store(out).check() == []  # what it kept is whole


# ---- 23.8: one listing of the completion markers per writer ----------------------------------------

@pytest.fixture
def count_listings(monkeypatch):
    """Counts listings of the completion markers, on any zarr store."""
    calls = []
    for cls in (zarr.storage.LocalStore, zarr.storage.MemoryStore, zarr.storage.FsspecStore):
        real = cls.list_prefix

        def counted(self, prefix, _real=real):
            if prefix.startswith("complete/c"):
                calls.append(prefix)
            return _real(self, prefix)

        monkeypatch.setattr(cls, "list_prefix", counted)
    return calls


def test_writes_list_the_markers_once(small_store, count_listings):
    w = td.open_store(small_store.path, mode="r+")
    fill(w)  # 2 epochs x 4 shards
    assert len(count_listings) == 1
    assert td.open_store(small_store.path).completed().tolist() == [1.0, 1.0]
    w.write_shard(0, 1, *unit_data(w, 0, 1))  # a rewrite still unmarks first, from the kept set
    assert len(count_listings) == 2 and td.open_store(small_store.path).is_complete(0, 1)


def test_gen_logits_lists_the_markers_a_fixed_number_of_times(weights, tmp_path, count_listings):
    url = f"memory://td-listings-{tmp_path.name}/s.zarr"
    s = gen_logits(config(weights, url, epochs="1"))
    assert s["units_written"] == 6 and len(count_listings) <= 3, count_listings
