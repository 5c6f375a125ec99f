from pathlib import Path

import pytest
from click.testing import CliRunner

from tinydistill.cli import main

RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("command", ["gen-logits", "train-student"])
def test_recipes_load_for_both_stages(recipe, command):
    r = CliRunner().invoke(main, [command, "--config", str(recipe), "--help"])
    assert r.exit_code == 0, r.output


def test_recipe_values_reach_options_and_cli_wins(tmp_path, monkeypatch):
    import tinydistill.generate as gen
    seen = {}
    monkeypatch.setattr(gen, "gen_logits", lambda cfg: seen.setdefault("cfg", cfg) and {"rank": 1})
    f = tmp_path / "r.yaml"
    f.write_text("data: digits\nk: 7\naugmentation:\n  img_size: 48\n  mixup: 0.5\n"
                 "gen_logits:\n  teacher: test_resnet\n  out: x.zarr\n  batch_size: 9\n"
                 "train_student:\n  student: test_vit\n")
    r = CliRunner().invoke(main, ["gen-logits", "--config", str(f), "--k", "3", "--mixup", "0.25"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.k, cfg.batch_size, cfg.teacher, cfg.out) == (3, 9, "test_resnet", "x.zarr")
    assert cfg.spec.img_size == 48 and cfg.spec.mixup == 0.25


def test_recipe_errors_are_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data: digits\nbatchsize: 3\n")
    r = CliRunner().invoke(main, ["gen-logits", "--config", str(f)])
    assert r.exit_code == 2 and "unknown option(s) ['batchsize']" in r.output
    r = CliRunner().invoke(main, ["gen-logits", "--config", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "none.yaml" in r.output


def test_attention_recipe_reaches_both_stages(monkeypatch):
    import tinydistill.generate as gen
    import tinydistill.train as train

    seen = {}
    monkeypatch.setattr(gen, "gen_logits", lambda cfg: seen.setdefault("gen", cfg) and {"rank": 1})
    monkeypatch.setattr(train, "train_student", lambda cfg, **kw: seen.setdefault("train", cfg) and {"rank": 1})
    recipe = str(next(r for r in RECIPES if r.name == "deit_attention.yaml"))
    for command in ("gen-logits", "train-student"):
        r = CliRunner().invoke(main, [command, "--config", recipe])
        assert r.exit_code == 0, r.output
    assert seen["gen"].attention_grid == 14 and seen["gen"].teacher.startswith("deit_base")
    assert seen["train"].attention_weight == 0.1 and seen["train"].logits == seen["gen"].out
