"""What a GPU run sets up, checked on the CPU: the collectives' timeouts, the cuDNN / TF32 /
memory-layout defaults, and that they leave stored values unchanged."""

import pytest
import torch

import tinydistill.dist as dist_mod


@pytest.fixture
def fake_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist_mod.dist, "new_group", lambda **kw: seen.setdefault("gloo", kw))
    monkeypatch.setattr(dist_mod.dist, "get_backend", lambda *a: seen["backend"])
    monkeypatch.setattr(dist_mod, "active", lambda: False)
    monkeypatch.setattr(dist_mod, "_cpu_group", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("TINYDISTILL_DIST_TIMEOUT_S", "TINYDISTILL_NCCL_TIMEOUT_MIN"):
        monkeypatch.delenv(v, raising=False)
    return seen


def test_nccl_gets_a_short_timeout_and_gloo_barriers_the_long_one(fake_group, monkeypatch):
    dist_mod.setup("cuda")
    assert fake_group["backend"] == "nccl"
    assert fake_group["timeout"].total_seconds() == dist_mod.NCCL_TIMEOUT_MIN * 60 <= 3600
    dist_mod._objects_group()  # barriers and objects: a gloo group with the long timeout
    assert fake_group["gloo"]["backend"] == "gloo" and fake_group["gloo"]["timeout"].total_seconds() == dist_mod.TIMEOUT_S
    monkeypatch.setenv("TINYDISTILL_NCCL_TIMEOUT_MIN", "5")
    dist_mod.setup("cuda")
    assert fake_group["timeout"].total_seconds() == 300
    dist_mod.setup("cpu")  # gloo alone: the long timeout for everything
    assert fake_group["backend"] == "gloo" and fake_group["timeout"].total_seconds() == dist_mod.TIMEOUT_S
