"""Every ``LORAFLOW_*`` environment variable, declared once: its setting's flag, variable, default and help.

A ``Setting`` is read as: the flag when one was given, else its variable (else a deprecated alias of it,
with a warning), else its default; ``parse`` turns text into the value and names the variable in its
error. Nothing else in the tree reads a ``LORAFLOW_*`` variable (tests/contracts/test_settings.py greps
for it), and ``loraflow settings`` lists them all (``all_settings``).

Settings whose parsing belongs to their module are declared there with ``declare`` (the memory budget and
preparation pool in ``loraflow.options.budget``, the listener limits in ``loraflow.security.limits``); the rest are
declared below, grouped by who reads them. ``LORAFLOW_INFERENCE``, ``LORAFLOW_COMPILER`` and
``LORAFLOW_TRAINER`` (the Python API's addresses) are deprecated aliases of the ``*_ADDR`` variables the
client and CLI read: one address, one name.
"""

from __future__ import annotations

import argparse
import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loraflow.errors import InvalidArgument

ENV_PREFIX = "LORAFLOW_"
# The modules that declare settings of their own (imported by name, so this module stays below them).
DECLARING_MODULES = ("loraflow.options.budget", "loraflow.security.limits")
TRUE_WORDS = ("1", "true", "yes", "on")


def text(value: str) -> str:
    return value


def switch(value: str) -> bool:
    """An on/off variable: 1, true, yes or on (any case) is on; anything else off."""
    return str(value).strip().lower() in TRUE_WORDS


def one_of(*choices: str) -> Callable[[str], str]:
    """A variable that takes one of `choices`."""
    def parse(value: str) -> str:
        if value not in choices:
            raise InvalidArgument(f"must be one of {', '.join(choices)}, got {value!r}", value=value)
        return value
    parse.__name__ = "choice"
    return parse


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An integer variable in low..high."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise InvalidArgument(f"must be an integer, got {value!r}", value=value) from None
        if not low <= number <= high:
            raise InvalidArgument(f"must be in {low}..{high}, got {number}", value=number)
        return number
    parse.__name__ = "integer"
    return parse


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return parse(value)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


@dataclass(frozen=True)
class Setting:
    """One setting, declared once: its flag, environment variable, default (as text) and help."""

    name: str  # the argparse dest
    flag: str  # "--name-with-dashes"; "" only where a flag would do harm (env_only says why)
    env: str  # LORAFLOW_NAME
    default: str | None  # text parsed like the variable's; None = unset
    help: str
    parse: Callable[[str], Any] = text
    aliases: tuple[str, ...] = ()  # deprecated variable names still read, with a warning
    env_only: str = ""  # why there is no flag

    def raw(self, env: Mapping[str, str] | None = None) -> str | None:
        """The variable's text (an empty variable is unset), else a deprecated alias's (with a warning)."""
        env = os.environ if env is None else env
        value = env.get(self.env)
        if value:
            return value
        for alias in self.aliases:
            value = env.get(alias)
            if value:
                warnings.warn(f"{alias} is deprecated: set {self.env} instead", FutureWarning, stacklevel=3)
                return value
        return None

    def from_env(self, env: Mapping[str, str] | None = None) -> Any:
        """The variable's value parsed, else the default's (None when there is none)."""
        value = self.raw(env)
        if value is None:
            return None if self.default is None else self.parse(self.default)
        try:
            return self.parse(value)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{self.env}: {exc.message}", field=self.env, value=value) from None

    def value(self, args: argparse.Namespace | None, env: Mapping[str, str] | None = None) -> Any:
        """The flag, else the environment variable, else the default, parsed."""
        given = getattr(args, self.name, None) if args is not None else None
        return given if given is not None else self.from_env(env)

    def described(self) -> str:
        """The help with where the value comes from, for --help."""
        default = "" if self.default is None else f"; default {self.default}"
        return f"{self.help} (env {self.env}{default})"

    def add_to(self, group, **kwargs) -> None:
        """The flag (default None: the variable, then the default, through value())."""
        options = {"dest": self.name, "default": None, "help": self.described().replace("%", "%%")}
        if kwargs.get("action") is None:
            options["metavar"] = self.name.upper()
            options["type"] = _argparse_type(self.parse)
        options.update(kwargs)
        group.add_argument(self.flag, **options)


REGISTRY: dict[str, Setting] = {}


def declare(setting: Setting) -> Setting:
    """Record a setting in the registry (one declaration per variable)."""
    if not setting.env.startswith(ENV_PREFIX):
        raise ValueError(f"{setting.env} does not start with {ENV_PREFIX}")
    if setting.env in REGISTRY and REGISTRY[setting.env] != setting:
        raise ValueError(f"{setting.env} is declared twice")
    REGISTRY[setting.env] = setting
    return setting


