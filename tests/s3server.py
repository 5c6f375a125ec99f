"""A real S3 API server on loopback for tests: moto's server mode in a subprocess on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on 127.0.0.1; ``endpoint`` is its URL. ``stop()`` kills it."""

    def __init__(self, **env):
        import tempfile

        self.port = free_port()
        # moto's request recorder (off until start_counting) writes here
        self.recording = os.path.join(tempfile.mkdtemp(prefix="moto-"), "requests.jsonl")
        env = {"MOTO_RECORDER_FILEPATH": self.recording, **env}
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {self.endpoint}")
                time.sleep(0.1)

    def env(self) -> dict:
        return {**ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in ENV.items()
                                                           if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket=name)

    def start_counting(self) -> None:
        """Record every request the server gets from now on (moto's recorder), forgetting earlier ones."""
        for action in ("reset-recording", "start-recording"):
            urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}",
                                                          method="POST"), timeout=10).read()

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of each request recorded since :meth:`start_counting`, in order."""
        import json
        from urllib.parse import urlparse

        data = urllib.request.urlopen(f"{self.endpoint}/moto-api/recorder/download-recording", timeout=10).read()
        out = []
        for line in data.decode().splitlines():
            if line.strip():
                entry = json.loads(line)
                u = urlparse(entry["url"])
                out.append((entry["method"], u.path + (f"?{u.query}" if u.query else "")))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
