"""pipelines/gpu_check.py without running it: options, progress-bar rates, machine load, the table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))
gpu_check = pytest.importorskip("gpu_check")
benchlib = pytest.importorskip("benchlib")


def test_presets_and_overrides(tmp_path):
    a = gpu_check.parse_args([])
    assert (a.device, a.images, a.teacher, a.epochs, a.img_size, a.render_rows) == \
        ("cuda", 8192, "clip-vit-l14", 4, None, 1024)
    s = gpu_check.parse_args(["--device", "cpu", "--smoke", "--images", "64", "--out", str(tmp_path / "r.json")])
    assert (s.device, s.images, s.teacher, s.img_size, s.min_s) == ("cpu", 64, "test_vit", 64, 2.0)


def _bar(desc, t0, counts, total, dt=0.1, unit=""):
    return [(t0 + i * dt, f"{desc}: {int(100 * n / total):3d}%|##  | {n}{unit}/{total}{unit} [00:01<00:02, 5.0it/s]")
            for i, n in enumerate(counts)]


def test_steady_rate_from_progress_bars():
    lines = [(0.0, "tinydistill: created store")]
    lines += _bar("epoch 1/2", 1.0, [0, 1, 2, 3, 4], 4)  # warm-up epoch: left out
    lines += _bar("epoch 2/2", 10.0, [0, 1, 2, 3, 4, 4], 4, dt=0.5)  # final count repeated after the read-back
    bars = gpu_check.progress(lines)
    assert list(bars) == ["epoch 1/2", "epoch 2/2"]
    rate, windows = gpu_check.steady_rate(bars, skip_first=True)
    assert windows == [(10.5, 12.5)] and rate == pytest.approx(3 / 2.0)
    # scaled counts (tqdm unit_scale) and a first update far into the bar (queued ahead): no window
    k = [(1.0 + i, f"gen-logits (1 rank(s)): 50%|#  | {n}/8.19k [00:01<00:01, 2.0kview/s]") for i, n in
         enumerate(["4.10k", "6.00k", "8.19k"])]
    assert gpu_check.steady_rate(gpu_check.progress(k)) == (None, [])
    assert gpu_check.steady_rate(gpu_check.progress(k), start_frac=0.25) == (pytest.approx(4090 / 2), [(1.0, 3.0)])
    assert gpu_check.progress(k)["gen-logits (1 rank(s))"][-1][1] == pytest.approx(8190)


def test_machine_sampler_windows():
    m = benchlib.MachineSampler()
    m.ncpu = 4
    m.cpu = [(0.0, 0, 0), (1.0, 2, 4), (2.0, 6, 8), (3.0, 6, 12)]  # (t, busy, total)
    assert m.cores_busy() == pytest.approx(6 / 12 * 4)
    assert m.cores_busy([(0.5, 2.5)]) == pytest.approx(4 / 4 * 4)
    assert m.cores_busy([(0.5, 1.5)]) == pytest.approx(6 / 8 * 4)  # one sample inside: the ones around it
    assert m.gpu_util() is None


def _check(tmp_path, device, res):
    c = gpu_check.Check(gpu_check.parse_args(["--device", device, "--work-dir", str(tmp_path / "w"),
                                              "--out", str(tmp_path / "r.json")]))
    c.res.update(res)
    c.ok.update(n for n, s in res["stages"].items() if s["ok"])
    return c


def test_table_and_exit_status(tmp_path, capsys):
    res = {"stages": {"gen-logits": {"ok": True}, "verify": {"ok": True}},
           "teacher_forward": {"eager": {"per_s": 2000.0}, "compiled": {"per_s": 2400.0}},
           "gen": {"views_per_s": 2300.0, "cores_busy": 3.5, "gpu_util": 97.0},
           "verify": {"topk_id_agreement": 1.0, "max_abs_logp_diff": 0.0},
           "student_step": {"per_s": 7000.0},
           "train": {"offline": {"img_per_s": 6500.0, "cores_busy": 3.0, "gpu_util": 95.0},
                     "no-kd": {"img_per_s": 6600.0, "cores_busy": 3.0, "gpu_util": 95.0},
                     "online": {"img_per_s": 1800.0, "cores_busy": 5.0, "gpu_util": 99.0}},
           "ops_per_view": 4.0}
    c = _check(tmp_path, "cuda", res)
    rows = {r["figure"]: r for r in gpu_check.figures(c)}
    assert rows["gen-logits / compiled forward"]["status"] == "pass"
    assert rows["offline / no-KD"]["text"] == "0.985" and rows["offline / no-KD"]["status"] == "pass"
    assert rows["CPU cores busy per GPU, train online"]["status"] == "FAIL"
    assert rows["verify (ids agree, max |d log-prob|)"]["status"] == "pass"
    assert gpu_check.finish(c) == 2  # every stage ran, a target missed
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["ops_per_view"] == 4.0 and out["missed_targets"] == ["CPU cores busy per GPU, train online"]
    assert out["syncs_per_step"] is None and out["syncs_per_unit"] is None  # keys always present
    # on the CPU nothing is judged; a failed stage gives status 1 and its figures print as '-'
    res2 = {"stages": {"gen-logits": {"ok": False, "error": "boom"}}}
    c = _check(tmp_path, "cpu", res2)
    rows = {r["figure"]: r for r in gpu_check.figures(c)}
    assert rows["gen-logits (views/s)"]["text"] == "-" and rows["offline / online"]["status"] == "n/a"
    assert gpu_check.finish(c) == 1
    assert "n/a" in capsys.readouterr().out


def test_compile_falls_back_to_eager_without_a_compiler(tmp_path, monkeypatch, capsys):
    """No C compiler (or no Python.h): one line says so, gen-logits runs without --compile,
    the compiled forward is not timed, and the JSON records which ran."""
    args = ["--device", "cpu", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")]
    c = gpu_check.Check(gpu_check.parse_args(args))
    if c.compile:  # this machine can compile: the flag reaches the command line
        assert "--compile" in gpu_check.gen_args(c) and c.res["compile"]["ran"] == "compiled"
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    c = gpu_check.Check(gpu_check.parse_args(args))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("compile:")]
    assert len(line) == 1 and "no C compiler (cc, gcc, clang)" in line[0] and "eager" in line[0]
    assert not c.compile and "--compile" not in gpu_check.gen_args(c)
    assert c.res["compile"] == {"requested": True, "ran": "eager", "why": "no C compiler (cc, gcc, clang) on PATH"}
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-include")})
    assert "Python headers" in gpu_check.compile_missing()
    monkeypatch.setenv("CC", "my-cc")
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.compile_missing() == "no C compiler (my-cc) on PATH"
    c = gpu_check.Check(gpu_check.parse_args(args + ["--gen-eager"]))  # asked for eager: no line, no reason
    assert c.res["compile"] == {"requested": False, "ran": "eager", "why": None}


def test_bad_photos_one_unreadable_one_cmyk(tmp_path):
    import io

    from PIL import Image

    from tinydistill.sources import BadSampleError, open_source

    good = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 60)).save(good, format="JPEG", quality=90)
    names = gpu_check.add_bad_photos(tmp_path / "c0", good.getvalue())
    with Image.open(tmp_path / "c0" / names["cmyk"]) as im:
        assert im.mode == "CMYK"
    src = open_source(str(tmp_path))
    got = dict(src.read(range(len(src))))
    bad = [src.keys[r] for r, v in got.items() if isinstance(v, BadSampleError)]
    assert len(got) == 2 and len(bad) == 1 and bad[0].endswith(names["truncated"])


def test_sync_counter_on_the_cpu_reads_the_upload_counter():
    """On the CPU the sync figures are render_torch.UPLOADS' copies, per thread."""
    import numpy as np

    from tinydistill import render_torch

    with gpu_check.SyncCounter(cuda=False) as s:
        before = s.count("MainThread")
        render_torch.upload(np.zeros(3), device="cpu")
        assert s.count("MainThread") == before + 1
    assert gpu_check._per([5, 5, 5, 5]) == 0.0 and gpu_check._per([2, 4, 6]) == 2.0 and gpu_check._per([1]) is None
