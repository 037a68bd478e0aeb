"""The trainer flags a Kubernetes Indexed Job needs: role, node rank, run-one-job-and-exit, fixed rendezvous port.

    --role worker|follower|auto   (env LORAFLOW_TRAINER_ROLE; default worker)
        worker    takes jobs from the Redis queue (node 0 of a multi-machine job it took)
        follower  takes nothing from the queue: hosts a non-zero node rank of the runs node 0 opens
        auto      node rank 0 → worker, k > 0 → follower (one pod template for every index)
    --node-rank K (env LORAFLOW_NODE_RANK, else JOB_COMPLETION_INDEX, the Indexed Job's own variable;
                  read for follower/auto only, so a plain worker pod of an Indexed Job stays a worker)
    --one-job     (env LORAFLOW_ONE_JOB=1) one job (a follower: one rendezvous), then exit with its outcome
    --rdzv-port P (env LORAFLOW_RDZV_PORT; default DEFAULT_RDZV_PORT) node 0's c10d store port, so a
                  NetworkPolicy can name it
    --join-timeout S (env LORAFLOW_JOIN_TIMEOUT; default 300) how long node 0 waits for the other nodes
    --rdzv-host H (env LORAFLOW_RDZV_HOST; services.trainer.__main__) a worker: the address it advertises as
                  node 0; a follower: node 0's address, joined at H:P only. One value fits every pod of an
                  Indexed Job: index 0's stable name, e.g. <job>-0.<headless service>

Every value is checked here, at start-up, and a bad one ends the process naming the flag (argparse's
"argument --rdzv-port: ..." message, exit status 2).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

from loraflow.options.config import seconds_arg
from loraflow.options.settings import JOIN_TIMEOUT, NODE_RANK, ONE_JOB, RDZV_HOST, RDZV_PORT, TRAINER_ROLE
from services.trainer.training import MAX_NODES

# torchrun's own default c10d rendezvous port: NetworkPolicies and firewall rules written for torchrun match.
DEFAULT_RDZV_PORT = 29400
DEFAULT_JOIN_TIMEOUT_S = 300.0
MAX_JOIN_TIMEOUT_S = 86400.0
ROLES = ("worker", "follower", "auto")


def rdzv_port_arg(text: str) -> int:
    try:
        port = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {port}")
    return port


def node_rank_arg(text: str) -> int:
    try:
        rank = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a node rank in 0..{MAX_NODES - 1}, got {text!r}") from None
    if not 0 <= rank < MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be a node rank in 0..{MAX_NODES - 1}, got {rank}")
    return rank


def _env_node_rank(env: Mapping[str, str]) -> int | None:
    """LORAFLOW_NODE_RANK, else JOB_COMPLETION_INDEX; SystemExit naming the variable when it is no node rank."""
    for name, text in ((NODE_RANK.env, NODE_RANK.raw(env)), ("JOB_COMPLETION_INDEX", env.get("JOB_COMPLETION_INDEX"))):
        text = (text or "").strip()
        if text:
            try:
                return node_rank_arg(text)
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"{name} (the default of --node-rank) {exc}") from None
    return None


def role_arg(text: str) -> str:
    role = str(text).strip().lower()
    if role not in ROLES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ROLES)} (env LORAFLOW_TRAINER_ROLE), got {text!r}")
    return role


def add_node_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    g = parser.add_argument_group("multi-machine training (Kubernetes Indexed Job)")
    g.add_argument("--role", type=role_arg, default=TRAINER_ROLE.raw(env) or "worker",
                   help=TRAINER_ROLE.described())
    g.add_argument("--node-rank", type=node_rank_arg, default=None,
                   help=NODE_RANK.described())
    g.add_argument("--one-job", action="store_true", default=bool(ONE_JOB.from_env(env)),
                   help=ONE_JOB.described())
    g.add_argument("--join-timeout", type=join_timeout_arg,
                   default=JOIN_TIMEOUT.raw(env) or str(DEFAULT_JOIN_TIMEOUT_S),
                   help=JOIN_TIMEOUT.described())
    g.add_argument("--rdzv-port", type=rdzv_port_arg, default=RDZV_PORT.raw(env) or DEFAULT_RDZV_PORT,
                   help=RDZV_PORT.described())


def join_timeout_arg(text: str) -> float:
    """Seconds node 0 waits for the other nodes of a multi-machine job: > 0, at most MAX_JOIN_TIMEOUT_S."""
    value = seconds_arg(text, MAX_JOIN_TIMEOUT_S)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


@dataclass(frozen=True)
class NodeMode:
    """How this trainer process takes part: which role, which node, one job or many, where node 0 listens."""

    role: str = "worker"  # "worker" or "follower" ("auto" resolved by from_args)
    node_rank: int | None = None
    one_job: bool = False
    rdzv_port: int = DEFAULT_RDZV_PORT
    rdzv_host: str | None = None  # given by --rdzv-host / LORAFLOW_RDZV_HOST; None = not given

    @property
    def follower_endpoint(self) -> str | None:
        """The only rendezvous endpoint a follower joins (None: any node 0's)."""
        return f"{self.rdzv_host}:{self.rdzv_port}" if self.role == "follower" and self.rdzv_host else None

    @property
    def plain(self) -> bool:
        """The ordinary queue worker / API process (queue_service.main runs it)."""
        return self.role == "worker" and not self.one_job

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> NodeMode:
        """The mode, or SystemExit naming the flag whose value does not fit the others."""
        env = os.environ if env is None else env
        role, rank = args.role, args.node_rank
        if rank is None and role != "worker":
            rank = _env_node_rank(env)
        if role == "auto":
            if rank is None:
                raise SystemExit("--role auto needs --node-rank (or LORAFLOW_NODE_RANK / JOB_COMPLETION_INDEX): "
                                 "node rank 0 is the worker, every other one a follower")
            role = "worker" if rank == 0 else "follower"
        if role == "follower" and rank == 0:
            raise SystemExit("--node-rank 0 is node 0, the worker that takes the job from the queue; a follower "
                             f"hosts node ranks 1..{MAX_NODES - 1} (or use --role auto)")
        if role == "worker" and rank not in (None, 0):
            raise SystemExit(f"--node-rank {rank} with --role worker: only node 0 takes jobs from the queue; "
                             "use --role follower (or --role auto)")
        one_job = bool(args.one_job)
        if (one_job or role == "follower") and args.mode != "worker":
            what = "--one-job" if one_job else "--role follower"
            raise SystemExit(f"{what} runs no API: give mode 'worker' (python -m services.trainer worker ...), "
                             f"got {args.mode!r}")
        if role == "follower" and not (args.allow_distributed_training or args.join_distributed):
            raise SystemExit("--role follower hosts torch.distributed ranks, whose gloo sockets take unauthenticated "
                             "connections: it needs --allow-distributed-training (env "
                             "LORAFLOW_ALLOW_DISTRIBUTED_TRAINING=1), and a private network")
        if one_job and args.join_distributed:
            raise SystemExit("--join-distributed cannot be combined with --one-job: a one-job worker runs exactly one "
                             "queue job; host the other nodes with --role follower")
        host = (args.rdzv_host or RDZV_HOST.raw(env) or "").strip() or None
        return cls(role=role, node_rank=rank, one_job=one_job, rdzv_port=args.rdzv_port, rdzv_host=host)
