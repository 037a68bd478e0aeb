"""free_port never hands the same port out twice in one process (a service's two ports once came out equal)."""

from __future__ import annotations

import pytest

from loraflow.jobs import embedded_redis
from loraflow.jobs.embedded_redis import free_port


class _ScriptedSocket:
    """Stands in for socket.socket: each bind to port 0 'gets' the next scripted port."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.port = 0

    def __call__(self, *args, **kwargs) -> _ScriptedSocket:
        return self

    def __enter__(self) -> _ScriptedSocket:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        self.port = self.ports.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_the_kernel_giving_a_port_again_is_skipped(monkeypatch):
    monkeypatch.setattr(embedded_redis, "_HANDED_OUT", type(embedded_redis._HANDED_OUT)(maxlen=16))
    monkeypatch.setattr(embedded_redis.socket, "socket", _ScriptedSocket([40001, 40001, 40001, 40002]))
    assert free_port() == 40001
    assert free_port() == 40002


def test_a_kernel_that_only_repeats_is_an_error_naming_the_host(monkeypatch):
    monkeypatch.setattr(embedded_redis, "_HANDED_OUT", type(embedded_redis._HANDED_OUT)(maxlen=16))
    monkeypatch.setattr(embedded_redis.socket, "socket", _ScriptedSocket([40001] * 65))
    assert free_port() == 40001
    with pytest.raises(OSError, match="127.0.0.1"):
        free_port()


def test_real_ports_are_distinct():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p <= 65535 for p in ports)
