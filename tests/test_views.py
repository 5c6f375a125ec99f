import random
import subprocess
import sys
import tarfile
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import tinydistill as td
from tinydistill.augment import AugSpec, SpecError, ViewMaker, _posterize
from tinydistill.sources import BadSampleError, SourceError, open_source
from tinydistill.views import ReplayError, ViewStream, check_replay, create_view_store, render_views, views_digest

SPEC = AugSpec(img_size=24, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0,
               mix_group=32, interpolation="random")
PROBE = [(0, 0), (0, 7), (0, 300), (1, 31), (1, 32), (1, 1437), (2, 640)]


@pytest.fixture(scope="module")
def digits():
    return open_source("digits")


def _by_view(batches):
    out = {}
    for b in batches:
        for i in range(len(b["row"])):
            out[int(b["epoch"][i]), int(b["row"][i])] = (b["image"][i], int(b["partner"][i]), float(b["lam"][i]))
    return out


def _stream(digits, **kw):
    return ViewStream(digits, SPEC, base_seed=7, epochs=[0, 1, 2], unit_rows=kw.pop("unit_rows", 128), **kw)


def test_views_identical_across_workers_batches_order(digits):
    ref = {(e, r): (v["image"], v["partner"], v["lam"])
           for (e, r), v in zip(PROBE, render_views(digits, SPEC, 7, PROBE))}
    runs = [
        dict(workers=0, batch=16, order_seed=None, unit_rows=128),
        dict(workers=1, batch=5, order_seed=None, unit_rows=128),
        dict(workers=3, batch=64, order_seed=123, unit_rows=128),  # another unit visiting order
        dict(workers=0, batch=7, order_seed=5, unit_rows=256),     # other unit size
    ]
    for cfg in runs:
        s = _stream(digits, order_seed=cfg["order_seed"], unit_rows=cfg["unit_rows"])
        wanted = {(e, (r // cfg["unit_rows"])) for e, r in PROBE}
        s.units = [u for u in s.units if u in wanted]  # only the units holding the probes
        got = _by_view(DataLoader(s, batch_size=cfg["batch"], num_workers=cfg["workers"]))
        for key in PROBE:
            img, partner, lam = got[key]
            assert torch.equal(img, ref[key][0]), (cfg, key)
            assert (partner, lam) == ref[key][1:], (cfg, key)


def test_ranks_split_units_without_overlap(digits, monkeypatch):
    one = _stream(digits)
    all_units = one.my_units()
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append(_stream(digits).my_units())
    assert sorted(parts[0] + parts[1]) == sorted(all_units) and not set(parts[0]) & set(parts[1])
    # what rank 1 renders equals what a single process renders for the same units
    four = all_units[:4]
    monkeypatch.setenv("RANK", "1")
    s = _stream(digits)
    s.units = four
    a = list(s)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    s1 = _stream(digits)
    s1.units = [four[1], four[3]]
    b = list(s1)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x["image"], y["image"]) and x["lam"] == y["lam"] and x["row"] == y["row"]
               for x, y in zip(a, b))


def test_fresh_process_gives_same_pixels(digits):
    code = (
        "from tinydistill.augment import AugSpec; from tinydistill.sources import open_source;"
        "from tinydistill.views import render_views, views_digest;"
        f"spec = AugSpec.from_dict({SPEC.to_dict()!r});"
        f"print(views_digest(render_views(open_source('digits'), spec, 7, {PROBE!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == views_digest(render_views(digits, SPEC, 7, PROBE))


def test_global_rng_neither_leaks_in_nor_out(digits):
    a = render_views(digits, SPEC, 7, PROBE[:3])
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    b = render_views(digits, SPEC, 7, PROBE[:3])
    after = (random.random(), np.random.rand(), torch.rand(1))
    assert views_digest(a) == views_digest(b)
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def test_mix_pairs_and_lambdas(digits):
    views = render_views(digits, SPEC, 7, [(0, r) for r in range(64)])
    partner = {v["row"]: v["partner"] for v in views}
    mixed = [v for v in views if v["lam"] < 1.0]
    assert len(mixed) > 40  # mix_prob=1: nearly every view is mixed
    for v in mixed:
        assert v["partner"] != v["row"] and v["partner"] // 32 == v["row"] // 32  # inside its group
        assert v["partner_label"] == digits.labels[v["partner"]]
    # pairing is symmetric (a <-> b) within each epoch, and differs between epochs
    pairs = {r: p for r, p in partner.items() if p != r}
    assert all(pairs.get(p, r) == r for r, p in pairs.items())
    other = render_views(digits, SPEC, 7, [(1, r) for r in range(64)])
    assert [v["partner"] for v in other] != [v["partner"] for v in views]
    # lambda comes from the view's own seed: the same whoever else is in the batch
    again = render_views(digits, SPEC, 7, [(0, 5)])[0]
    assert again["lam"] == views[5]["lam"] and again["partner"] == views[5]["partner"]
    # a mixed image really is a blend (mixup) or a paste (cutmix) of the two base views
    nomix = AugSpec.from_dict({**SPEC.to_dict(), "mixup": 0.0, "cutmix": 0.0})
    base = {v["row"]: v["image"] for v in render_views(digits, nomix, 7, [(0, r) for r in range(32)])}
    for v in views[:32]:
        if v["lam"] < 1:
            a, b = base[v["row"]], base[v["partner"]]
            blend = a * v["lam"] + b * (1 - v["lam"])
            paste = (v["image"] == a) | (v["image"] == b)
            assert torch.equal(v["image"], blend) or paste.all()


def test_base_seed_changes_views(digits):
    assert views_digest(render_views(digits, SPEC, 7, PROBE)) != views_digest(render_views(digits, SPEC, 8, PROBE))


def test_posterize_zero_bits_is_black_not_an_error():
    img = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    assert np.asarray(_posterize(img, 0)).max() == 0
    assert np.asarray(_posterize(img, 2)).max() == 192
    maker = ViewMaker(AugSpec(img_size=8, auto_augment="rand-m9-mstd0.5-inc1"), 0)
    ops = [op for op in maker.transform.transforms[1].transforms[0].ops if "Posterize" in op.name]
    assert ops and all(op.aug_fn is _posterize for op in ops)
    op = ops[0]
    op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0  # the level that asks for 0 bits
    assert np.asarray(op(img)).max() == 0


def test_spec_yaml_and_validation(tmp_path):
    f = tmp_path / "aug.yaml"
    f.write_text("augmentation:\n  img_size: 64\n  auto_augment: rand-m9-mstd0.5-inc1\n  mixup: 0.8\n")
    spec = AugSpec.from_yaml(f)
    assert spec.img_size == 64 and spec.mixup == 0.8
    assert AugSpec.from_dict(spec.to_dict()).hash == spec.hash
    assert AugSpec(img_size=64).hash != spec.hash
    f.write_text("img_size: 64\nhflips: 0.5\n")
    with pytest.raises(SpecError, match="hflips"):
        AugSpec.from_yaml(f)
    with pytest.raises(SpecError, match="probability"):
        AugSpec(hflip=1.5)
    with pytest.raises(SpecError, match="cannot read"):
        AugSpec.from_yaml(tmp_path / "none.yaml")
    with pytest.raises(SpecError, match="timm cannot build"):
        ViewMaker(AugSpec(auto_augment="nonsense-m9"), 0)


# ---- sources ------------------------------------------------------------------------------------

def _png(color, size=12):
    buf = BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(20):
            (root / name / f"{i:02d}.png").write_bytes(_png(10 * i + c))
    return root


def test_imagefolder_source(folder):
    src = open_source(str(folder))
    assert len(src) == 60 and src.class_names == ["cat", "dog", "eel"]
    assert src.keys[:0] == [] and len(set(src.keys)) == 60
    assert [src.class_names[l] for l in src.labels] == [k.split("/")[0] for k in src.keys]
    # store order is a seeded permutation: not class-sorted, and stable
    assert list(src.labels[:20]) != sorted(src.labels[:20])
    assert open_source(str(folder)).keys == src.keys
    rows = [3, 10, 59]
    for r, img in src.read(rows):
        assert np.asarray(img)[0, 0, 0] == int(src.keys[r].split("/")[1][:2]) * 10 + src.labels[r]


def test_bad_image_names_source_and_key(folder):
    (folder / "dog" / "05.png").write_bytes(b"not a png at all")
    src = open_source(str(folder))
    bad_row = src.keys.index("dog/05.png")
    spec = AugSpec(img_size=8, mix_group=4)
    with pytest.raises(BadSampleError, match=r"imgs: dog/05.png: cannot read image"):
        render_views(src, spec, 0, [(0, bad_row)])
    v = render_views(src, spec, 0, [(0, bad_row), (0, (bad_row + 1) % 60)], skip_bad=True)
    assert v[0]["valid"] is False and v[0]["image"].abs().sum() == 0 and v[1]["valid"] is True


def test_webdataset_source_matches_folder_order(tmp_path):
    urls = []
    for s in range(3):
        path = tmp_path / f"shard-{s:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(7):
                for ext, data in (("png", _png(s * 7 + i)), ("cls", str((s + i) % 4).encode())):
                    info = tarfile.TarInfo(f"s{s}i{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))
        urls.append(path)
    src = open_source(str(tmp_path / "shard-{00..02}.tar"))
    assert len(src) == 21 and src.keys[0] == "shard-00/s0i0" and src.keys[20] == "shard-02/s2i6"
    assert src.labels.tolist() == [(s + i) % 4 for s in range(3) for i in range(7)]
    got = dict(src.read([2, 8, 9, 20]))  # across shards, sequential
    assert {r: np.asarray(img)[0, 0, 0] for r, img in got.items()} == {2: 2, 8: 8, 9: 9, 20: 20}
    same = open_source("::".join(str(u) for u in urls))
    assert same.keys == src.keys
    spec = AugSpec(img_size=8, mix_group=4, mixup=1.0)
    a = render_views(src, spec, 3, [(0, 9), (1, 20)])
    assert views_digest(a) == views_digest(render_views(same, spec, 3, [(0, 9), (1, 20)]))


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="no such"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SourceError, match="not a data source"):
        open_source(str(tmp_path / "f.txt"))
    with pytest.raises(SourceError, match="digits:test"):
        open_source("digits:test")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"))


def test_digits_splits(digits):
    val = open_source("digits:val")
    assert len(digits) == 1438 and len(val) == 359 and not set(digits.keys) & set(val.keys)
    assert open_source("digits:train").keys == digits.keys
    assert sorted(set(digits.labels.tolist())) == list(range(10))


# ---- canary and store.view ----------------------------------------------------------------------

def test_canary_and_store_view(digits, tmp_path, monkeypatch):
    st = create_view_store(tmp_path / "v.zarr", digits, SPEC, base_seed=7, epochs=3, k=3, chunk_rows=64, shard_rows=128)
    assert check_replay(td.open_store(st.path), digits).hash == SPEC.hash
    v = td.open_store(st.path).view(1, 31, "digits")
    ref = render_views(digits, SPEC, 7, [(1, 31)])[0]
    assert torch.equal(v.image, ref["image"]) and v.key == digits.keys[31] and v.lam == ref["lam"]
    assert v.to_pil().size == (24, 24)
    with pytest.raises(ReplayError, match="not the data"):
        check_replay(td.open_store(st.path), open_source("digits:val"))
    # the view code changes under the store (e.g. a library now flips differently): refused
    import tinydistill.augment as aug
    orig = aug.ViewMaker.base
    monkeypatch.setattr(aug.ViewMaker, "base", lambda self, img, seed: orig(self, img, seed + 1))
    with pytest.raises(ReplayError, match="canary views differ"):
        check_replay(td.open_store(st.path), digits)
    monkeypatch.setattr(aug.ViewMaker, "base", orig)
    # the stored spec is edited without its hash: refused
    import zarr
    g = zarr.open_group(str(st.path), mode="r+")
    g.attrs["augmentation"] = {**SPEC.to_dict(), "hflip": 0.0}
    with pytest.raises(ReplayError, match="does not match its hash"):
        check_replay(td.open_store(st.path), digits)
