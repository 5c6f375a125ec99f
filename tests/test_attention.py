"""Attention maps: the definition (ViT class-token attention, CNN feature energy), the stored
code, the store's target kinds, and the maps through gen-logits, verify, the notebook and the
student's loss, offline and online."""

import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

import tinydistill as td
from helpers import fake_topk
from tinydistill.attention import AttentionError, AttentionTap, area_resize
from tinydistill.cli import main
from tinydistill.errors import StoreError
from tinydistill.kinds import Attention


def _maps(model, grid, x):
    tap = AttentionTap(model, grid)
    model(x)
    return tap.pop()


# ---- the definition -------------------------------------------------------------------------------

def test_vit_map_is_the_class_token_attention_with_fused_attention_on():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()  # 4 x 4 patches
    x = torch.randn(3, 3, 64, 64)
    for blk in model.blocks:
        blk.attn.fused_attn = True  # scaled_dot_product_attention: the weights are never formed
    with torch.no_grad():
        got = _maps(model, 4, x)
    # the weights themselves, from timm's unfused path: the input of attn_drop is softmax(q k^T)
    seen = {}
    last = model.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("w", i[0]))
    with torch.no_grad():
        model(x)
    w = seen["w"].mean(1)[:, 0, 1:]  # heads averaged, the class token's row, patches only
    want = (w / w.sum(1, keepdim=True)).reshape(3, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum((1, 2)), torch.ones(3))


