"""Random access into webdataset shards: the per-tar index, its cache, and byte-range reads."""

import io
import os
import tarfile

import numpy as np
import pytest

from tinydistill import tarindex
from tinydistill.sources import WebDatasetSource, open_source


def _png(v: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((6 + v % 5, 7, 3), v % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root, shards=3, per=9, seed=0):
    """Tars of PNG + cls samples (one sample without an image, one with upper-case extensions,
    a __meta__ member), as a list of paths. Returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"part-{s:03d}.tar", "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            add("__meta__", b"ignored")
            for i in range(per):
                v = seed + s * per + i
                key = f"d{i % 2}/x{v:04d}"
                if not (s == 1 and i == 4):
                    add(f"{key}.{'PNG' if i == 3 else 'png'}", _png(v))
                add(f"{key}.cls", str(v % 5).encode())
                add(f"{key}.json", b'{"v": %d}' % v)
    return str(root / ("part-{000..%03d}.tar" % (shards - 1)))


def sequential(spec):
    """What webdataset itself yields, in order: (key, label, image bytes or None)."""
    import webdataset as wds

    from tinydistill.sources import _shard_name

    out = []
    for smp in wds.WebDataset(spec, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
        out.append((f"{_shard_name(smp['__url__'])}/{smp['__key__']}", int(smp["cls"]), smp.get("png")))
    return out


def test_random_rows_equal_a_sequential_read(tmp_path):
    spec = write_shards(tmp_path / "w")
    src = open_source(spec)
    want = sequential(spec)
    assert src.keys == [k for k, _, _ in want] and src.labels.tolist() == [l for _, l, _ in want]
    rows = np.sort(np.random.default_rng(0).choice(len(src), 12, replace=False))
    got = dict(src._members(rows))
    for r in rows:
        assert got[r].get("image") == want[r][2], r
    bad = src.keys.index("part-001/d0/x0013")
    (r, err), = list(src.read([bad]))
    assert "no image member" in str(err)
    assert src.index_stats == {"scanned": 3}


def test_opening_a_cached_source_reads_no_payload(tmp_path, monkeypatch):
    spec = write_shards(tmp_path / "w")
    first = open_source(spec)
    monkeypatch.setattr(tarindex, "scan", lambda *a, **k: pytest.fail("scanned an indexed tar"))
    again = open_source(spec)
    assert again.keys == first.keys and again.labels.tolist() == first.labels.tolist()
    assert again.index_stats == {"cache": 3} and again.io == {"bytes": 0, "requests": 0}


def _rewrite_same_size_and_mtime(root, seed):
    """Rewrite every tar with other samples of the same sizes, then put each one's mtime back."""
    before = {p: p.stat() for p in root.glob("*.tar")}
    write_shards(root, shards=len(before), seed=seed)
    for p, st in before.items():
        assert p.stat().st_size == st.st_size
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_tar_rewritten_with_same_size_and_mtime_is_caught(tmp_path, caplog):
    spec = write_shards(tmp_path / "w", shards=2)
    old = open_source(spec)
    _rewrite_same_size_and_mtime(tmp_path / "w", seed=100)
    new = open_source(spec)  # one process: indexed again, said in one line per tar
    stale = [r.getMessage() for r in caplog.records if "changed since it was indexed" in r.getMessage()]
    assert len(stale) == 2 and "part-000.tar" in stale[0] and new.index_stats == {"stale": 2, "scanned": 2}
    assert new.keys != old.keys and new.keys == [k for k, _, _ in sequential(spec)]
    assert dict(new._members([0]))[0]["image"] == sequential(spec)[0][2]


def test_rewritten_tar_under_torchrun_names_the_tar(tmp_path, monkeypatch):
    from tinydistill.errors import TinydistillError

    spec = write_shards(tmp_path / "w", shards=2)
    for url in src_urls(spec):
        tarindex.write_beside(url)
    _rewrite_same_size_and_mtime(tmp_path / "w", seed=100)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TinydistillError, match=r"part-000.tar: changed since it was indexed .*index-tars") as e:
        open_source(spec)
    assert "\n" not in str(e.value)


