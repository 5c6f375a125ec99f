"""Against a real S3 API server (moto's server mode on loopback, through s3fs): stores and
webdataset shards on s3://, in DataLoader workers, and the errors a user can cause."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import tinydistill as td
from helpers import random_teacher

pytestmark = pytest.mark.slow  # every test here talks to an S3 API server

GEN = ["--teacher", "test_resnet", "--teacher-input-size", "32", "--epochs", "1",
       "--img-size", "32", "--mix-group", "64", "--chunk-rows", "128", "--shard-rows", "256",
       "--k", "5", "--mixup", "0.8", "--cutmix", "1.0", "--no-progress", "--batch-size", "64"]
TRAIN = ["--student", "test_vit", "--batch-size", "64", "--lr", "5e-4", "--no-progress", "--epochs", "1",
         "--warmup-epochs", "0.2"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinydistill", *args], capture_output=True, text=True, **kw)


def arrays(url):
    g = zarr.open_group(url, mode="r", storage_options={"use_listings_cache": False} if "://" in url else None)
    return {n: g[n][:] for n in ("logp", "index_gap", "seed", "complete")}


def s3fs_():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_teacher(tmp_path_factory.mktemp("w") / "teacher.pth", 10)


@pytest.fixture(scope="module")
def local_ref(weights, tmp_path_factory):
    """gen-logits on digits into a local store: what every s3:// run must equal."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    p = cli("gen-logits", "--data", "digits", *GEN, "--teacher-weights", weights, "--workers", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    return str(out)


