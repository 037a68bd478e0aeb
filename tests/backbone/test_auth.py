"""Bearer-token authentication: the tokens file, the interceptor on a real server, the Client, and
revocation by editing the file + SIGHUP on a real `python -m services.trainer` process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraflow import errors
from loraflow.client import Client
from loraflow.jobs.embedded_redis import free_port
from loraflow.jobs.job_service import SERVICE_NAME
from loraflow.security.auth import current_caller, load_tokens
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer, error_info, is_loopback
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210xyz"


def write_tokens(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


class CallerJobs(jobs_pb2_grpc.JobServiceServicer):
    """Answers with the caller's name; counts calls so a test can prove a rejected RPC never ran."""

    def __init__(self):
        self.calls = 0

    def GetJob(self, request, context):
        self.calls += 1
        if request.job_id == "missing":
            raise errors.NotFound("no job 'missing'", field="job_id", value=request.job_id)
        return jobs_pb2.Job(id=request.job_id, message=current_caller())

    def WatchJob(self, request, context):
        self.calls += 1
        yield jobs_pb2.JobEvent(job_id=request.job_id, seq=1, message=current_caller())


@pytest.fixture
def tokens_file(tmp_path):
    return write_tokens(tmp_path / "tokens", f"# callers\n\nalice:{ALICE}\n  bob : {BOB}  \n")


@pytest.fixture
def authed(tokens_file):
    servicer = CallerJobs()
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME], max_workers=4,
                        security=SecuritySettings(auth_tokens_file=str(tokens_file)))
    server.add(jobs_pb2_grpc.add_JobServiceServicer_to_server, servicer)
    server.start()
    channel = grpc.insecure_channel(server.address)
    yield server, channel, servicer
    channel.close()
    server.stop(0).wait()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# ------------------------------------------------------------------------------------------------ the file

def test_tokens_file_parses_names_comments_and_blank_lines(tokens_file):
    table = load_tokens(tokens_file)
    assert table.names == ("alice", "bob")
    assert table.identify(ALICE) == "alice" and table.identify(BOB) == "bob"
    for guess in ("", ALICE[:-1], ALICE + "x", ALICE.upper(), f"alice:{ALICE}"):
        assert table.identify(guess) is None


MALFORMED = {
    "no colon": ("# ok\nalice-" + ALICE + "\n", "line 2 is not name:token"),
    "empty name": (f":{ALICE}\n", "line 1: the name"),
    "bad name": (f"al ice:{ALICE}\n", "line 1: the name"),
    "short token": ("alice:short-secret\n", "line 1 (alice): the token is shorter than 16"),
    "space in token": (f"alice:{ALICE} {ALICE}\n", "line 1 (alice): the token must be printable ASCII"),
    "duplicate name": (f"alice:{ALICE}\nalice:{BOB}\n", "line 2: the name 'alice' appears twice"),
    "duplicate token": (f"alice:{ALICE}\nbob:{ALICE}\n", "line 2 (bob): the same token"),
    "only comments": ("# nobody\n\n", "holds no name:token line"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tokens_files_are_refused_naming_the_line_never_the_token(tmp_path, case):
    text, expected = MALFORMED[case]
    path = write_tokens(tmp_path / "tokens", text)
    with pytest.raises(errors.InvalidArgument) as info:
        load_tokens(path)
    assert expected in info.value.message
    assert info.value.field == "auth_tokens_file" and info.value.value == str(path)
    for secret in (ALICE, BOB, "short-secret"):
        assert secret not in info.value.message and secret not in str(info.value.metadata)


def test_non_utf8_oversized_and_shared_writable_files_are_refused(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_bytes(f"alice:{ALICE}\nbob:\xff\xfe{BOB}\n".encode("latin-1"))
    os.chmod(path, 0o600)
    with pytest.raises(errors.InvalidArgument, match="line 2 is not UTF-8"):
        load_tokens(path)
    write_tokens(path, f"alice:{ALICE}\n", mode=0o620)
    with pytest.raises(errors.InvalidArgument, match="writable by group or others"):
        load_tokens(path)
    write_tokens(path, "#" * (1 << 20) + f"\nalice:{ALICE}\n")
    with pytest.raises(errors.InvalidArgument, match="at most 1048576"):
        load_tokens(path)
    with pytest.raises(errors.InvalidArgument, match="cannot be read"):
        load_tokens(tmp_path / "missing")
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        load_tokens(tmp_path)
    # Readable by others (a mounted secret, say) loads, with a warning.
    write_tokens(path, f"alice:{ALICE}\n", mode=0o644)
    with caplog.at_level(logging.WARNING, logger="loraflow.security.auth"):
        assert load_tokens(path).names == ("alice",)
    assert any("readable by group or others" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ the server

def test_rpcs_without_a_valid_token_are_unauthenticated_before_any_handler_runs(authed):
    _server, channel, servicer = authed
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    request = jobs_pb2.GetJobRequest(job_id="train-1")
    hostile = [(), bearer(""), bearer("wrong-token-0123456789"), bearer(ALICE[:-1]), bearer(ALICE + "x"),
               (("authorization", f"Basic {ALICE}"),), (("authorization", ALICE),), (("x-token", ALICE),),
               bearer(f"alice:{ALICE}")]
    for metadata in hostile:
        err = rpc_error(lambda m=metadata: stub.GetJob(request, metadata=m, timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert error_info(err).reason == "UNAUTHENTICATED"
        assert ALICE not in err.details()
        err = rpc_error(lambda m=metadata: list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="train-1"),
                                                              metadata=m, timeout=5)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert servicer.calls == 0


def test_reflection_needs_a_token_and_health_does_not(authed):
    _server, channel, _ = authed
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

    def list_services(metadata):
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               metadata=metadata, timeout=5)
        return {s.name for s in next(replies).list_services_response.service}

    assert rpc_error(lambda: list_services(())).code() == grpc.StatusCode.UNAUTHENTICATED
    assert SERVICE_NAME in list_services(bearer(BOB))
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_the_handler_sees_the_callers_name_and_logs_never_carry_the_token(authed, caplog):
    _server, channel, servicer = authed
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    with caplog.at_level(logging.DEBUG, logger="loraflow.security.auth"):
        assert stub.GetJob(jobs_pb2.GetJobRequest(job_id="j"), metadata=bearer(ALICE), timeout=5).message == "alice"
        assert stub.GetJob(jobs_pb2.GetJobRequest(job_id="j"), metadata=(("authorization", f"bearer  {BOB} "),),
                           timeout=5).message == "bob"
        events = list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="j"), metadata=bearer(BOB), timeout=5))
        rpc_error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="j"), metadata=bearer(ALICE + "x"), timeout=5))
    assert [e.message for e in events] == ["bob"]
    assert servicer.calls == 3
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GetJob called by alice" in logged and "WatchJob called by bob" in logged
    assert "UNAUTHENTICATED: unknown token" in logged
    assert ALICE not in logged and BOB not in logged


