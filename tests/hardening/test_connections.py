"""Class 3 of issue 20 and connection hygiene on every listener: slow-header, idle and half-open
connections, floods of unauthenticated calls and one client's many streams cannot take capacity that
health, readiness and authenticated callers need — on the inference HTTP API (uvicorn), the metrics and
health port, and the gRPC servers."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE
from loraflow.jobs.job_service import JobServiceServicer
from loraflow.jobs.queue import JobQueue
from loraflow.security.limits import ServerLimits
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc
from tests.hardening.conftest import tokens_file
from tests.hardening.probes import PROBE_BOUND_S, grpc_health_probe, http_probe
from tests.support.held_steps import steps_held_after_first
from tests.support.polling import wait_for

# Floods come from addresses of their own, as they would: the well-behaved callers (the probes) use 127.0.0.1.
FLOOD = "127.0.0.2"


def open_sockets(port: int, count: int, first_bytes: bytes = b"", source: str = "127.0.0.1") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes `sock` within `within` seconds (EOF or reset, after any response bytes)."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def get(port: int, path: str, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: loraflow\r\nX-Slow: "  # a request head that never ends


# ---- the HTTP API ------------------------------------------------------------------------------------

def test_slow_and_idle_connections_do_not_take_the_http_api_down(inference_stack_factory, tmp_path):
    """The issue's case: 200 slow-header connections (beyond uvicorn's old 128 + 64) plus 100 idle ones,
    no token: /health, /ready and an authenticated /v1 call still answer 200."""
    path, tokens = tokens_file(tmp_path, "tenant")
    stack = inference_stack_factory(SecuritySettings(auth_tokens_file=str(path)))
    port, auth = stack.http.port, {"Authorization": f"Bearer {tokens['tenant']}"}
    flood = open_sockets(port, 200, SLOW_HEAD, FLOOD) + open_sockets(port, 100, source=FLOOD)
    try:
        with http_probe(port, "/health") as health, http_probe(port, "/ready") as ready, \
                http_probe(port, "/v1/models", headers=auth, interval=0.2) as models:
            flood += open_sockets(port, 50, SLOW_HEAD, FLOOD)  # more arrive while the callers are served
            time.sleep(1.0)
        for probe in (health, ready, models):
            probe.assert_unharmed()
        assert get(port, "/v1/models") == 401  # the flood is not a way in either
    finally:
        close_all(flood)


def test_a_flood_beyond_the_connection_cap_closes_waiting_connections_not_callers(inference_stack_factory):
    limits = ServerLimits(http_max_connections=64, http_max_waiting_connections_per_client=16)
    stack = inference_stack_factory(SecuritySettings(limits=limits))
    port, table = stack.http.port, stack.http.connections
    flooders = [f"127.0.0.{i}" for i in range(2, 10)]  # 8 addresses x 16 waiting each: beyond the cap of 64
    flood = []
    try:
        with http_probe(port, "/health") as probe:
            for burst in range(10):
                flood += open_sockets(port, 30, SLOW_HEAD, flooders[burst % len(flooders)])
                assert len(table) <= limits.http_max_connections
        probe.assert_unharmed()
        # All accepted by now: each beyond the cap closed an older waiting one, or was refused while every
        # connection held a request not read yet (a burst accepted in one go).
        wait_for(lambda: table.evicted + table.refused >= 300 - limits.http_max_connections, timeout=10)
        # One address keeps at most its cap of waiting connections; the longest-waiting went first.
        wait_for(lambda: max(table.waiting_of(a) for a in flooders) <= limits.http_max_waiting_connections_per_client,
                 timeout=10)
        assert closed_by_server(flood[0], within=5)
    finally:
        close_all(flood)


def test_a_connection_that_sends_no_complete_request_head_is_closed(inference_stack_factory):
    limits = ServerLimits(http_header_timeout_s=1.0)
    stack = inference_stack_factory(SecuritySettings(limits=limits))
    port = stack.http.port
    silent, dripping = open_sockets(port, 1)[0], open_sockets(port, 1, b"GET /heal")[0]
    try:
        started = time.monotonic()
        for _ in range(3):  # a byte now and then does not extend the deadline
            time.sleep(0.3)
            dripping.sendall(b"t")
        assert closed_by_server(silent, within=8) and closed_by_server(dripping, within=8)
        assert time.monotonic() - started < 8
        assert get(port, "/health") == 200  # keep-alive after a response still works as before
    finally:
        close_all([silent, dripping])


def test_when_every_connection_is_busy_a_new_one_is_refused_and_slow_bodies_time_out(inference_stack_factory):
    limits = ServerLimits(http_max_connections=8, http_max_waiting_connections_per_client=8, http_body_timeout_s=1.0)
    stack = inference_stack_factory(SecuritySettings(limits=limits))
    port = stack.http.port
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\":")
    busy = open_sockets(port, 8, head)
    try:
        wait_for(lambda: stack.http.connections.waiting == 0 and len(stack.http.connections) == 8, timeout=10)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        extra.close()
        for sock in busy:  # the body never completes: 408 within the body timeout, and the slot frees
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        wait_for(lambda: get(port, "/health") == 200, timeout=10)
    finally:
        close_all(busy)


def test_one_client_cannot_hold_every_generation(inference_stack_factory, tmp_path):
    path, tokens = tokens_file(tmp_path, "alice", "bob")
    security = SecuritySettings(auth_tokens_file=str(path), limits=ServerLimits(max_streams_per_client=1))
    stack = inference_stack_factory(security)
    body = b'{"model": "m", "prompt": "the quick", "max_tokens": 40, "ignore_eos": true, "stream": true}'
    # Alice's generation must still be running when her second request arrives: a tiny model could finish 40
    # tokens into the socket buffer before then on an idle host. The engine pauses after its first step until
    # the 429 has been seen (the stream cap is checked before the engine is involved).
    paused = threading.Event()

    def start(token: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", stack.http.port, timeout=30)
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        return conn.getresponse()

    with steps_held_after_first(stack.manager.get("m").runtime, paused):
        first = start(tokens["alice"])  # streaming, unread: alice holds her one generation
        try:
            assert first.status == 200
            second = start(tokens["alice"])
            assert second.status == 429 and b"--max-streams-per-client" in second.read()
            paused.set()
            other = start(tokens["bob"])
            assert other.status == 200 and b"[DONE]" in other.read()
        finally:
            first.close()


# ---- the metrics and health port ---------------------------------------------------------------------

def test_the_metrics_port_answers_probes_under_a_flood_with_bounded_threads():
    from loraflow.server.redis_health import HEALTH, start_metrics_server

    limits = ServerLimits(metrics_max_connections=8, http_header_timeout_s=1.0)
    HEALTH.set_ready(True)
    httpd, _ = start_metrics_server(0, limits=limits)
    port = httpd.server_address[1]
    threads_before = threading.active_count()
    flood = []
    try:
        with http_probe(port, "/healthz") as live, http_probe(port, "/readyz") as ready:
            for _ in range(5):
                flood += open_sockets(port, 40, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", FLOOD)
                assert threading.active_count() <= threads_before + limits.metrics_max_connections + 4
        # The 200 flood connections reach the kernel's backlog at once, and the accept thread admits each one
        # by closing an older flood connection and waiting for its handler thread to end: a probe queued behind
        # them waits that many thread turnovers (the flood, both probes and the server's threads share this
        # process's GIL: 2.06 s once in CI on a loaded host, ~10 ms a turnover). Without the table each
        # slow-header connection would hold its thread until its 1 s deadline: seconds per wave for the probe.
        live.assert_unharmed(bound=PROBE_BOUND_S + 1.0)
        ready.assert_unharmed(bound=PROBE_BOUND_S + 1.0)
        assert closed_by_server(flood[-1], within=6)  # past the header deadline
    finally:
        close_all(flood)
        httpd.shutdown()
        httpd.server_close()
        HEALTH.reset()


# ---- gRPC ----------------------------------------------------------------------------------------------

class SlowJobs(JobServiceServicer):
    """GetJob "slow" holds a unary thread for a while; everything else is the real JobService."""

    def GetJob(self, request, context):
        if request.job_id == "slow":
            time.sleep(4)
            return jobs_pb2.Job(id="slow")
        return super().GetJob(request, context)


@pytest.fixture
def authed_jobs(redis_url, tmp_path):
    import redis

    path, tokens = tokens_file(tmp_path, "alice", "bob")
    queue = JobQueue(redis.Redis.from_url(redis_url), "train")
    security = SecuritySettings(auth_tokens_file=str(path), limits=ServerLimits(
        max_streams_per_client=2, grpc_handshake_timeout_s=1.0))
    server = GrpcServer("127.0.0.1:0", [JOB_SERVICE], max_workers=2, security=security)
    server.add(jobs_pb2_grpc.add_JobServiceServicer_to_server, SlowJobs({"train": queue}))
    server.start()
    yield server, queue, tokens
    server.stop(grace=0).wait(10)


def _auth(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def test_unauthenticated_calls_are_refused_without_waiting_for_busy_threads(authed_jobs):
    server, _, tokens = authed_jobs
    channel = grpc.insecure_channel(server.address)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    slow = [stub.GetJob.future(jobs_pb2.GetJobRequest(job_id="slow"), metadata=_auth(tokens["alice"]), timeout=30)
            for _ in range(2)]  # both unary threads taken
    try:
        time.sleep(0.3)
        started = time.monotonic()
        refusals = [stub.GetJob.future(jobs_pb2.GetJobRequest(job_id="x"), timeout=30) for _ in range(100)]
        for call in refusals:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        waited = time.monotonic() - started
        assert waited < 2.5, f"refusals waited {waited:.2f}s behind the busy unary threads"
        assert not any(call.done() for call in slow)
    finally:
        for call in slow:
            call.result()
        channel.close()


def test_one_caller_cannot_hold_every_stream(authed_jobs):
    server, queue, tokens = authed_jobs
    job = queue.submit({"n": 1})  # never picked up: its watchers stay open
    channel = grpc.insecure_channel(server.address)
    stub = jobs_pb2_grpc.JobServiceStub(channel)

    def watch(token: str):
        call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), metadata=_auth(token), timeout=30)
        next(call)  # the replayed QUEUED event: the stream is open
        return call

    alice = [watch(tokens["alice"]) for _ in range(2)]
    try:
        with pytest.raises(grpc.RpcError) as info:
            watch(tokens["alice"])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(info.value).reason == "TOO_MANY_STREAMS_PER_CLIENT"
        assert "alice" in info.value.details() and "--max-streams-per-client" in info.value.details()
        bob = watch(tokens["bob"])  # another caller is not affected
        bob.cancel()
        alice.pop().cancel()
        wait_for(lambda: server.active_streams == 1, timeout=10)
        alice.append(watch(tokens["alice"]))  # a freed slot is hers again
    finally:
        for call in alice:
            call.cancel()
        channel.close()


def test_grpc_connections_that_never_handshake_are_closed_while_health_answers(authed_jobs):
    server = authed_jobs[0]
    stalled = open_sockets(server.port, 150) + open_sockets(server.port, 50, b"PRI * HTTP/2.0\r\n")
    try:
        with grpc_health_probe(server.address) as probe:
            time.sleep(1.5)
        probe.assert_unharmed()
        assert all(closed_by_server(sock, within=6) for sock in stalled[::10])
    finally:
        close_all(stalled)
    channel = grpc.insecure_channel(server.address)
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