def upload_digit_shards(bucket: str, shards: int = 4, per: int = 48) -> str:
    """``shards`` tars of ``per`` digits each (PNG + cls) in the bucket; returns the brace URL."""
    from PIL import Image

    from tinydistill.sources import DigitsSource

    src = DigitsSource("train")
    fs = s3fs_()
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(s * per, (s + 1) * per):
                png = io.BytesIO()
                Image.fromarray(src._images[i]).save(png, format="PNG")
                for name, data in ((f"{i:05d}.png", png.getvalue()), (f"{i:05d}.cls", str(src.labels[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.pipe_file(f"{bucket[5:]}/shards/part-{s:03d}.tar", buf.getvalue())
    return f"{bucket}/shards/part-{{000..{shards - 1:03d}}}.tar"


@pytest.mark.slow
def test_gen_logits_killed_and_resumed_on_s3_equals_local(s3, weights, local_ref):
    url = f"{s3}/k.zarr"
    cmd = [sys.executable, "-m", "tinydistill", "gen-logits", "--data", "digits", *GEN, "--teacher-weights", weights,
           "--workers", "1", "--out", url]
    fs = s3fs_()
    for n_done in (1, 3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            fs.invalidate_cache()
            done = len(fs.find(f"{url[5:]}/complete/c")) if fs.exists(f"{url[5:]}/zarr.json") else 0
            if done >= n_done:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "timed out waiting for units"
            time.sleep(0.05)
    assert 0 < td.open_store(url).completed()[0] < 1
    listed = td.open_store(url)
    listed.complete_mask(refresh=True)  # a listing taken before the resume must not hide later chunks
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert 0 < json.loads(p.stdout)["units_written"] < 6
    assert listed.completed()[0] == 1 and np.isfinite(listed.topk(0, slice(None))[0]).all()
    assert listed._group["complete"][:].all()  # whole-object reads after a listing see new objects
    ref, got = arrays(local_ref), arrays(url)
    for n in ref:
        assert ref[n].shape == got[n].shape and np.array_equal(ref[n], got[n], equal_nan=True), \
            (n, np.argwhere(~((ref[n] == got[n]) | (ref[n] != ref[n])))[:5].tolist())
    # inspect and verify read it where it is
    p = cli("inspect", url, "--check", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["complete_views"] == 1438, p.stderr
    p = cli("verify", url, "--data", "digits", "--teacher", "test_resnet", "--teacher-weights", weights,
            "--samples", "16", "--device", "cpu")
    assert p.returncode == 0, p.stderr + p.stdout


@pytest.mark.slow
def test_train_with_workers_from_s3_store_and_s3_shards(s3, weights, tmp_path):
    shards = upload_digit_shards(s3)
    url = f"{s3}/wds.zarr"
    p = cli("gen-logits", "--data", shards, *GEN, "--teacher-weights", weights, "--workers", "2", "--out", url)
    assert p.returncode == 0, p.stderr
    p = cli("train-student", "--data", shards, *TRAIN, "--logits", url, "--workers", "2", "--out", str(tmp_path / "t"))
    assert p.returncode == 0, p.stderr
    row = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["views"] == 4 * 48 and np.isfinite(row["train_loss"])


def test_open_store_with_storage_options(s3, s3_server, monkeypatch):
    url = f"{s3}/opts.zarr"
    st = td.create_store(url, num_classes=10, k=3, epochs=1, keys=[f"k{i}" for i in range(20)], chunk_rows=8,
                         shard_rows=8)
    st.write_shard(0, 0, np.log(np.full((8, 3), 0.2)), np.tile(np.arange(3), (8, 1)), np.arange(8))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the options alone must find the server
    opts = {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}
    got = td.open_store(url, storage_options=opts)
    assert got.completed().tolist() == [0.4] and got.topk(0, [3], order="stored")[1].tolist() == [[0, 1, 2]]


def test_s3_shards_read_by_byte_range(s3):
    from tinydistill.sources import open_source

    src = open_source(upload_digit_shards(s3, shards=2, per=20))
    assert src.index_stats == {"scanned": 2} and len(src) == 40
    rows = [3, 27]  # one per shard: one request each, for exactly the image's bytes
    imgs = dict(src.read(rows))
    assert [np.asarray(imgs[r]).shape for r in rows] == [(8, 8)] * 2
    assert src.io["requests"] == 2 and src.io["bytes"] == int(src._size[rows].sum())
    again = open_source(src.name)
    assert again.index_stats == {"cache": 2} and again.keys == src.keys


@pytest.mark.parametrize("case", ["missing bucket", "bad credentials"])
def test_user_errors_on_s3_are_one_line(s3, case, monkeypatch, tmp_path):
    url = f"{s3}-nope/k.zarr" if case == "missing bucket" else f"{s3}/k.zarr"
    if case == "bad credentials":  # a server that checks keys: ours are unknown to it
        from s3server import S3Server

        strict = S3Server(INITIAL_NO_AUTH_ACTION_COUNT="0")
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        request_finalizer = strict.stop
    else:
        request_finalizer = lambda: None  # noqa: E731
    try:
        _one_line_errors(url, tmp_path)
    finally:
        request_finalizer()


def _one_line_errors(url, tmp_path):
    for args in (["inspect", url], ["train-student", "--data", "digits", *TRAIN, "--logits", url, "--workers", "0",
                                    "--out", str(tmp_path / "t")]):
        p = cli(*args, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(err) == 1 and url in err[0], p.stderr
        assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_server_that_stops_mid_run_is_one_line(weights, monkeypatch):
    from s3server import S3Server

    server = S3Server()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.make_bucket("td-stops")
        url = "s3://td-stops/k.zarr"
        proc = subprocess.Popen([sys.executable, "-m", "tinydistill", "gen-logits", "--data", "digits", *GEN,
                                 "--teacher-weights", weights, "--workers", "1", "--out", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fs, deadline = s3fs_(), time.time() + 120
        while not (fs.invalidate_cache() or fs.find("td-stops/k.zarr/complete/c")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        server.stop()
        _, err = proc.communicate(timeout=300)
        lines = [l for l in err.strip().splitlines() if l.startswith("Error")]
        assert proc.returncode == 1 and len(lines) == 1 and url in lines[0] and "left incomplete" in lines[0], err
        assert "Traceback" not in err
    finally:
        server.stop()


def test_targets_cross_the_network_once_per_node(s3, weights, local_ref):
    """Two local ranks split an epoch's target objects: together they download the epoch's
    stored bytes once; the mirror then serves every rank, and a second epoch start fetches nothing."""
    from tinydistill import nodecache

    url = f"{s3}/node.zarr"
    fs = s3fs_()
    fs.put(local_ref, url.split("://", 1)[1], recursive=True)
    remote = td.open_store(url)
    parts = [nodecache.fetch_epoch(remote, 0, r, 2) for r in (0, 1)]
    target_bytes = sum(p["fetched_bytes"] for p in parts) - sum(
        len(fs.cat_file(f"{url.split('://', 1)[1]}/{rel}")) for rel in parts[0]["objects"]
        if rel.split("/")[0] not in nodecache.target_arrays(remote))
    assert target_bytes == parts[0]["epoch_bytes"] > 0  # each target byte fetched once by the node
    mirror = nodecache.node_local(remote, 0)  # local rank 0 alone now: everything is on disk
    assert mirror.path == parts[0]["root"] and nodecache.fetch_epoch(remote, 0)["fetched_bytes"] == 0
    for a, b in zip(mirror.topk(0, slice(None), order="stored"), remote.topk(0, slice(None), order="stored")):
        assert np.array_equal(a, b)


def test_torchrun_two_ranks_write_and_train_from_s3(s3, weights, local_ref, tmp_path):
    """Two ranks fill one s3:// store (equal to the local one), then train from it: the two
    local ranks split the epoch's target objects into one node mirror and both read it."""
    import hashlib
    import socket

    from tinydistill import nodecache

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "tinydistill"]
    url = f"{s3}/ddp.zarr"
    p = subprocess.run([*run, "gen-logits", "--data", "digits", *GEN, "--teacher-weights", weights,
                        "--workers", "1", "--out", url], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["world_size"] == 2
    ref, got = arrays(local_ref), arrays(url)
    assert all(np.array_equal(ref[n], got[n], equal_nan=True) for n in ref)
    p = subprocess.run([*run, "train-student", "--data", "digits", *TRAIN, "--logits", url, "--workers", "1",
                        "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["views"] == 1438 and np.isfinite(row["train_loss"])
    mirror = nodecache.cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24]
    shares = {m.name: json.loads(m.read_text()) for m in mirror.glob(".versions.*.json")}
    assert sorted(shares) == [".versions.0.json", ".versions.1.json"] and all(shares.values())
    assert not set(shares[".versions.0.json"]) & set(shares[".versions.1.json"])  # each object fetched once


def _s3_store(url, epochs, n=256):
    """A store on object storage through the store API: ``epochs`` x 4 shards of 64 rows (chunks of 32)."""
    from helpers import fill

    st = td.create_store(url, num_classes=10, k=3, epochs=epochs, keys=[f"k{i}" for i in range(n)],
                         labels=np.arange(n) % 10, chunk_rows=32, shard_rows=64)
    fill(st)
    return td.open_store(url)


def test_inspect_sizes_come_from_the_listing(s3, s3_server):
    """`inspect`'s sizes: no HEAD per object; a store with 6x the objects costs the same requests."""
    from tinydistill.summary import summarize

    counts, objects, heads = [], [], []
    for epochs in (1, 6):
        url = f"{s3}/sizes{epochs}.zarr"
        st = _s3_store(url, epochs)
        keys = s3fs_().find(url.split("://", 1)[1])
        s3_server.start_counting()
        info = st.info
        reqs = s3_server.requests()
        assert not [r for r in reqs if r[0] == "HEAD"]
        assert info["bytes_on_disk"] == sum(s3fs_().du(url.split("://", 1)[1], total=False).values())
        counts.append(len(reqs))
        objects.append(len(keys))
        s3_server.start_counting()
        summarize(st, max_views=64)  # what inspect prints: a few HEADs opening the label array
        heads.append(len([r for r in s3_server.requests() if r[0] == "HEAD"]))
    assert objects[1] > 3 * objects[0] and counts[1] == counts[0]  # listing pages, not objects
    assert heads[1] == heads[0] <= 4


def test_node_mirror_fetches_one_epoch_and_prefetches_the_next(s3, s3_server, monkeypatch):
    """The mirror lists and downloads only the epoch in use (never every epoch's markers), and
    downloads the next epoch in the background: the next epoch's start then downloads nothing."""
    import threading

    from tinydistill import nodecache

    url = f"{s3}/mirror.zarr"
    remote = _s3_store(url, epochs=4)
    bucket_path = "/" + url.split("://", 1)[1] + "/"
    gate = threading.Event()
    real = nodecache.fetch_epoch

    def gated(store, epoch, *a, **kw):
        if epoch == 1:
            assert gate.wait(60)  # the background download waits until the epoch-0 checks are done
        return real(store, epoch, *a, **kw)

    monkeypatch.setattr(nodecache, "fetch_epoch", gated)

    def objects_got(reqs):  # the store's objects downloaded (listings are GETs of the bucket)
        return [p[len(bucket_path):] for m, p in reqs if m == "GET" and p.startswith(bucket_path)]

    def epochs_of(keys):
        return {int(k.split("/")[2]) for k in keys if k.split("/")[0] != "seed" and "/c/" in k}

    s3_server.start_counting()
    m0 = nodecache.node_local(remote, 0, following=1)  # returns while epoch 1 is still blocked
    got = objects_got(s3_server.requests())
    assert epochs_of(got) == {0} and not [k for k in got if k.startswith("complete/c/") and k[11] != "0"]
    assert not nodecache._pending[(url, 1)].done()
    for a, b in zip(m0.topk(0, slice(None), order="stored"), remote.topk(0, slice(None), order="stored")):
        assert np.array_equal(a, b)
    gate.set()
    nodecache._pending[(url, 1)].result()  # the prefetch ran, in the background thread
    s3_server.start_counting()
    m1 = nodecache.node_local(remote, 1, following=2)
    nodecache._pending[(url, 2)].result()
    reqs = s3_server.requests()
    assert 1 not in epochs_of(objects_got(reqs))  # epoch 1 was on disk already
    assert epochs_of(objects_got(reqs)) == {2}  # the background download of epoch 2
    per_epoch = len(reqs)
    assert per_epoch < len(s3fs_().find(url.split("://", 1)[1]))  # fewer than the store's objects
    assert np.array_equal(m1.topk(1, slice(None))[0], remote.topk(1, slice(None))[0])
    mirror = Path(m1.path)
    files = lambda e: [f for f in mirror.glob(f"logp/c/{e}/**/*") if f.is_file()]  # noqa: E731
    assert not files(0) and files(1) and files(2)  # epoch 0 deleted: this epoch and the next are kept
    nodecache.clear(remote)
