import dataclasses
import json
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
from helpers import per_view
from tinydistill.augment import AugSpec, SpecError
from tinydistill.params import Policy
from tinydistill.render_pil import _posterize, render_base
from tinydistill.generate import create_view_store
from tinydistill.replay import check_replay, views_digest
from tinydistill.sources import BadSampleError, SourceError, open_source
from tinydistill.stream import Item, ViewStream
from tinydistill.views import ReplayError, Views, render_views

SPEC = AugSpec(img_size=24, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0,
               mix_group=32, interpolation="random")
PROBE = [(0, 0), (0, 7), (0, 300), (1, 31), (1, 32), (1, 1437), (2, 640)]


@pytest.fixture(scope="module")
def digits():
    return open_source("digits")


def _by_view(batches):
    return {(v["epoch"], v["row"]): (v["image"], v["partner"], v["lam"]) for b in batches for v in per_view(b)}


def _items(rows_by_epoch, batch):
    return [Item(e, np.asarray(rows), batch) for e, rows in rows_by_epoch]


def test_views_identical_across_workers_batches_and_items(digits):
    ref = {(e, r): (v["image"], v["partner"], v["lam"])
           for (e, r), v in zip(PROBE, per_view(render_views(digits, SPEC, 7, PROBE)))}
    rng = np.random.default_rng(0)
    for workers, batch, cut in [(0, 16, 128), (1, 5, 64), (3, 64, 300), (2, 7, 1)]:
        items = []
        for e in range(3):  # the probes inside items of other sizes, other neighbours, other orders
            rows = rng.permutation(len(digits))
            items += [Item(e, rows[i:i + cut], batch) for i in range(0, len(rows), cut)
                      if any((e, int(r)) in ref for r in rows[i:i + cut])]
        got = _by_view(DataLoader(ViewStream(Views(digits, SPEC, 7), items), batch_size=None, num_workers=workers))
        for key in PROBE:
            img, partner, lam = got[key]
            assert torch.equal(img, ref[key][0]), (workers, batch, cut, key)
            assert (partner, lam) == ref[key][1:], (workers, batch, cut, key)


def test_stream_yields_items_in_order_whatever_the_workers(digits):
    items = _items([(0, range(i, i + 10)) for i in range(0, 200, 10)], batch=10)
    runs = []
    for workers in (0, 1, 3):
        batches = list(DataLoader(ViewStream(Views(digits, AugSpec(img_size=8, mix_group=4), 0), items),
                                  batch_size=None, num_workers=workers))
        runs.append([b.row.tolist() for b in batches])
        assert {b.worker for b in batches} == set(range(max(workers, 1)))  # every worker rendered
    assert runs[0] == runs[1] == runs[2] == [list(range(i, i + 10)) for i in range(0, 200, 10)]


