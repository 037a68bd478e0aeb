"""The shared server bootstrap: error interceptor, health, reflection, graceful shutdown, helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraflow.errors import InvalidArgument, NotFound, ResourceExhausted
from loraflow.jobs.job_service import SERVICE_NAME
from loraflow.server.grpc_server import (
    GrpcServer,
    error_info,
    from_timestamp,
    parse_listen,
    run_until_signal,
    to_timestamp,
)
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


class FaultyJobs(jobs_pb2_grpc.JobServiceServicer):
    """Raises what the request asks for, to exercise the interceptor on unary and streaming RPCs."""

    def GetJob(self, request, context):
        if request.job_id == "crash":
            raise RuntimeError("secret /etc/shadow details")
        if request.job_id == "abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "servicer aborted itself")
        if request.job_id == "full":
            raise ResourceExhausted("queue full", metadata={"limit": 3})
        if request.job_id == "huge":
            raise InvalidArgument("bad " + "x" * 100_000, field="job_id", value="x" * 100_000)
        if request.job_id == "slow":
            time.sleep(1.0)
        return jobs_pb2.Job(id=request.job_id)

    def WatchJob(self, request, context):
        yield jobs_pb2.JobEvent(job_id=request.job_id, seq=1)
        if request.job_id == "crash":
            raise KeyError("internal detail")
        raise NotFound("gone", field="job_id", value=request.job_id)


@pytest.fixture
def server():
    srv = GrpcServer("127.0.0.1:0", [SERVICE_NAME], max_workers=4)
    srv.add(jobs_pb2_grpc.add_JobServiceServicer_to_server, FaultyJobs())
    srv.start()
    yield srv
    srv.stop(0).wait()


@pytest.fixture
def channel(server):
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


def _error(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_unexpected_exceptions_become_internal_with_a_correlation_id(channel, caplog):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    err = _error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="crash"), timeout=5))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.details() and "Traceback" not in err.details()
    cid = error_info(err).metadata["correlation_id"]
    assert cid in err.details()
    assert any(cid in r.getMessage() and r.exc_info for r in caplog.records)


def test_loraflow_errors_map_to_codes_with_error_info(channel):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    err = _error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="full"), timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(err)
    assert (info.reason, info.domain, dict(info.metadata)) == ("RESOURCE_EXHAUSTED", "loraflow", {"limit": "3"})
    err = _error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="huge"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 2000
    assert error_info(err).metadata["field"] == "job_id"
    err = _error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="abort"), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and err.details() == "servicer aborted itself"


def test_streaming_errors_are_mapped_after_partial_output(channel):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    for job_id, code in [("crash", grpc.StatusCode.INTERNAL), ("x", grpc.StatusCode.NOT_FOUND)]:
        stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=5)
        assert next(stream).seq == 1
        err = _error(lambda s=stream: next(s))
        assert err.code() == code
        assert error_info(err).domain == "loraflow"


def test_health_and_reflection(server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ["", SERVICE_NAME]:
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    server.set_serving(False)
    resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_health_check_answers_while_every_unary_thread_is_busy(server, channel):
    # The fixture's server has 4 unary threads; 8 slow GetJobs hold all of them (and queue 4 more).
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    slow = [stub.GetJob.future(jobs_pb2.GetJobRequest(job_id="slow"), timeout=10) for _ in range(8)]
    time.sleep(0.3)
    with grpc.insecure_channel(server.address) as fresh:
        started = time.monotonic()
        resp = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 0.5  # not queued behind the slow calls (each takes 1 s)
    assert [f.result().id for f in slow] == ["slow"] * 8


def test_graceful_shutdown_finishes_in_flight_rpcs(server, channel):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stop = threading.Event()
    stopped_workers = []
    runner = threading.Thread(target=run_until_signal, args=(server,),
                              kwargs={"on_shutdown": [lambda: stopped_workers.append(True)], "grace": 5,
                                      "stop_event": stop, "signals": (), "not_serving_delay": 0.6})
    runner.start()
    slow = stub.GetJob.future(jobs_pb2.GetJobRequest(job_id="slow"), timeout=10)
    time.sleep(0.3)  # the slow RPC is in flight
    stop.set()
    time.sleep(0.1)
    # Health says NOT_SERVING while the server still answers (the not_serving_delay window).
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    assert slow.result().id == "slow"
    runner.join(10)
    assert not runner.is_alive() and stopped_workers == [True]
    err = _error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="late"), timeout=2))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


SERVE_SCRIPT = """
import sys, pathlib
from loraflow.server.grpc_server import GrpcServer, run_until_signal
from loraflow.jobs.job_service import SERVICE_NAME
srv = GrpcServer("127.0.0.1:0", [SERVICE_NAME])
port = srv.start()
marker = pathlib.Path(sys.argv[1])
print(port, flush=True)
run_until_signal(srv, on_shutdown=[lambda: marker.write_text("workers stopped")], grace=2)
print("bye", flush=True)
"""


def test_sigterm_stops_the_process_cleanly(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(marker)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                        timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stdout.read().strip() == "bye"
        assert marker.read_text() == "workers stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("listen, expected", [("127.0.0.1:50051", ("127.0.0.1", 50051)),
                                              ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:80", ("::1", 80))])
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["", "50051", ":50051", "host:port", "h:70000", "h:-1"])
def test_parse_listen_rejects(listen):
    with pytest.raises(InvalidArgument) as info:
        parse_listen(listen)
    assert info.value.field == "listen"


def test_timestamps_round_trip():
    now = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert from_timestamp(to_timestamp(now)) == now
    assert from_timestamp(to_timestamp(now.timestamp())) == now
    assert to_timestamp(None) is None
    assert from_timestamp(to_timestamp(datetime(2024, 1, 1))) == datetime(2024, 1, 1, tzinfo=UTC)