def all_settings() -> list[Setting]:
    """Every declared setting, sorted by variable."""
    for module in DECLARING_MODULES:
        importlib.import_module(module)
    return sorted(REGISTRY.values(), key=lambda s: s.env)


def _setting(name: str, default: str | None, help: str, parse: Callable[[str], Any] = text, *, flag: str = "",
             env: str = "", **kwargs) -> Setting:
    if not flag and not kwargs.get("env_only"):
        flag = "--" + name.replace("_", "-")
    return declare(Setting(name=name, flag=flag,
                           env=env or ENV_PREFIX + name.upper(), default=default, help=help, parse=parse, **kwargs))


# -- every process: where state lives --
REDIS_URL = _setting("redis_url", None, "Redis URL: redis://, rediss:// or unix:// (unset = start an embedded "
                     "redis-server)")
STORE_URL = _setting("store_url", None, "object store: file:///dir, s3://bucket/prefix or a local path (default "
                     "~/.loraflow/store)")
CACHE_DIR = _setting("cache_dir", None, "local cache directory (default ~/.loraflow/cache)")
NATIVE_LIBRARY = _setting("native_library", None, "path of the LoraRows ONNX Runtime kernel library (default: the "
                          "one `make native` built in loraflow/native)", env_only="read by the kernel loader in "
                          "every process that opens an artifact, before any flags are parsed")
NATIVE_DISABLE = _setting("native_disable", None, "1: behave as if the LoraRows kernel library were absent (the "
                          "standard-operator graph serves)", switch, env_only="read by the kernel loader in every "
                          "process that opens an artifact, before any flags are parsed")

# -- servers: security and listeners (loraflow.security.settings) --
AUTH_TOKENS_FILE = _setting("auth_tokens_file", None, "name:token lines; callers send 'authorization: Bearer "
                            "TOKEN' (SIGHUP re-reads it)")
ALLOW_UNAUTHENTICATED = _setting("allow_unauthenticated", None, "serve a non-loopback address without tokens",
                                 switch)
TLS_CERT = _setting("tls_cert", None, "server certificate chain (PEM)")
TLS_KEY = _setting("tls_key", None, "server private key (PEM)")
TLS_CLIENT_CA = _setting("tls_client_ca", None, "require client certificates signed by this CA: mTLS (PEM)")
ALLOW_LOCAL_PATHS = _setting("allow_local_paths", None, "directories a request may name local files under, "
                             "comma-separated (default none)")
ALLOW_S3_BUCKETS = _setting("allow_s3_buckets", None, "buckets besides the store's own that s3:// inputs may "
                            "name, comma-separated")
METRICS_HOST = _setting("metrics_host", None, "address the /metrics endpoint binds (default 127.0.0.1)")
MAX_CONCURRENT_STREAMS = _setting("max_concurrent_streams", None, "streaming RPCs (and HTTP generations) "
                                  "served at once, 1..4096 (default 128)")
READY_FILE = _setting("ready_file", None, "a file that exists exactly while this process is ready (Redis "
                      "reachable, worker consumer group created): for exec readiness probes")
LIVENESS_GRACE = _setting("liveness_grace", None, "after this long unable to work (Redis unreachable, no "
                          "consumer group) /healthz on the metrics port answers 503, 0..86400 seconds (default 120)")
MAX_UPLOAD_FILE_BYTES = _setting("max_upload_file_bytes", None, "largest single file a push may hold (default "
                                 "64GiB)")
MAX_UPLOAD_FILES = _setting("max_upload_files", None, "most files one push may hold (default 10000)")
MAX_UPLOAD_TOTAL_BYTES = _setting("max_upload_total_bytes", None, "most bytes one push may hold (default 256GiB)")
UPLOAD_BLOB_TTL = _setting("upload_blob_ttl", None, "remove uploaded files of pushes never committed after this "
                           "many seconds (0 = never, else 600..2592000; default 86400)")

# -- the inference service --
HTTP_LISTEN = _setting("http_listen", None, "also serve the OpenAI-compatible /v1 API here, HOST:PORT (off "
                       "unless set)")
ORT_SPINNING = _setting("ort_spinning", "auto", "ONNX Runtime threading policy: 'auto' spins only while a step runs "
                        "and switches to sleeping threads while other processes contend for the CPU; 'on' always "
                        "spins (fastest on a dedicated host, collapses on a busy one); 'off' never spins",
                        one_of("auto", "on", "off"))
ADAPTER_CACHE_BYTES = _setting("adapter_cache_bytes", str(1 << 30), "host memory kept for evicted adapters' weights, "
                               "so reloading one is a memory copy, 0..2^40 bytes (0 = off)",
                               bounded_int(0, 1 << 40))
# The most adapter slots an explicit --adapter-slots may ask for (auto stops at
# services.inference.adapter_slots.MAX_AUTO_SLOTS).
MAX_ADAPTER_SLOTS = 4096