@pytest.mark.slow
def test_records_and_pixels_same_in_a_fresh_process_and_render_twice_same_pixels(digits):
    views = Views(digits, SPEC, 7)
    recs = [views.render(e, [r], with_params=True).params[0].to_dict() for e, r in PROBE]
    code = (
        "import json; from tinydistill.augment import AugSpec; from tinydistill.sources import open_source;"
        "from tinydistill.views import Views, render_views; from tinydistill.replay import views_digest;"
        f"spec = AugSpec.from_dict({SPEC.to_dict()!r}); src = open_source('digits'); v = Views(src, spec, 7);"
        f"print(json.dumps([v.render(e, [r], with_params=True).params[0].to_dict() for e, r in {PROBE!r}]));"
        f"print(views_digest(render_views(src, spec, 7, {PROBE!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    records, digest = out.stdout.strip().splitlines()
    assert json.loads(records) == json.loads(json.dumps(recs))
    assert digest == views_digest(render_views(digits, SPEC, 7, PROBE))
    # a record rendered twice gives the same pixels; the record alone decides them
    img = next(iter(digits.read([300])))[1]
    p = views.render(0, [300], with_params=True).params[0]
    assert torch.equal(render_base(img, p, 24), render_base(img, p, 24))
    q = dataclasses.replace(p, hflip=not p.hflip)
    assert not torch.equal(render_base(img, p, 24), render_base(img, q, 24))


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
    views = per_view(render_views(digits, SPEC, 7, [(0, r) for r in range(64)]))
    partner = {v["row"]: v["partner"] for v in views}
    mixed = [v for v in views if v["lam"] < 1.0]
    assert len(mixed) > 40  # mix_prob=1: nearly every view is mixed
    for v in mixed:
        assert v["partner"] != v["row"] and v["partner"] // 32 == v["row"] // 32  # inside its group
        assert v["partner_label"] == digits.labels[v["partner"]]
    # pairing is symmetric (a <-> b) within each epoch, and differs between epochs
    pairs = {r: p for r, p in partner.items() if p != r}
    assert all(pairs.get(p, r) == r for r, p in pairs.items())
    other = per_view(render_views(digits, SPEC, 7, [(1, r) for r in range(64)]))
    assert [v["partner"] for v in other] != [v["partner"] for v in views]
    # lambda comes from the view's own seed: the same whoever else is in the batch
    again = per_view(render_views(digits, SPEC, 7, [(0, 5)]))[0]
    assert again["lam"] == views[5]["lam"] and again["partner"] == views[5]["partner"]
    # a mixed image really is a blend (mixup) or a paste (cutmix) of the two base views
    nomix = AugSpec.from_dict({**SPEC.to_dict(), "mixup": 0.0, "cutmix": 0.0})
    base = {v["row"]: v["image"] for v in per_view(render_views(digits, nomix, 7, [(0, r) for r in range(32)]))}
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
    # rand-m9-mstd0.5 draws 0 bits now and then; the renderer makes it black instead of raising
    views = Views(open_source("digits"), AugSpec(img_size=8, auto_augment="rand-m10-mstd0.5-inc1", mix_group=4), 0)
    rows = range(400)
    recs = [views.params(0, r, (8, 8)) for r in rows]
    zero = [r for r, p in zip(rows, recs) if any(o.name == "PosterizeIncreasing" and o.args == (0,) for o in p.ops)]
    assert zero
    views.render(0, zero[:3])


def test_records_follow_the_spec(digits):
    """Every spec field changes the records it should, and nothing else."""
    base = AugSpec(img_size=32, color_jitter=None, hflip=0.0, mix_group=32)

    def recs(**kw):
        v = Views(digits, dataclasses.replace(base, **kw), 3)
        return [v.params(0, r, (40, 30)) for r in range(64)]

    plain = recs()
    assert all(not p.hflip and not p.vflip and not p.ops and p.jitter is None and not p.erase and p.mix == "none"
               for p in plain)
    assert {p.interpolation for p in plain} == {"bicubic"}
    assert {p.interpolation for p in recs(interpolation="random")} == {"bilinear", "bicubic"}
    # crops: inside the source image, area within scale (up to rounding), ratio honoured
    for p in recs(scale=(0.5, 0.5), ratio=(1.0, 1.0)):
        t, l, h, w = p.crop
        assert 0 <= t and t + h <= 30 and 0 <= l and l + w <= 40 and abs(h * w - 600) < 60 and abs(h - w) <= 1
    assert all(p.crop == (0, 0, 30, 40) for p in recs(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3)))
    flips = [p.hflip for p in recs(hflip=0.5)]
    assert 10 < sum(flips) < 54 and all(p.vflip for p in recs(vflip=1.0))
    jit = recs(color_jitter=0.4)
    assert all(0.6 <= p.jitter["brightness"] <= 1.4 and sorted(p.jitter["order"]) == ["brightness", "contrast", "saturation"]
               for p in jit)
    assert all(p.jitter is None for p in recs(color_jitter=0.4, auto_augment="rand-m9"))  # timm: off under AA
    # RandAugment: 2 layers at prob 0.5, magnitudes from mstd around m, args from timm's level functions
    ra = recs(auto_augment="rand-m9-mstd0.5-inc1")
    n_ops = [len(p.ops) for p in ra]
    assert max(n_ops) == 2 and 0.6 < np.mean(n_ops) < 1.4
    mags = [o.magnitude for p in ra for o in p.ops]
    assert 0 <= min(mags) and max(mags) <= 10 and 8 < np.mean(mags) < 10 and np.std(mags) > 0.2
    assert all(o.magnitude == 9 for p in recs(auto_augment="rand-m9-inc1") for o in p.ops)
    rot = [o for p in recs(auto_augment="rand-m9-mstd0.5-n4") for o in p.ops if o.name == "Rotate"]
    assert rot and all(abs(o.args[0]) == pytest.approx(o.magnitude * 3) for o in rot)
    assert {np.sign(o.args[0]) for o in rot} == {-1, 1} and all(o.resample in ("bilinear", "bicubic") for o in rot)
    assert all(o.resample == "bicubic" for p in recs(auto_augment="rand-m9-n4") for o in p.ops if o.name == "Rotate")
    aa = recs(auto_augment="original")
    assert all(len(p.ops) <= 2 for p in aa) and any(p.ops for p in aa)
    mix = recs(auto_augment="augmix-m5-w3")
    assert all(len(p.augmix["chains"]) == 3 and abs(sum(p.augmix["weights"]) - 1) < 1e-5 for p in mix)
    # erasing on the output image, up to re_count boxes
    er = recs(re_prob=1.0, re_count=3, re_mode="rand")
    assert all(1 <= len(p.erase) <= 3 and p.erase_mode == "rand" for p in er)
    assert all(t + h <= 32 and l + w <= 32 for p in er for t, l, h, w in p.erase)
    assert not any(p.erase for p in recs(re_prob=0.0))
    # mixing: partner in the group, lam from Beta, cutmix box consistent with lam
    mx = recs(mixup=0.8, cutmix=1.0)
    assert {p.mix for p in mx} == {"mixup", "cutmix"}
    for p in mx:
        assert p.partner // 32 == p.row // 32 and p.partner != p.row and 0 < p.lam < 1
        if p.mix == "cutmix":
            assert p.lam == pytest.approx(1 - p.box[2] * p.box[3] / 32 ** 2)
    assert {p.mix for p in recs(cutmix=1.0)} == {"cutmix"} and {p.mix for p in recs(mixup=1.0)} == {"mixup"}
    assert sum(p.mix != "none" for p in recs(mixup=1.0, mix_prob=0.3)) < 40
    with pytest.raises(SpecError, match="re_mode"):
        AugSpec(re_mode="noise")


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
        Policy(AugSpec(auto_augment="nonsense-m9"))


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
    v = per_view(render_views(src, spec, 0, [(0, bad_row), (0, (bad_row + 1) % 60)], skip_bad=True))
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
    assert check_replay(td.open_store(st.path), digits).hash == SPEC.for_device("cpu").hash
    v = td.open_store(st.path).view(1, 31, "digits")
    ref = per_view(render_views(digits, SPEC, 7, [(1, 31)]))[0]
    assert torch.equal(v.image, ref["image"]) and v.key == digits.keys[31] and v.lam == ref["lam"]
    assert v.to_pil().size == (24, 24)
    assert v.params.row == 31 and v.params.src_size == (8, 8) and v.params.partner == v.partner
    with pytest.raises(ReplayError, match="not the data"):
        check_replay(td.open_store(st.path), open_source("digits:val"))
    # the view code changes under the store (e.g. a library now flips differently): refused
    import tinydistill.render_pil as rp
    orig = rp.render_base
    monkeypatch.setattr(rp, "render_base", lambda img, p, size: orig(img, dataclasses.replace(p, hflip=not p.hflip), size))
    with pytest.raises(ReplayError, match="canary views differ"):
        check_replay(td.open_store(st.path), digits)
    monkeypatch.setattr(rp, "render_base", orig)
    # the stored spec is edited without its hash: refused
    import zarr
    g = zarr.open_group(str(st.path), mode="r+")
    g.attrs["augmentation"] = {**SPEC.to_dict(), "hflip": 0.0}
    with pytest.raises(ReplayError, match="do not match their hash"):
        check_replay(td.open_store(st.path), digits)


