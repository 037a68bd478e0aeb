"""TLS and mTLS on a real loopback server with certificates made here by openssl."""

from __future__ import annotations

import os

import grpc
import pytest

from loraflow import errors
from loraflow.client import Client
from loraflow.jobs.job_service import SERVICE_NAME
from loraflow.security.settings import SecuritySettings
from loraflow.security.tls import channel_credentials
from loraflow.server.grpc_server import GrpcServer
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc
from tests.backbone.test_auth import ALICE, CallerJobs, write_tokens
from tests.support.certs import make_ca, make_leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(root, "test-ca"), make_ca(root, "other-ca")
    return {"ca": ca, "other_ca": other_ca, "server": make_leaf(root, "server", ca, server=True),
            "client": make_leaf(root, "client", ca, server=False),
            "stranger": make_leaf(root, "stranger", other_ca, server=False)}


def _serve(security: SecuritySettings):
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME], max_workers=2, security=security)
    server.add(jobs_pb2_grpc.add_JobServiceServicer_to_server, CallerJobs())
    server.start()
    return server


@pytest.fixture
def tls_server(pki):
    server = _serve(SecuritySettings(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key)))
    yield server
    server.stop(0).wait()


@pytest.fixture
def mtls_server(pki, tmp_path):
    tokens = write_tokens(tmp_path / "tokens", f"alice:{ALICE}\n")
    server = _serve(SecuritySettings(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key),
                                     tls_client_ca=str(pki["ca"].cert), auth_tokens_file=str(tokens)))
    yield server
    server.stop(0).wait()


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch, tmp_path):
    for name in ("LORAFLOW_TOKEN", "LORAFLOW_TOKEN_FILE", "LORAFLOW_TLS", "LORAFLOW_TLS_CA",
                 "LORAFLOW_TLS_CLIENT_CERT", "LORAFLOW_TLS_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def _get(channel: grpc.Channel, **kwargs) -> jobs_pb2.Job:
    return jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(job_id="train-1"), timeout=5,
                                                        **kwargs)


def _refused(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def test_tls_serves_a_client_that_trusts_the_ca(tls_server, pki):
    with grpc.secure_channel(tls_server.address, channel_credentials(str(pki["ca"].cert))) as channel:
        assert _get(channel).id == "train-1"
    with Client(trainer=tls_server.address, tls_ca=str(pki["ca"].cert), timeout=5) as client:
        assert client.get_job("train-1").id == "train-1"
        assert client.health("trainer") == "SERVING"


def test_plaintext_client_to_a_tls_port_is_refused(tls_server):
    with grpc.insecure_channel(tls_server.address) as channel:
        assert _refused(lambda: _get(channel)) == grpc.StatusCode.UNAVAILABLE
    with Client(trainer=tls_server.address, timeout=5) as client, pytest.raises(errors.Unavailable):
        client.get_job("train-1")


def test_a_client_trusting_another_ca_is_refused(tls_server, pki):
    with grpc.secure_channel(tls_server.address, channel_credentials(str(pki["other_ca"].cert))) as channel:
        assert _refused(lambda: _get(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_from_the_client_ca_and_still_a_token(mtls_server, pki):
    ca = str(pki["ca"].cert)
    with grpc.secure_channel(mtls_server.address, channel_credentials(ca)) as channel:
        assert _refused(lambda: _get(channel)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    stranger = channel_credentials(ca, str(pki["stranger"].cert), str(pki["stranger"].key))
    with grpc.secure_channel(mtls_server.address, stranger) as channel:
        assert _refused(lambda: _get(channel)) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
    client_pair = pki["client"]
    with Client(trainer=mtls_server.address, tls_ca=ca, tls_client_cert=str(client_pair.cert),
                tls_client_key=str(client_pair.key), timeout=5) as client, pytest.raises(errors.Unauthenticated):
        client.get_job("train-1")  # the certificate opens the connection, not the RPCs
    os.environ["LORAFLOW_TLS_CA"] = ca
    try:
        with Client(trainer=mtls_server.address, tls_client_cert=str(client_pair.cert),
                    tls_client_key=str(client_pair.key), token=ALICE, timeout=5) as client:
            assert client.get_job("train-1").message == "alice"
    finally:
        del os.environ["LORAFLOW_TLS_CA"]


def test_bad_tls_files_are_refused_naming_the_setting_without_their_content(pki, tmp_path):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("secret-bytes-that-must-not-echo\n")
    with pytest.raises(errors.InvalidArgument) as info:
        _serve(SecuritySettings(tls_cert=str(not_pem), tls_key=str(pki["server"].key)))
    assert info.value.field == "tls_cert" and "secret-bytes" not in info.value.message
    with pytest.raises(errors.InvalidArgument) as info:
        Client(trainer="127.0.0.1:1", tls_ca=str(not_pem))
    assert info.value.field == "tls_ca" and "secret-bytes" not in info.value.message
    with pytest.raises(errors.InvalidArgument) as info:
        Client(trainer="127.0.0.1:1", tls_client_cert=str(pki["client"].cert))
    assert info.value.field == "tls_client_key"
    with pytest.raises(errors.InvalidArgument) as info:
        Client(trainer="127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))
    assert info.value.field == "tls_ca"
