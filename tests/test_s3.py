"""Against a real S3 API server (moto's server mode on loopback, through s3fs): stores and
webdataset shards on s3://, in DataLoader workers, and the errors a user can cause."""

import json
import subprocess
import sys

import numpy as np
import pytest

import tinydistill as td
from conftest import random_teacher

GEN = ["--data", "digits", "--teacher", "test_resnet", "--teacher-input-size", "32", "--epochs", "1",
       "--img-size", "32", "--mix-group", "64", "--chunk-rows", "128", "--shard-rows", "256",
       "--k", "5", "--mixup", "0.8", "--cutmix", "1.0", "--no-progress", "--batch-size", "64"]
TRAIN = ["--student", "test_vit", "--batch-size", "64", "--lr", "5e-4", "--no-progress", "--epochs", "1",
         "--warmup-epochs", "0.2"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinydistill", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_teacher(tmp_path_factory.mktemp("w") / "teacher.pth", 10)


@pytest.mark.slow
def test_store_on_s3_trains_with_workers(s3, weights, tmp_path):
    url = f"{s3}/k.zarr"
    p = cli("gen-logits", *GEN, "--teacher-weights", weights, "--workers", "1", "--out", url)
    assert p.returncode == 0, p.stderr
    p = cli("train-student", "--data", "digits", *TRAIN, "--logits", url, "--workers", "2", "--out", str(tmp_path / "t"))
    assert p.returncode == 0, p.stderr