def test_maps_are_float32_under_autocast():
    """Under bf16 autocast (--amp bf16) the map is computed in float32 from the forward's own
    activations: for a ViT, the fp32 formula on the block's (bf16) qkv output, bit for bit; for
    a CNN, the fp32 energy of its (bf16) features."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=64, num_classes=10).eval()
    cnn = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    last = vit.blocks[-1].attn
    last.qkv.register_forward_hook(lambda m, i, o: seen.setdefault("qkv", o))
    cnn.global_pool.register_forward_pre_hook(lambda m, i: seen.setdefault("features", i[0]))
    vit_tap, cnn_tap = AttentionTap(vit, 4), AttentionTap(cnn, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        vit(x)
        cnn(x)
    got_vit, got_cnn = vit_tap.pop(), cnn_tap.pop()
    assert seen["qkv"].dtype == torch.bfloat16 and seen["features"].dtype == torch.bfloat16  # autocast ran
    qkv = seen["qkv"].float()
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, last.num_heads, -1)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    w = torch.softmax((q * last.scale) @ k.transpose(-2, -1), dim=-1).mean(1)[:, 0, 1:]
    assert got_vit.dtype == got_cnn.dtype == torch.float32
    assert torch.equal(got_vit, area_resize(w.reshape(b, 4, 4), 4))
    assert torch.equal(got_cnn, area_resize(seen["features"].float().pow(2).mean(1), 2))


def test_distillation_token_and_registers_are_not_patches():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10).eval()
    tap = AttentionTap(model, 2)
    assert tap.prefix == 2
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert tap.pop().shape == (2, 2, 2)
    reg = timm.create_model("test_vit", img_size=32, reg_tokens=4, num_classes=10)
    assert AttentionTap(reg, 2).prefix == 5


def test_cnn_map_is_the_energy_of_the_last_feature_map_resized_by_area():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got = _maps(model, 2, x)
        f = model.forward_features(x)  # [2, C, 4, 4]
    e = f.pow(2).mean(1)
    want = e.reshape(2, 2, 2, 2, 2).sum((2, 4))  # 2 x 2 blocks of the 4 x 4 map: area resize
    torch.testing.assert_close(got, want / want.sum((1, 2), keepdim=True))
    m = area_resize(torch.rand(1, 3, 3), 7)  # upsampling by area keeps the shape and the sum
    assert m.shape == (1, 7, 7) and abs(float(m.sum()) - 1) < 1e-6
    assert torch.equal(area_resize(torch.zeros(1, 4, 4), 2), torch.full((1, 2, 2), 0.25))  # no energy: uniform


def test_channels_last_models_give_the_energy_over_channels():
    torch.manual_seed(0)
    model = timm.create_model("test_mambaout", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = _maps(model, 2, x)
        f = model.forward_features(x)  # [2, H, W, C]
    torch.testing.assert_close(got, area_resize(f.pow(2).mean(3), 2))


def test_models_without_a_map_are_refused_in_one_line():
    vit = timm.create_model("test_vit", img_size=32, class_token=False, global_pool="avg", num_classes=10)
    with pytest.raises(AttentionError, match="without a class token"):
        AttentionTap(vit, 2, name="student x")
    with pytest.raises(AttentionError, match="yields no attention map"):
        AttentionTap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), 2)


def test_student_map_carries_gradients_to_the_last_block():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=10)
    tap = AttentionTap(model, 8)
    model(torch.randn(2, 3, 32, 32))
    loss = Attention(8).loss(tap.pop(), {"attention": torch.full((2, 8, 8), 1 / 64)})
    loss.backward()
    assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


# ---- the stored code ------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [7, 14])
def test_code_keeps_maps_within_one_percent_of_their_mass(grid):
    rng = np.random.default_rng(0)
    for scale in (0.5, 2, 4, 6):  # near uniform to peaky (largest cell ~0.02 to ~0.7)
        m = np.exp(rng.normal(size=(500, grid, grid)) * scale)
        m /= m.sum((1, 2), keepdims=True)
        back = Attention.from_codes(Attention.to_codes(m))
        assert np.allclose(back.sum((1, 2)), 1, atol=1e-5)
        assert np.abs(back - m).sum((1, 2)).max() <= 0.01
    assert np.isnan(Attention.from_codes(np.zeros((1, 2, 2), np.uint8))).all()  # no data


# ---- the store ------------------------------------------------------------------------------------

def _att_store(path, grid=4, **kw):
    return td.create_store(path, num_classes=10, k=3, epochs=1, keys=[f"k{i}" for i in range(40)],
                           chunk_rows=8, shard_rows=16, targets={"attention": {"grid": grid}}, **kw)


def test_store_keeps_maps_beside_the_logits(tmp_path):
    st = _att_store(tmp_path / "a.zarr")
    plain = td.create_store(tmp_path / "p.zarr", num_classes=10, k=3, epochs=1, keys=[f"k{i}" for i in range(40)],
                            chunk_rows=8, shard_rows=16)
    assert st.attrs["spec_hash"] != plain.attrs["spec_hash"]  # the maps are part of what the store is
    assert st.info["targets"]["attention"]["grid"] == 4 and "attention" not in plain.info["targets"]
    rng = np.random.default_rng(1)
    maps = rng.dirichlet(np.ones(16), size=16).reshape(16, 4, 4)
    logp, idx = fake_topk(16, 10, 3, 0)
    with pytest.raises(StoreError, match="missing attention"):
        st.write_shard(0, 0, logp, idx, np.arange(16))
    with pytest.raises(StoreError, match="unknown attention"):
        plain.write_shard(0, 0, logp, idx, np.arange(16), attention=maps)
    with pytest.raises(StoreError, match="finite, non-negative"):
        st.write_shard(0, 0, logp, idx, np.arange(16), attention=-maps)
    skip = np.arange(16) == 3
    st.write_shard(0, 0, logp, idx, np.arange(16), skipped=skip, attention=maps)
    got = td.open_store(st.path).attention(0, slice(0, 16))
    want = Attention.from_codes(Attention.to_codes(maps))
    np.testing.assert_array_equal(got[~skip], want[~skip])
    assert np.isnan(got[3]).all() and np.abs(got[~skip] - maps[~skip]).sum((1, 2)).max() < 0.01
    g = st._group["attention"]
    assert g.metadata.dimension_names == ("epoch", "row", "y", "x") and g.dtype == np.uint8
    with pytest.raises(StoreError, match="holds no attention maps"):
        plain.attention(0, [0])
    # a unit recorded complete whose maps are gone reads as corrupt, never as zeros
    import shutil

    shutil.rmtree(tmp_path / "a.zarr" / "attention" / "c")
    bad = td.open_store(st.path).check()
    assert len(bad) == 1 and "hold no data" in bad[0][2]


# ---- through the commands -------------------------------------------------------------------------

GEN = ["--data", "digits", "--teacher", "test_vit", "--teacher-input-size", "64", "--epochs", "1", "--img-size", "32",
       "--mix-group", "64", "--chunk-rows", "256", "--k", "5", "--cutmix", "1.0", "--no-progress",
       "--batch-size", "64", "--workers", "0", "--device", "cpu"]
STUDENT = ["--data", "digits", "--student", "test_vit", "--model-kwargs", "patch_size=4", "--model-kwargs", "depth=2",
           "--epochs", "1", "--batch-size", "64", "--workers", "0", "--device", "cpu", "--no-progress",
           "--log-interval", "1"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def vit_store(tmp_path_factory):
    """A 64-px ViT teacher (4 x 4 patches; weights of that size load) and its store with 4 x 4 maps."""
    d = tmp_path_factory.mktemp("att")
    torch.manual_seed(0)
    sd = timm.create_model("test_vit", img_size=64, num_classes=10).state_dict()
    sd["blocks.5.attn.qkv.weight"][:128] *= 4  # sharper queries and keys: a peaky map, unlike a random student's
    torch.save(sd, d / "t.pth")
    r = run("gen-logits", *GEN, "--teacher-weights", d / "t.pth", "--attention-grid", "4", "--out", d / "s.zarr")
    assert r.exit_code == 0, r.output
    return d


def test_gen_logits_stores_the_teachers_maps_and_verify_checks_them(vit_store):
    d = vit_store
    st = td.open_store(d / "s.zarr")
    assert st.kind("attention").grid == 4 and st.attrs["targets"]["topk"] == {"k": 5}
    # the stored maps are the teacher's, as coded: recompute a batch through the one teacher forward
    teacher = td.teachers.load_teacher("test_vit", str(d / "t.pth"), input_size=64).place("cpu", attention_grid=4)
    from tinydistill.views import Views

    core = Views(td.sources.open_source("digits"), st.spec, st.base_seed)
    batch = core.render(0, range(64))
    maps = teacher.targets(batch.image, st.kinds)["attention"].numpy()
    np.testing.assert_array_equal(st.attention(0, slice(0, 64)), Attention.from_codes(Attention.to_codes(maps)))
    r = run("verify", d / "s.zarr", "--data", "digits", "--teacher", "test_vit", "--teacher-weights", d / "t.pth",
            "--samples", "16", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[-1])["max_abs_attention_diff"] == 0.0
    # resuming with another grid is refused, naming it
    r = run("gen-logits", *GEN, "--teacher-weights", d / "t.pth", "--attention-grid", "2", "--out", d / "s.zarr")
    assert r.exit_code == 1 and "attention grid" in r.output and "Traceback" not in r.output


def test_verify_sees_a_changed_map(vit_store, tmp_path):
    import shutil

    shutil.copytree(vit_store / "s.zarr", tmp_path / "s.zarr")
    st = td.open_store(tmp_path / "s.zarr", mode="r+")
    a, b = st.shard_bounds(0)
    t = st.targets(0, slice(a, b))
    flipped = t["attention"][:, ::-1, :].copy()  # the same mass, in the wrong place
    st.write_shard(0, 0, t["logp"], t["index"], st.seeds(0, slice(a, b)), attention=flipped)
    r = run("verify", tmp_path / "s.zarr", "--data", "digits", "--teacher", "test_vit", "--teacher-weights",
            vit_store / "t.pth", "--samples", "16", "--device", "cpu")
    assert r.exit_code == 1 and "largest |delta attention|" in r.output
    r = run("verify", tmp_path / "s.zarr", "--data", "digits", "--teacher", "test_vit", "--teacher-weights",
            vit_store / "t.pth", "--samples", "16", "--device", "cpu", "--max-attention-diff", "1")
    assert r.exit_code == 0, r.output


def test_notebook_and_inspect_show_the_map_over_the_view(vit_store, tmp_path):
    st = td.open_store(vit_store / "s.zarr")
    v = st.view(0, 5, data="digits")
    np.testing.assert_array_equal(v.attention, st.attention(0, [5])[0])
    from PIL import Image
    import io

    ds = st.to_xarray(rows=slice(0, 10))
    assert ds["attention"].dims == ("epoch", "row", "y", "x")
    np.testing.assert_array_equal(ds["attention"].values[0], st.attention(0, slice(0, 10)))
    png = Image.open(io.BytesIO(v._repr_png_()))
    assert png.width > 2 * 160  # the view and the view under its map, side by side
    r = run("inspect", vit_store / "s.zarr", "--data", "digits", "--attention", tmp_path / "a.png", "--params", "3")
    assert r.exit_code == 0, r.output
    assert "4x4 maps" in r.output and "bytes/cell" in r.output and Image.open(tmp_path / "a.png").width > 900


def _steps(out):
    return [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]


def test_attention_loss_offline_equals_online_at_the_start(vit_store, tmp_path):
    d = vit_store
    r = run("train-student", *STUDENT, "--logits", d / "s.zarr", "--attention-weight", "1", "--out", tmp_path / "off")
    assert r.exit_code == 0, r.output
    r = run("train-student", *STUDENT, "--online-teacher", "test_vit", "--teacher-weights", d / "t.pth",
            "--teacher-input-size", "64", "--k", "5", "--like", d / "s.zarr", "--attention-weight", "1",
            "--out", tmp_path / "on")
    assert r.exit_code == 0, r.output
    r = run("train-student", *STUDENT, "--logits", d / "s.zarr", "--out", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    off, on, plain = _steps(tmp_path / "off"), _steps(tmp_path / "on"), _steps(tmp_path / "plain")
    assert len(off) == len(on) == 23
    # the same views, targets and maps up to the store's fp16 / uint8 rounding
    assert np.abs(np.array(off[:5]) - np.array(on[:5])).max() < 2e-3
    assert off[0] - plain[0] > 0.01  # the attention term is in the loss
    line = json.loads((tmp_path / "off" / "steps.jsonl").read_text().splitlines()[0])
    assert abs(line["loss"] - line["attention_loss"] - plain[0]) < 1e-4  # logged beside it: the same first step
    row = json.loads((tmp_path / "off" / "metrics.jsonl").read_text())
    assert 0 < row["train_attention_loss"] < row["train_loss"] and "attention_loss" not in json.loads(
        (tmp_path / "plain" / "steps.jsonl").read_text().splitlines()[0])


def test_attention_weight_is_refused_without_maps(vit_store, tmp_path):
    d = vit_store
    r = run("gen-logits", *GEN, "--teacher-weights", d / "t.pth", "--out", tmp_path / "plain.zarr")
    assert r.exit_code == 0, r.output
    cases = [
        (["--logits", tmp_path / "plain.zarr"], "holds no attention maps"),
        (["--logits", d / "s.zarr", "--model-kwargs", "class_token=False", "--model-kwargs", "global_pool=avg"],
         "student test_vit: a ViT without a class token"),
        (["--no-kd"], "needs a teacher's maps"),
        (["--logits", d / "s.zarr", "--attention-grid", "2"], "holds 4x4 maps"),
    ]
    for extra, message in cases:
        r = run("train-student", *STUDENT, *extra, "--attention-weight", "1", "--out", tmp_path / "x")
        assert r.exit_code == 1 and message in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_a_teacher_without_a_map_is_refused_before_the_store_exists(tmp_path):
    torch.save(timm.create_model("vit_wee_patch16_reg1_gap_256", img_size=32, num_classes=10).state_dict(),
               tmp_path / "gap.pth")
    args = [a if a != "test_vit" else "vit_wee_patch16_reg1_gap_256" for a in GEN]
    args[args.index("--teacher-input-size") + 1] = "32"
    r = run("gen-logits", *args, "--teacher-weights", tmp_path / "gap.pth", "--attention-grid", "2",
            "--out", tmp_path / "s.zarr")
    assert r.exit_code == 1 and "without a class token" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "s.zarr").exists()


def test_node_mirror_carries_the_maps(tmp_path, monkeypatch):
    """A store on object storage (memory:// stands in) is read through the node mirror: the
    maps come along with the logits, and only the epoch in use is downloaded."""
    from tinydistill import nodecache

    monkeypatch.setenv("TINYDISTILL_CACHE", str(tmp_path / "cache"))
    st = td.create_store(f"memory://td-att/{tmp_path.name}.zarr", num_classes=10, k=3, epochs=2,
                         keys=[f"k{i}" for i in range(16)], chunk_rows=8, shard_rows=16,
                         targets={"attention": {"grid": 2}})
    rng = np.random.default_rng(0)
    for e in range(2):
        logp, idx = fake_topk(16, 10, 3, e)
        st.write_shard(e, 0, logp, idx, np.arange(16), attention=rng.dirichlet(np.ones(4), 16).reshape(16, 2, 2))
    remote = td.open_store(st.path)
    assert nodecache.target_arrays(remote) == ("logp", "index_gap", "attention")
    mirror = nodecache.node_local(remote, 1)
    assert mirror.path != remote.path and not any(o.startswith("attention/c/0") for o in
                                                  nodecache.fetch_epoch(remote, 1)["objects"])
    for name, v in remote.targets(1, slice(None)).items():
        np.testing.assert_array_equal(mirror.targets(1, slice(None))[name], v)
