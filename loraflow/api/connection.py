"""In-process by default; `connect=` (or $LORAFLOW_INFERENCE_ADDR / $LORAFLOW_COMPILER_ADDR) means running services.

`connect` is the inference service's "host:port", a dict {"inference", "compiler", "trainer"} of
addresses, or a ready `loraflow.Client`. With only the inference address given, the compiler and
trainer addresses come from $LORAFLOW_COMPILER_ADDR / $LORAFLOW_TRAINER_ADDR, else the local ports: the
same variables the client and CLI read ($LORAFLOW_INFERENCE / _COMPILER / _TRAINER still work, with a
deprecation warning). Tokens and TLS are the Client's ($LORAFLOW_TOKEN,
$LORAFLOW_TLS_CA, ...).
"""

from __future__ import annotations

from typing import Any

from loraflow.options import settings

ENV = {"inference": settings.INFERENCE_ADDR, "compiler": settings.COMPILER_ADDR, "trainer": settings.TRAINER_ADDR}


def make_client(connect: Any, *, services: tuple[str, ...] = ("inference", "compiler")):
    """A `loraflow.Client` for connected mode, or None for in-process."""
    from loraflow.client import Client

    if connect is False:
        return None
    if isinstance(connect, Client):
        return connect
    if connect is None or connect is True:
        if not any(ENV[s].raw() for s in services):
            if connect is True:
                raise ValueError(f"connect=True needs ${' or $'.join(ENV[s].env for s in services)} to be set")
            return None
        addresses = {}
    elif isinstance(connect, str):
        addresses = {"inference": connect} if "inference" in services else {services[0]: connect}
    elif isinstance(connect, dict):
        unknown = sorted(set(connect) - set(ENV))
        if unknown:
            raise ValueError(f"connect has unknown service(s) {unknown}; known: {sorted(ENV)}")
        addresses = dict(connect)
    else:
        raise TypeError(f"connect must be 'host:port', a dict of addresses or a loraflow.Client, got {connect!r}")
    for service, env in ENV.items():
        addresses.setdefault(service, env.raw())
    return Client(trainer=addresses["trainer"], compiler=addresses["compiler"], inference=addresses["inference"],
                  timeout=120.0)