def test_a_failed_rpc_is_logged_with_its_callers_name(authed, caplog):
    _server, channel, _ = authed
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="loraflow.server.grpc_server"):
        err = rpc_error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="missing"), metadata=bearer(BOB), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GetJob -> NOT_FOUND: no job 'missing' (caller bob)" in logged and BOB not in logged


def test_reload_swaps_the_tokens_and_a_broken_file_keeps_the_previous_ones(authed, tokens_file):
    server, channel, _ = authed
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    write_tokens(tokens_file, f"bob:{BOB}\n")
    assert server.reload_auth() is True
    assert rpc_error(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id="j"), metadata=bearer(ALICE),
                                         timeout=5)).code() == grpc.StatusCode.UNAUTHENTICATED
    write_tokens(tokens_file, "bob-without-a-token\n")
    assert server.reload_auth() is False
    assert stub.GetJob(jobs_pb2.GetJobRequest(job_id="j"), metadata=bearer(BOB), timeout=5).message == "bob"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.1", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_non_loopback_address_without_tokens_is_refused_naming_the_flags(tokens_file):
    # Constructing the server is enough: it refuses before binding anything.
    for listen in ("0.0.0.0:0", "[::]:0"):
        with pytest.raises(errors.FailedPrecondition) as info:
            GrpcServer(listen, [SERVICE_NAME])
        assert info.value.field == "listen"
        assert "--auth-tokens-file" in info.value.message and "--allow-unauthenticated" in info.value.message
    GrpcServer("0.0.0.0:0", security=SecuritySettings(allow_unauthenticated=True))
    GrpcServer("0.0.0.0:0", security=SecuritySettings(auth_tokens_file=str(tokens_file)))
    GrpcServer("127.0.0.1:0")


# ------------------------------------------------------------------------------------------------ the client