def test_unindexed_tars_under_torchrun_are_refused_then_indexed_once(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tinydistill.cli import main
    from tinydistill.errors import TinydistillError

    spec = write_shards(tmp_path / "w", shards=3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TinydistillError, match=r"part-000.tar: no index; .*tinydistill index-tars '.*part-"):
        open_source(spec)
    assert not list((tmp_path / "w").glob("*.idx"))  # refused before any rank scanned
    scanned = []
    real = tarindex.scan
    monkeypatch.setattr(tarindex, "scan", lambda url, *a: scanned.append(url) or real(url, *a))
    for rank in (0, 1):  # what torchrun's two ranks run: each indexes its share
        monkeypatch.setenv("RANK", str(rank))
        r = CliRunner().invoke(main, ["index-tars", spec])
        assert r.exit_code == 0, r.output
    assert sorted(scanned) == sorted(src_urls(spec))  # every tar scanned once, over both ranks
    assert "rank 1/2: 1 tars indexed" in r.output
    src = open_source(spec)
    assert src.index_stats == {"beside": 3} and src.keys == [k for k, _, _ in sequential(spec)]
    r = CliRunner().invoke(main, ["index-tars", spec])  # again: nothing to do
    assert "0 tars indexed, 1 already indexed" in r.output and len(scanned) == 3


def test_changed_tar_is_reindexed(tmp_path):
    spec = write_shards(tmp_path / "w")
    old = open_source(spec)
    st = (tmp_path / "w" / "part-002.tar").stat()
    write_shards(tmp_path / "w", seed=100)  # same names, other samples (same sizes)
    os.utime(tmp_path / "w" / "part-002.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    new = open_source(spec)
    assert new.keys != old.keys and new.keys == [k for k, _, _ in sequential(spec)]
    img = dict(new._members([len(new) - 1]))[len(new) - 1]["image"]
    assert img == sequential(spec)[-1][2]


def test_random_batch_reads_only_its_samples(tmp_path):
    spec = write_shards(tmp_path / "w", shards=2, per=40)
    src = open_source(spec)
    rows = np.arange(1, len(src), 7)  # never neighbours: one request each
    list(src._members(rows))
    assert src.io["requests"] == len(rows) and src.io["bytes"] == int(src._size[rows].sum())
    assert src.io["bytes"] < src.data_bytes / 5


def test_index_beside_the_shard(tmp_path):
    spec = write_shards(tmp_path / "w", shards=2)
    for url in src_urls(spec):
        assert tarindex.write_beside(url).endswith(".tar.idx")
    src = WebDatasetSource(spec)
    assert src.index_stats == {"beside": 2}
    (tmp_path / "w" / "part-001.tar").write_bytes((tmp_path / "w" / "part-000.tar").read_bytes() + b"\0" * 1024)
    src = WebDatasetSource(spec)  # the beside index of part-001 no longer matches: scanned again
    assert src.index_stats == {"beside": 1, "scanned": 1}


def src_urls(spec):
    from webdataset.shardlists import expand_urls

    return expand_urls(spec)


def test_missing_shard_is_one_line(tmp_path):
    from tinydistill.sources import SourceError

    with pytest.raises(SourceError, match=r"part-000.tar: no such shard"):
        open_source(str(tmp_path / "part-{000..001}.tar"))


def test_a_key_twice_in_one_tar_is_one_line(tmp_path):
    from tinydistill.errors import TinydistillError

    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name in ("a.png", "b.png", "a.cls"):  # a's members are not next to each other
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(TinydistillError, match=r"dup.tar: sample key 'a' occurs twice"):
        open_source(str(tmp_path / "dup.tar"))
