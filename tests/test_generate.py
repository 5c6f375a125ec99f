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
import zarr

import tinydistill as td
from helpers import random_teacher

ARGS = ["--data", "digits", "--teacher", "test_resnet", "--teacher-input-size", "32", "--epochs", "2",
        "--img-size", "32", "--mix-group", "64", "--chunk-rows", "128", "--shard-rows", "128",
        "--k", "5", "--mixup", "0.8", "--cutmix", "1.0", "--no-progress", "--batch-size", "32"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_teacher(tmp_path_factory.mktemp("w") / "teacher.pth", 10)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tinydistill", *args], capture_output=True, text=True)


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {n: g[n][:] for n in ("logp", "index_gap" if "index_gap" in g else "index", "seed", "complete")}


def same(a, b):
    return all(np.array_equal(a[n], b[n], equal_nan=True) for n in a)


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    """An uninterrupted run, the baseline every other run must equal bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    p = cli("gen-logits", *ARGS, "--teacher-weights", weights, "--workers", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["views"] == 2 * 1438 and summary["complete"] == [1.0, 1.0] and summary["units_written"] == 24
    return out


@pytest.mark.slow
def test_store_contents_and_resume_is_noop(reference, weights):
    st = td.open_store(reference)
    assert st.k == 5 and st.num_classes == 10 and st.epochs == 2
    assert st.teacher["name"] == "test_resnet" and st.teacher["weights_digest"].startswith("sha256:")
    assert st.attrs["augmentation"]["mixup"] == 0.8 and st.attrs["canary"]["digest"]
    before = arrays(reference)
    p = cli("gen-logits", *ARGS, "--teacher-weights", weights, "--workers", "0", "--out", str(reference))
    assert p.returncode == 0 and json.loads(p.stdout)["units_written"] == 0
    assert same(before, arrays(reference))
    # the stored top-K really are the teacher's outputs on the replayed views
    v = st.view(1, 77, "digits")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    model.load_state_dict(torch.load(weights))
    model.eval()
    from tinydistill.views import prepare
    with torch.inference_mode():
        lp = torch.log_softmax(model(prepare(v.image[None], 32, (0.5,) * 3, (0.5,) * 3, "bilinear")), -1)[0]
    s_lp, s_ix = st.topk(1, 77)
    np.testing.assert_array_equal(np.sort(s_ix[0]), np.sort(lp.topk(5).indices.numpy()))
    np.testing.assert_allclose(s_lp[0], lp.topk(5).values.numpy(), atol=2e-3)


def _kill_when(proc, store, n_done, timeout=120):
    done_dir = Path(store) / "complete" / "c"
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = sum(1 for _ in done_dir.rglob("*") if _.is_file()) if done_dir.exists() else 0
        if n >= n_done:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return n
        if proc.poll() is not None:
            pytest.fail(f"run ended before {n_done} units: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail("timed out waiting for units")


@pytest.mark.slow
def test_kill_at_three_points_then_resume_equals_uninterrupted(reference, weights, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "tinydistill", "gen-logits", *ARGS, "--teacher-weights", weights,
           "--workers", "1", "--out", str(out)]  # the reference's worker count: the same CPU threads
    seen = []
    for n_done in (1, 9, 18):  # early, middle, late
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen.append(_kill_when(proc, out, n_done))
    assert td.open_store(out).completed().mean() < 1.0
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert 0 < json.loads(p.stdout)["units_written"] < 24
    assert same(arrays(reference), arrays(out))


@pytest.mark.slow
def test_torchrun_two_processes_equals_one(reference, weights, tmp_path):
    out = tmp_path / "ddp.zarr"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        "-m", "tinydistill", "gen-logits", *ARGS, "--teacher-weights", weights, "--workers", "1",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["views"] == 2 * 1438 and summary["units_written"] == 24
    assert same(arrays(reference), arrays(out))


@pytest.mark.slow
def test_verify_exact_and_detects_changed_values(reference, weights, tmp_path):
    p = cli("verify", str(reference), "--data", "digits", "--teacher", "test_resnet", "--teacher-weights", weights,
            "--samples", "16")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["topk_id_agreement"] == 1.0 and r["max_abs_logp_diff"] == 0.0 and r["views_checked"] == 16
    # a store whose values drifted: verify exits 1 with one line
    import shutil
    bad = tmp_path / "drift.zarr"
    shutil.copytree(reference, bad)
    st = td.open_store(bad, mode="r+")
    for s in range(st.num_shards):
        lp, ix = st.topk(0, slice(*st.shard_bounds(s)), order="stored")
        st.write_shard(0, s, lp - 0.01, ix, st.seeds(0, slice(*st.shard_bounds(s))))
        lp, ix = st.topk(1, slice(*st.shard_bounds(s)), order="stored")
        st.write_shard(1, s, lp - 0.01, ix, st.seeds(1, slice(*st.shard_bounds(s))))
    p = cli("verify", str(bad), "--data", "digits", "--teacher", "test_resnet", "--teacher-weights", weights,
            "--samples", "8")
    assert p.returncode == 1 and p.stderr.strip().startswith("Error:") and len(p.stderr.strip().splitlines()) == 1
    assert "largest |delta log-prob|" in p.stderr


@pytest.mark.slow
def test_mismatch_refused_and_overwrite(reference, weights, tmp_path):
    import shutil
    out = tmp_path / "m.zarr"
    shutil.copytree(reference, out)
    for extra, needle in ((["--k", "6"], "K 5"), (["--hflip", "0.1"], "augmentation spec hash"),
                          (["--seed", "3"], "seed 0")):
        args = [a for a in ARGS]
        if extra[0] == "--k":
            args[args.index("--k") + 1] = extra[1]
            extra = []
        p = cli("gen-logits", *args, *extra, "--teacher-weights", weights, "--workers", "0", "--out", str(out))
        assert p.returncode == 1 and needle in p.stderr and "--overwrite" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), other)
    p = cli("gen-logits", *ARGS, "--teacher-weights", str(other), "--workers", "0", "--out", str(out))
    assert p.returncode == 1 and "teacher weights" in p.stderr


@pytest.mark.parametrize("change,needle", [
    (["--out", "/proc/nope/x.zarr"], "/proc/nope/x.zarr"),
    (["--data", "/no/such/dir"], "/no/such/dir: no such"),
    (["--teacher", "not_a_model_xyz"], "not_a_model_xyz: unknown teacher"),
    (["--k", "11"], "--k 11: must be between 1 and the teacher's 10 classes"),
    (["--epochs", "3:2"], "--epochs 3:2"),
])
def test_user_errors_are_one_line(weights, tmp_path, change, needle):
    args = list(ARGS) + ["--teacher-weights", weights, "--workers", "0", "--out", str(tmp_path / "e.zarr")]
    for i in range(0, len(change), 2):
        j = len(args) - 1 - args[::-1].index(change[i])
        args[j + 1] = change[i + 1]
    from click.testing import CliRunner

    from tinydistill.cli import main

    r = CliRunner().invoke(main, ["gen-logits", *args])  # in process: no interpreter start-up per case
    lines = [l for l in r.output.strip().splitlines() if l.startswith("Error")]
    assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_corrupt_image_stops_or_is_skipped(weights, tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((16, 16, 3), i * 10, np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "3.png").write_bytes(b"\x89PNG broken")
    base = ["gen-logits", "--data", str(root), "--teacher", "test_resnet", "--teacher-weights", weights,
            "--teacher-input-size", "32", "--img-size", "32", "--mix-group", "8", "--chunk-rows", "8",
            "--shard-rows", "8", "--k", "3", "--no-progress", "--workers", "2"]
    p = cli(*base, "--out", str(tmp_path / "s1.zarr"))
    assert p.returncode == 1 and "b/3.png: cannot read image" in p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr
    p = cli(*base, "--skip-bad", "--out", str(tmp_path / "s2.zarr"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["skipped_views"] == 1
    st = td.open_store(tmp_path / "s2.zarr")
    row = list(st.keys).index("b/3.png")
    assert st.skipped(0, slice(None)).nonzero()[0].tolist() == [row]
    assert np.isnan(st.topk(0, row)[0]).all()


def test_object_store_url(weights):
    """gen-logits writes through fsspec (memory:// stands in for s3:// / gs://)."""
    from click.testing import CliRunner
    from tinydistill.cli import main
    url = "memory://td-gen/store.zarr"
    args = [a for a in ARGS]
    args[args.index("--epochs") + 1] = "1"
    r = CliRunner().invoke(main, ["gen-logits", *args, "--teacher-weights", weights, "--workers", "0", "--out", url])
    assert r.exit_code == 0, r.output
    st = td.open_store(url)
    assert st.completed().tolist() == [1.0] and st.info["bytes_per_view"] > 0
    assert np.isfinite(st.topk(0, slice(None))[0]).all()