def test_client_token_from_argument_env_token_file_and_the_up_fallback(authed, tmp_path, monkeypatch):
    server, _channel, _ = authed
    for name in ("LORAFLOW_TOKEN", "LORAFLOW_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))

    def caller(**kwargs) -> str:
        with Client(trainer=server.address, timeout=5, **kwargs) as client:
            return client.get_job("train-1").message

    with pytest.raises(errors.Unauthenticated) as info:
        caller()
    assert info.value.code == "UNAUTHENTICATED" and ALICE not in str(info.value)
    assert caller(token=ALICE) == "alice"
    token_file = tmp_path / "bob.token"
    token_file.write_text(BOB + "\n")
    assert caller(token_file=str(token_file)) == "bob"
    monkeypatch.setenv("LORAFLOW_TOKEN", ALICE)
    assert caller(token_file=str(token_file)) == "alice"  # the variable wins over a file
    monkeypatch.delenv("LORAFLOW_TOKEN")
    monkeypatch.setenv("LORAFLOW_TOKEN_FILE", str(token_file))
    assert caller() == "bob"
    monkeypatch.delenv("LORAFLOW_TOKEN_FILE")
    home = tmp_path / "home"
    (home / ".loraflow" / "auth").mkdir(parents=True)
    (home / ".loraflow" / "auth" / "token").write_text(ALICE + "\n")
    monkeypatch.setenv("HOME", str(home))
    assert caller() == "alice"  # what `loraflow up` wrote under the default home
    with Client(trainer="10.255.255.1:50051") as remote:  # ... is for this machine's services only
        assert remote._endpoint("trainer").metadata == ()
    with Client(trainer="10.255.255.1:50051", token=ALICE) as remote:
        assert remote._endpoint("trainer").metadata == (("authorization", f"Bearer {ALICE}"),)
    bad = tmp_path / "bad.token"
    bad.write_text(f"{ALICE} {BOB}\n")
    with pytest.raises(errors.InvalidArgument) as info:
        Client(trainer=server.address, token_file=str(bad))
    assert info.value.field == "token_file" and ALICE not in info.value.message


def test_a_token_bound_for_a_non_loopback_plaintext_address_is_warned_about(caplog):
    client = Client(trainer="10.255.255.1:50051", compiler="127.0.0.1:50052", token=ALICE, timeout=1)
    with caplog.at_level(logging.WARNING, logger="loraflow.client"):
        client._endpoint("compiler")  # loopback: no warning
        assert not caplog.records
        client._endpoint("trainer")  # opening a channel does not connect: nothing leaves this machine
    client.close()
    assert any("plaintext to 10.255.255.1:50051" in r.getMessage() for r in caplog.records)
    assert all(ALICE not in r.getMessage() for r in caplog.records)


def test_cli_sends_the_token_from_token_file_or_env(authed, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from loraflow.cli import app

    server, _channel, _ = authed
    for name in ("LORAFLOW_TOKEN", "LORAFLOW_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    runner = CliRunner()
    args = ["--trainer", server.address, "jobs", "get", "train-1", "-o", "json"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
    token_file = tmp_path / "token"
    token_file.write_text(BOB)
    by_file = runner.invoke(app, ["--token-file", str(token_file), *args])
    assert by_file.exit_code == 0 and '"message": "bob"' in by_file.stdout
    by_env = runner.invoke(app, args, env={"LORAFLOW_TOKEN": ALICE})
    assert by_env.exit_code == 0 and '"message": "alice"' in by_env.stdout


def test_cli_add_token_writes_a_private_file_the_servers_load_and_refuses_a_second_token_per_name(tmp_path):
    from typer.testing import CliRunner

    from loraflow.cli import app

    tokens = tmp_path / "auth" / "tokens"
    tokens.parent.mkdir()
    runner = CliRunner()
    first = runner.invoke(app, ["auth", "add-token", "ops", "--tokens-file", str(tokens), "-o", "json"])
    assert first.exit_code == 0, first.output
    ops_token = json.loads(first.stdout)["token"]
    second = runner.invoke(app, ["auth", "add-token", "ci", "--tokens-file", str(tokens)])
    assert second.exit_code == 0, second.output
    ci_token = second.stdout.strip()
    assert os.stat(tokens).st_mode & 0o777 == 0o600
    table = load_tokens(tokens)
    assert table.names == ("ops", "ci")
    assert table.identify(ops_token) == "ops" and table.identify(ci_token) == "ci" and ops_token != ci_token
    before = tokens.read_bytes()
    again = runner.invoke(app, ["auth", "add-token", "ops", "--tokens-file", str(tokens)])
    assert again.exit_code == 1 and "already has a token for 'ops'" in again.output
    bad_name = runner.invoke(app, ["auth", "add-token", "no spaces", "--tokens-file", str(tokens)])
    assert bad_name.exit_code == 1 and "field: name" in bad_name.output
    assert tokens.read_bytes() == before  # refused additions leave the file as it was


# ------------------------------------------------------------------------------------------------ a real process

def _wait_serving(address: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)


def _answer(client_kwargs: dict, address: str) -> str:
    """'ok' when ListJobs succeeds with these credentials, else the error's code name."""
    try:
        with Client(trainer=address, timeout=5, **client_kwargs) as client:
            client.list_jobs(kind="train")
        return "ok"
    except errors.LoraflowError as exc:
        return exc.code


def test_sighup_revokes_a_token_removed_from_the_file_on_a_running_service(redis_url, tmp_path, monkeypatch):
    for name in ("LORAFLOW_TOKEN", "LORAFLOW_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    tokens = write_tokens(tmp_path / "tokens", f"alice:{ALICE}\nbob:{BOB}\n")
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "trainer.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.trainer", "api", "--listen", address,
                             "--redis-url", redis_url, "--store-url", (tmp_path / "store").as_uri(),
                             "--auth-tokens-file", str(tokens), "--grace", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    try:
        _wait_serving(address, proc, log)
        assert _answer({}, address) == "UNAUTHENTICATED"
        assert _answer({"token": ALICE}, address) == "ok"
        assert _answer({"token": BOB}, address) == "ok"
        write_tokens(tokens, f"bob:{BOB}\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _answer({"token": ALICE}, address) != "UNAUTHENTICATED":
            assert time.monotonic() < deadline, "alice's token still works 10 s after SIGHUP"
            time.sleep(0.2)
        assert _answer({"token": BOB}, address) == "ok"
        assert proc.poll() is None  # SIGHUP reloads; it does not stop the service
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "reloaded" in text and ALICE not in text and BOB not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