def test_store_of_view_format_1_is_refused_with_its_version(digits, tmp_path):
    import zarr

    st = create_view_store(tmp_path / "old.zarr", digits, SPEC, base_seed=7, epochs=2, k=3)
    assert td.open_store(st.path).attrs["view_format"] == 2
    g = zarr.open_group(str(st.path), mode="r+")
    del g.attrs["view_format"]  # what tinydistill 0.1 wrote
    old = td.open_store(st.path)
    assert old.num_rows == len(digits)  # its arrays stay readable
    with pytest.raises(ReplayError, match="view format 1 .* renders view format 2"):
        check_replay(old, digits)
    with pytest.raises(ReplayError, match="view format 1"):
        old.view(0, 0, "digits")


def test_inspect_prints_records(digits, tmp_path):
    from click.testing import CliRunner

    from tinydistill.cli import main

    st = create_view_store(tmp_path / "p.zarr", digits, SPEC, base_seed=7, epochs=2, k=3)
    r = CliRunner().invoke(main, ["inspect", str(st.path), "--params", "3", "--data", "digits", "--epoch", "1"])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("(1,")]
    assert len(lines) == 3 and all("crop" in l for l in lines) and "(1,1437)" in lines[-1]
    assert lines[0] == td.open_store(st.path).view(1, 0, "digits").params.summary()
    r = CliRunner().invoke(main, ["inspect", str(st.path), "--json", "--params", "2", "--data", "digits"])
    recs = [json.loads(l) for l in r.output.splitlines()[1:]]
    assert r.exit_code == 0 and [p["row"] for p in recs] == [0, 1437] and "ops" in recs[0]
    r = CliRunner().invoke(main, ["inspect", str(st.path), "--params", "2"])
    assert r.exit_code != 0 and "--params needs --data" in r.output


def test_store_without_a_later_spec_field_still_replays(digits, tmp_path):
    """A field added to AugSpec later (with its default) does not invalidate older stores."""
    import zarr

    from tinydistill._util import spec_hash

    st = create_view_store(tmp_path / "o.zarr", digits, SPEC, base_seed=7, epochs=2, k=3)
    g = zarr.open_group(str(st.path), mode="r+")
    older = {k: v for k, v in g.attrs["augmentation"].items() if k != "renderer"}
    g.attrs.update({"augmentation": older, "spec_hash": spec_hash(older)})
    assert check_replay(td.open_store(st.path), digits).renderer is None  # replays, as pil
