import numpy as np
import pytest

import tinydistill as td


@pytest.fixture
def small_store(tmp_path):
    """2 epochs x 1000 rows, 50 classes, K=5, 4 shards of 256 rows (chunks of 128)."""
    n = 1000
    return td.create_store(
        tmp_path / "s.zarr", num_classes=50, k=5, epochs=2,
        keys=[f"img{i:04d}" for i in range(n)], labels=np.arange(n) % 50,
        class_names=[f"class{c}" for c in range(50)], chunk_rows=128, shard_rows=256,
        teacher={"name": "resnet18", "weights_digest": "abc"}, augmentation={"img_size": 32},
    )


@pytest.fixture(autouse=True, scope="session")
def _tar_index_cache(tmp_path_factory):
    """Webdataset tar indexes go to a fresh cache, never the user's ~/.cache (subprocesses inherit it)."""
    import os

    os.environ["TINYDISTILL_CACHE"] = str(tmp_path_factory.mktemp("td_cache"))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 API server on 127.0.0.1 for the whole session."""
    from s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The S3 server's endpoint and test credentials in the environment (subprocesses inherit
    them), and a fresh bucket; yields ``s3://<bucket>``."""
    import re

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = "td-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    s3_server.make_bucket(bucket)
    yield f"s3://{bucket}"
