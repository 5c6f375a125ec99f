import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tinydistill
from tinydistill.cli import main

from helpers import fill


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_version_help_and_module_entry():
    r = run("--version")
    assert r.exit_code == 0 and tinydistill.__version__ in r.output
    assert "inspect" in run("--help").output
    p = subprocess.run([sys.executable, "-m", "tinydistill", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and tinydistill.__version__ in p.stdout


def test_inspect_text_json_and_plot(small_store, tmp_path):
    fill(small_store, epochs=[0])
    r = run("inspect", str(small_store.path))
    assert r.exit_code == 0, r.output
    assert "2 epochs x 1000 rows x K=5, 50 classes" in r.output
    assert "e0: 100%  e1: 0%" in r.output and "resnet18" in r.output and "bytes/view" in r.output
    r = run("inspect", str(small_store.path), "--json", "--plot", str(tmp_path / "p.png"), "--check")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["completed"] == [1.0, 0.0] and out["views_sampled"] == 1000
    assert 0 < out["mean_top1_prob"] <= out["mean_topk_mass"] <= 1.0001
    # labels are row % 50 and the fake teacher is random: agreement is near chance, not 0/1
    assert 0 <= out["top1_agreement"] < 0.2
    assert out["check"] == "ok" and out["bytes_per_view"] > 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_agreement_counts_label_matches(tmp_path):
    import numpy as np
    import tinydistill as td
    st = td.create_store(tmp_path / "a.zarr", num_classes=4, k=2, epochs=1, keys=list("abcd"), labels=[0, 1, 2, -1])
    # teacher top-1: 0, 1, 3, 2 -> agrees on rows 0 and 1, wrong on row 2, row 3 has no label
    st.write_shard(0, 0, np.log([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]]),
                   [[0, 1], [1, 0], [3, 2], [2, 1]], [0, 1, 2, 3])
    out = json.loads(run("inspect", str(st.path), "--json").output)
    assert out["top1_agreement"] == pytest.approx(2 / 3)
    assert out["mean_top1_prob"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.7) / 4, abs=1e-3)


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    lines = [l for l in r.output.strip().splitlines() if l.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0]


def test_errors_are_one_line(tmp_path, small_store):
    _one_line_error(run("inspect", str(tmp_path / "nope")), str(tmp_path / "nope"), "no such file")
    _one_line_error(run("inspect", str(tmp_path)), str(tmp_path), "not a tinydistill store")
    fill(small_store, epochs=[0])
    f = Path(small_store.path) / "logp" / "c" / "0" / "0" / "0"
    b = bytearray(f.read_bytes()); b[40] ^= 0xFF; f.write_bytes(bytes(b))
    _one_line_error(run("inspect", str(small_store.path)), str(small_store.path), "checksum")
    r = run("inspect", str(small_store.path), "--check")
    _one_line_error(r, "1 corrupt unit")
    assert "corrupt: epoch 0 shard 0" in r.output
    _one_line_error(run("inspect", str(small_store.path), "--max-views", "0"))


def test_console_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tinydistill", "inspect", str(tmp_path / "x.zarr")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"Error: {tmp_path / 'x.zarr'}: no such file or directory"]


def test_plot_names_least_sure_classes_and_follows_extension(tmp_path):
    """With many classes the third panel names the classes the teacher is least sure of; the
    file format follows the extension; an unknown extension is a one-line error."""
    import numpy as np
    import tinydistill as td

    c, n = 60, 600
    labels = np.arange(n) % c
    unsure = {7: 0.05, 13: 0.10, 42: 0.15}  # true-class probability of these classes
    names = [f"class_{i:02d}" for i in range(c)]
    st = td.create_store(tmp_path / "m.zarr", num_classes=c, k=2, epochs=1, keys=[f"k{i}" for i in range(n)],
                         labels=labels, class_names=names)
    p_true = np.array([unsure.get(int(y), 0.9) for y in labels])
    other = (labels + 1) % c
    st.write_shard(0, 0, np.log(np.stack([p_true, 0.95 - p_true], 1)), np.stack([labels, other], 1), np.arange(n))
    r = run("inspect", str(st.path), "--json", "--plot", str(tmp_path / "p.svg"))
    assert r.exit_code == 0, r.output
    worst = json.loads(r.output)["least_sure_classes"]
    assert [w["class"] for w in worst[:3]] == ["class_07", "class_13", "class_42"]
    assert worst[0]["mean_true_class_prob"] == pytest.approx(0.05, abs=1e-3)
    svg = (tmp_path / "p.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert all(f"class_{i:02d}" in svg for i in unsure)  # the least sure classes are named
    assert "where the teacher is least sure" in svg
    r = run("inspect", str(st.path), "--plot", str(tmp_path / "p.pdf"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    assert "least sure  class_07 (0.05), class_13 (0.10), class_42 (0.15)" in r.output
    _one_line_error(run("inspect", str(st.path), "--plot", str(tmp_path / "p.xyz")), "p.xyz", "png")
    _one_line_error(run("inspect", str(st.path), "--plot", str(tmp_path / "p")), "file extension")
    assert "format follows the extension" in " ".join(run("inspect", "--help").output.split())
