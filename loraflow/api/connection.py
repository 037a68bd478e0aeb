"""In-process by default; `connect=` (or $LORAFLOW_INFERENCE / $LORAFLOW_COMPILER) means running services.

`connect` is the inference service's "host:port", a dict {"inference", "compiler", "trainer"} of
addresses, or a ready `loraflow.Client`. With only the inference address given, the compiler and
trainer addresses come from $LORAFLOW_COMPILER / $LORAFLOW_TRAINER, then `loraflow.Client`'s own
defaults ($LORAFLOW_*_ADDR, else the local ports). Tokens and TLS are the Client's ($LORAFLOW_TOKEN,
$LORAFLOW_TLS_CA, ...).
"""

from __future__ import annotations

import os
from typing import Any

ENV = {"inference": "LORAFLOW_INFERENCE", "compiler": "LORAFLOW_COMPILER", "trainer": "LORAFLOW_TRAINER"}


def make_client(connect: Any, *, services: tuple[str, ...] = ("inference", "compiler")):
    """A `loraflow.Client` for connected mode, or None for in-process."""
    from loraflow.client import Client

    if connect is False:
        return None
    if isinstance(connect, Client):
        return connect
    if connect is None or connect is True:
        if not any(os.environ.get(ENV[s]) for s in services):
            if connect is True:
                raise ValueError(f"connect=True needs ${' or $'.join(ENV[s] for s in services)} to be set")
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
        addresses.setdefault(service, os.environ.get(env) or None)
    return Client(trainer=addresses["trainer"], compiler=addresses["compiler"], inference=addresses["inference"],
                  timeout=120.0)
