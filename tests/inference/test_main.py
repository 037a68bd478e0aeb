"""python -m services.inference as a process: --load at start, health SERVING, /metrics, SIGTERM exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraflow.jobs.embedded_redis import free_port
from loraflow.jobs.registry import ArtifactRecord, Registry
from loraflow.storage.store import open_store
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from services.inference.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]


def test_process_loads_serves_and_stops_on_sigterm(tiny_artifact, redis_url, tmp_path):
    artifact_dir, manifest = tiny_artifact
    store_url = (tmp_path / "store").as_uri()
    uri = open_store(store_url).publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    Registry(redis.Redis.from_url(redis_url)).put_artifact(
        ArtifactRecord(artifact_id=manifest.artifact_id, uri=uri, base_model="tiny"))
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--listen", f"127.0.0.1:{port}", "--redis-url", redis_url,
         "--store-url", store_url, "--cache-dir", str(tmp_path / "cache"), "--metrics-port", str(metrics_port),
         "--load", f"{manifest.artifact_id}@cpu", "--num-threads", "1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, proc.stderr.read() if proc.poll() else status
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        chunks = list(stub.Generate(pb.GenerateRequest(model_id=manifest.artifact_id, prompt="the quick",
                                                       adapter="alpha", sampling=pb.SamplingParams(max_new_tokens=4))))
        assert chunks[-1].usage.completion_tokens >= 1
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        ttft_count = f'loraflow_inference_time_to_first_token_seconds_count{{model="{manifest.artifact_id}"}} 1.0'
        assert ttft_count in body
        assert 'adapter="alpha"' in body
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read()
    assert "request_finished" in log and '"request_id"' in log


def test_the_inference_service_imports_without_torch(tiny_llama):
    code = ("import sys; import services.inference.__main__, services.inference.server; "
            "from services.inference.tokenization import TextTokenizer; "
            f"TextTokenizer({str(tiny_llama)!r}).encode_chat('hi'); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
