"""The limits are settings: each declared once with its flag, LORAFLOW_* variable, default and help; flags
win over the environment; a bad value is refused naming it; and a service process really applies them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from loraflow.errors import InvalidArgument
from loraflow.jobs.embedded_redis import free_port
from loraflow.security.limits import ServerLimits, env_name, flag_name
from loraflow.security.settings import SecuritySettings, add_security_arguments
from loraflow.server.grpc_server import error_info
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc
from tests.hardening.test_connections import closed_by_server, get
from tests.support.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_security_arguments(p)
    return p


def test_every_limit_has_a_flag_an_env_name_a_default_and_help():
    help_text = parser().format_help()
    for field in dataclasses.fields(ServerLimits):
        assert flag_name(field.name) in help_text and env_name(field.name) in help_text, field.name
        assert field.metadata["spec"].help, field.name
    described = {flag: (env, value) for flag, env, value, _ in ServerLimits().describe()}
    assert described["--max-request-bytes"] == ("LORAFLOW_MAX_REQUEST_BYTES", str(1 << 20))
    assert described["--http-header-timeout-s"] == ("LORAFLOW_HTTP_HEADER_TIMEOUT_S", "10")


def test_flags_win_over_the_environment_which_wins_over_defaults():
    env = {"LORAFLOW_MAX_REQUEST_BYTES": "65536", "LORAFLOW_GRPC_KEEPALIVE_S": "30",
           "LORAFLOW_MAX_CONCURRENT_STREAMS": "16"}
    settings = SecuritySettings.from_args(parser().parse_args(["--max-request-bytes", "8192"]), env=env)
    assert settings.limits.max_request_bytes == 8192 and settings.limits.grpc_keepalive_s == 30.0
    assert settings.max_concurrent_streams == 16
    assert settings.limits.http_max_connections == ServerLimits().http_max_connections


@pytest.mark.parametrize("argv", [["--max-request-bytes", "12"], ["--http-header-timeout-s", "x"],
                                  ["--max-streams-per-client", "-1"], ["--grpc-keepalive-s", "nan"]])
def test_a_bad_flag_is_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_a_bad_environment_value_names_its_variable():
    with pytest.raises(InvalidArgument) as info:
        SecuritySettings.from_args(parser().parse_args([]), env={"LORAFLOW_HTTP_MAX_CONNECTIONS": "lots"})
    assert info.value.field == "LORAFLOW_HTTP_MAX_CONNECTIONS"
    with pytest.raises(InvalidArgument) as info:
        SecuritySettings.from_args(parser().parse_args([]), env={"LORAFLOW_HTTP_MAX_CONNECTIONS": "2"})
    assert info.value.field == "http_max_connections" and "--http-max-connections" in info.value.message
    with pytest.raises(InvalidArgument):
        ServerLimits(max_request_bytes=True)  # a boolean is not a byte count


def test_a_service_process_applies_its_flags_and_environment(redis_url, tmp_path):
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFLOW_MAX_REQUEST_BYTES": "8192"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "api", "--listen", f"127.0.0.1:{grpc_port}", "--redis-url",
         redis_url, "--store-url", (tmp_path / "store").as_uri(), "--cache-dir", str(tmp_path / "cache"),
         "--metrics-port", str(metrics_port), "--http-header-timeout-s", "1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetJob(jobs_pb2.GetJobRequest(job_id="j" * 9000), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(info.value).metadata["limit_bytes"] == "8192"
        assert "--max-request-bytes" in info.value.details()
        wait_for(lambda: get(metrics_port, "/healthz") == 200, timeout=30)
        slow = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        assert closed_by_server(slow, within=8) and time.monotonic() - started < 8
        slow.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
