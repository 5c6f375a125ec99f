import json

import pytest
from click.testing import CliRunner

import tinydistill as td
from tinydistill.cli import main


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_keeps_artefacts(tmp_path):
    out = tmp_path / "qs"
    r = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--epochs", "1", "--teacher-epochs", "1",
                                  "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    for name in ("teacher", "student_no_kd", "student_offline_kd", "student_online_kd"):
        assert (out / name / "best.pth").exists() and (out / name / "metrics.jsonl").exists()
    st = td.open_store(out / "logits.zarr")
    assert st.completed().tolist() == [1.0] and st.k == 5 and st.teacher["name"] == "test_resnet"
    res = json.loads((out / "results.json").read_text())
    assert set(res["students"]) == {"no_kd", "offline_kd", "online_kd"}
    assert all(0 <= v <= 100 for v in res["students"].values())
    assert (out / "quickstart.png").read_bytes()[:4] == b"\x89PNG"
    assert "offline kd" in r.output and "val top-1" in r.output
