"""TLS credentials for servers (TLS, or mTLS with a client CA) and for clients, read from PEM files.

Errors name the setting and the path and say what is wrong; they never quote the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from loraflow.errors import InvalidArgument
from loraflow.security.settings import SecuritySettings

MAX_PEM_BYTES = 1 << 20


def read_pem(path: str | os.PathLike, field: str) -> bytes:
    """A PEM file's bytes (bounded, a regular file, with a PEM block) or InvalidArgument naming `field`."""
    path = Path(path)
    try:
        if not path.is_file():
            raise InvalidArgument(f"{field} {str(path)!r} is not a regular file", field=field, value=str(path))
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise InvalidArgument(f"{field} {str(path)!r} is {size} bytes; a PEM file here is at most "
                                  f"{MAX_PEM_BYTES}", field=field, value=str(path))
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument(f"{field} {str(path)!r} cannot be read ({exc.strerror})", field=field,
                              value=str(path)) from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{field} {str(path)!r} holds no PEM block (-----BEGIN ...)", field=field,
                              value=str(path))
    return data


def server_credentials(settings: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for a server, None when it serves plaintext. With tls_client_ca, clients must
    present a certificate signed by that CA (mTLS)."""
    if not settings.tls:
        return None
    cert = read_pem(settings.tls_cert, "tls_cert")
    key = read_pem(settings.tls_key, "tls_key")
    client_ca = read_pem(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca: str | None, client_cert: str | None = None,
                        client_key: str | None = None) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust `ca` (None = the system roots), present a client certificate for mTLS."""
    if bool(client_cert) != bool(client_key):
        field = "tls_client_key" if client_cert else "tls_client_cert"
        raise InvalidArgument("a client certificate and its key must be given together "
                              "(LORAFLOW_TLS_CLIENT_CERT and LORAFLOW_TLS_CLIENT_KEY)", field=field,
                              value=client_cert or client_key)
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "tls_ca") if ca else None,
        private_key=read_pem(client_key, "tls_client_key") if client_key else None,
        certificate_chain=read_pem(client_cert, "tls_client_cert") if client_cert else None)