def auto_or_count(high: int) -> Callable[[str], str | int]:
    """'auto', or an integer in 1..high."""
    count = bounded_int(1, high)

    def parse(value: str) -> str | int:
        return "auto" if str(value).strip().lower() == "auto" else count(value)
    parse.__name__ = "auto|count"
    return parse


ADAPTER_SLOTS = _setting("adapter_slots", "auto", "adapter slots a loaded model keeps resident: 'auto' = as many as "
                         "fit in half the memory budget left after the model's weights and KV cache (at most 256, "
                         "never fewer than compiled), or a count 1..4096 (refused RESOURCE_EXHAUSTED when its banks "
                         "do not fit the budget); fused CPU artifacts of compiler 0.5 on only, others keep their "
                         "compiled slots", auto_or_count(MAX_ADAPTER_SLOTS))
DEPLOYMENT = _setting("deployment", None, "the deployment whose desired models (in Redis) this replica serves; "
                      "a replica is SERVING once it holds every desired model (unset = none)")

# -- the trainer service --
ALLOW_DISTRIBUTED_TRAINING = _setting("allow_distributed_training", None, "run world_size > 1 jobs (torchrun ranks). "
                                      "Off by default: torch's c10d rendezvous store listens unauthenticated on all "
                                      "interfaces while a job trains, so enable it only where the worker's ports are "
                                      "private (a NetworkPolicy, a firewall)", switch)
JOIN_DISTRIBUTED = _setting("join_distributed", None, "also host the other nodes of multi-machine jobs "
                            "(TrainingConfig.nodes > 1) that other workers took; implies --allow-distributed-training, "
                            "with the same exposure: the ranks' gloo sockets and node 0's rendezvous store are "
                            "unauthenticated, keep them on a private network", switch)
RDZV_HOST = _setting("rdzv_host", None, "the address other machines reach this worker's rendezvous endpoint on "
                     "when it is node 0 of a multi-machine job (default: the hostname); for --role follower, node 0's "
                     "address (an Indexed Job: its headless Service name)")
TRAINER_ROLE = _setting("trainer_role", "worker", "worker: take jobs from the queue (node 0 of the multi-machine "
                        "jobs it takes); follower: take no jobs, host node rank --node-rank of the runs node 0 "
                        "(--rdzv-host) opens; auto: node rank 0 is a worker, any other a follower", flag="--role")
NODE_RANK = _setting("node_rank", None, "this machine's node rank, 0..15, for --role follower/auto (unset: "
                     "JOB_COMPLETION_INDEX); a follower without one takes any free node rank. A worker ignores the "
                     "environment's (it is node 0 of every job it takes)")
ONE_JOB = _setting("one_job", None, "run exactly one job (a follower: one rendezvous) and exit: 0 succeeded, 1 "
                   "failed, 3 cancelled, 4 released or redelivered (stop signal, lost lease, crashed rank), 5 stopped "
                   "before a job came", switch)
RDZV_PORT = _setting("rdzv_port", None, "TCP port of node 0's c10d rendezvous store, 1..65535 (default 29400); a "
                     "follower joins only runs at --rdzv-host:--rdzv-port when a rendezvous host is given. Two node-0 "
                     "workers on one machine need different ports")
JOIN_TIMEOUT = _setting("join_timeout", None, "seconds node 0 waits for the other nodes of a multi-machine job to "
                        "join before the attempt fails and the job is redelivered, 0 < s <= 86400 (default 300): an "
                        "Indexed Job's pods may start minutes apart")

# -- clients: the CLI, loraflow.Client and the Python API --
TRAINER_ADDR = _setting("trainer_addr", None, "trainer service address (default 127.0.0.1:50051)", flag="--trainer",
                        aliases=("LORAFLOW_TRAINER",))
COMPILER_ADDR = _setting("compiler_addr", None, "compiler service address (default 127.0.0.1:50052)",
                         flag="--compiler", aliases=("LORAFLOW_COMPILER",))
INFERENCE_ADDR = _setting("inference_addr", None, "inference service address (default 127.0.0.1:50053); the "
                          "Python API connects to running services when it is set", flag="--inference",
                          aliases=("LORAFLOW_INFERENCE",))
TOKEN = _setting("token", None, "bearer token sent to the services", env_only="a token on a command line is "
                 "visible to every user of the machine (ps); use --token-file")
TOKEN_FILE = _setting("token_file", None, "file holding the bearer token (else LORAFLOW_TOKEN, else the token "
                      "`loraflow up` wrote)")
TLS_CA = _setting("tls_ca", None, "CA certificate (PEM) the services' certificates are checked against")
TLS_CLIENT_CERT = _setting("tls_client_cert", None, "client certificate (PEM) for mTLS")
TLS_CLIENT_KEY = _setting("tls_client_key", None, "client private key (PEM) for mTLS")
TLS = _setting("tls", None, "use TLS with the system's root certificates", switch)
