"""The Indexed Job flags (--role, --node-rank / JOB_COMPLETION_INDEX, --one-job, --rdzv-port) refuse bad values
naming the flag; pinned followers claim their own node rank of their own node 0's runs only. In-process, with
a real Redis; no ranks are started here (test_trainer_modes does that)."""

from __future__ import annotations

import threading

import pytest

from services.trainer.follower import RunFollower
from services.trainer.node_flags import DEFAULT_RDZV_PORT, NodeMode
from services.trainer.node_main import EXIT_STOPPED, EXIT_SUCCEEDED, follow_one_run
from services.trainer.run_board import RUNS_KEY, RunBoard
from services.trainer.worker import TrainingHandler

_NODE_ENV = ("JOB_COMPLETION_INDEX", "LORAFLOW_NODE_RANK", "LORAFLOW_TRAINER_ROLE", "LORAFLOW_ONE_JOB",
             "LORAFLOW_RDZV_PORT", "LORAFLOW_RDZV_HOST", "LORAFLOW_ALLOW_DISTRIBUTED_TRAINING",
             "LORAFLOW_JOIN_DISTRIBUTED", "LORAFLOW_REDIS_URL", "LORAFLOW_JOIN_TIMEOUT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _NODE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _mode(argv):
    from loraflow.jobs.queue_service import parse_args
    from services.trainer.__main__ import SPEC

    return NodeMode.from_args(parse_args(SPEC, argv))


def _refusal(capsys, argv) -> str:
    """What the real entry point says when it refuses ``argv`` (argparse usage errors and SystemExit texts)."""
    from services.trainer.__main__ import run

    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code not in (0, None)
    return f"{e.value.code}\n{capsys.readouterr().err}"


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["worker", "--join-timeout", "0"], {}, "argument --join-timeout: must be > 0 seconds, got 0"),
    (["worker", "--join-timeout", "nan"], {}, "argument --join-timeout: must be in 0..86400, got nan"),
    (["worker"], {"LORAFLOW_JOIN_TIMEOUT": "1e9"}, "argument --join-timeout: must be in 0..86400, got 1e9"),
    (["worker", "--rdzv-port", "0"], {}, "argument --rdzv-port: must be a TCP port in 1..65535, got 0"),
    (["worker", "--rdzv-port", "65536"], {}, "argument --rdzv-port: must be a TCP port in 1..65535, got 65536"),
    (["worker", "--rdzv-port", "http"], {}, "argument --rdzv-port: must be a TCP port in 1..65535, got 'http'"),
    (["worker"], {"LORAFLOW_RDZV_PORT": "70000"}, "argument --rdzv-port: must be a TCP port in 1..65535, got 70000"),
    (["worker", "--node-rank", "16"], {}, "argument --node-rank: must be a node rank in 0..15"),
    (["worker", "--node-rank", "-1"], {}, "argument --node-rank: must be a node rank in 0..15"),
    (["worker", "--role", "auto"], {"JOB_COMPLETION_INDEX": "x1"},
     "JOB_COMPLETION_INDEX (the default of --node-rank) must be a node rank in 0..15, got 'x1'"),
    (["worker", "--role", "follower", "--allow-distributed-training"], {"LORAFLOW_NODE_RANK": "99"},
     "LORAFLOW_NODE_RANK (the default of --node-rank) must be a node rank in 0..15, got 99"),
    (["worker", "--role", "leader"], {}, "argument --role: must be one of worker, follower, auto"),
    (["worker", "--role", "follower"], {}, "--role follower hosts torch.distributed ranks"),
    (["worker", "--role", "follower", "--node-rank", "0", "--allow-distributed-training"], {},
     "--node-rank 0 is node 0"),
    (["worker", "--node-rank", "2"], {}, "--node-rank 2 with --role worker"),
    (["worker", "--role", "auto"], {}, "--role auto needs --node-rank"),
    (["--one-job"], {}, "--one-job runs no API: give mode 'worker'"),
    (["api", "--role", "follower", "--allow-distributed-training"], {}, "--role follower runs no API"),
    (["worker", "--one-job", "--join-distributed"], {}, "--join-distributed cannot be combined with --one-job"),
    (["worker", "--one-job"], {}, "--one-job needs --redis-url"),
])
def test_bad_values_are_refused_naming_the_flag(clean_env, capsys, argv, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    said = _refusal(capsys, argv)
    assert expected in said, said


def test_the_indexed_job_index_picks_the_role_and_node_rank(clean_env):
    clean_env.setenv("JOB_COMPLETION_INDEX", "0")
    leader = _mode(["worker", "--role", "auto", "--one-job", "--allow-distributed-training"])
    assert (leader.role, leader.node_rank, leader.one_job, leader.rdzv_port) == ("worker", 0, True, DEFAULT_RDZV_PORT)
    assert leader.follower_endpoint is None and not leader.plain
    clean_env.setenv("JOB_COMPLETION_INDEX", "3")
    clean_env.setenv("LORAFLOW_RDZV_HOST", "train-0.train-rdzv")
    follower = _mode(["worker", "--role", "auto", "--allow-distributed-training", "--rdzv-port", "29511"])
    assert (follower.role, follower.node_rank, follower.one_job) == ("follower", 3, False)
    assert follower.follower_endpoint == "train-0.train-rdzv:29511"
    # The flag wins over the index; LORAFLOW_NODE_RANK over JOB_COMPLETION_INDEX.
    assert _mode(["worker", "--role", "auto", "--node-rank", "1", "--allow-distributed-training"]).node_rank == 1
    clean_env.setenv("LORAFLOW_NODE_RANK", "2")
    assert _mode(["worker", "--role", "auto", "--allow-distributed-training"]).node_rank == 2
    clean_env.setenv("LORAFLOW_TRAINER_ROLE", "follower")
    assert _mode(["worker", "--allow-distributed-training"]).role == "follower"
    # A plain worker pod of an Indexed Job (the index in its environment) stays the ordinary worker.
    clean_env.delenv("LORAFLOW_TRAINER_ROLE")
    clean_env.setenv("JOB_COMPLETION_INDEX", "x")
    pool = _mode(["worker", "--join-distributed"])
    assert pool.plain and pool.node_rank is None
    # No Indexed Job flags at all: the ordinary API + worker process.
    for name in _NODE_ENV:
        clean_env.delenv(name, raising=False)
    assert _mode([]).plain and _mode(["worker", "--rdzv-port", "29500"]).rdzv_port == 29500


def test_the_join_timeout_reaches_the_handler(clean_env, tmp_path):
    from loraflow.jobs.queue_service import parse_args
    from services.trainer.__main__ import SPEC
    from services.trainer.node_flags import DEFAULT_JOIN_TIMEOUT_S

    assert parse_args(SPEC, ["worker"]).join_timeout == DEFAULT_JOIN_TIMEOUT_S
    clean_env.setenv("LORAFLOW_JOIN_TIMEOUT", "900")
    args = parse_args(SPEC, ["worker"])
    assert args.join_timeout == 900.0
    assert TrainingHandler(None, None, tmp_path, join_timeout=args.join_timeout).join_timeout == 900.0


def test_the_handler_refuses_a_port_out_of_range(tmp_path):
    from loraflow.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        TrainingHandler(None, None, tmp_path, rdzv_port=70000)
    assert e.value.field == "rdzv_port" and e.value.value == 70000


def test_a_fixed_node_rank_is_claimed_once_and_mixes_with_any_rank_claims(redis_url):
    from loraflow.options.config import connect_redis

    board = RunBoard(connect_redis(redis_url))
    key = board.open("j1", 1, "n0:29400", nnodes=3, nproc=1, resume_key="")
    (run,) = board.open_runs()
    assert board.claim_node(run, 2) is True
    assert board.claim_node(run, 2) is False  # a second pod with the same index gets nothing
    assert board.claim_node(run, 3) is False and board.claim_node(run, 0) is False  # not a follower's node rank
    assert board.open_runs() == [run]  # node 1 is still free
    assert board.claim(run) == 1  # an unpinned follower takes the free one, not the pinned one's
    assert board.claim(run) is None and board.open_runs() == []
    assert board.refresh(key).claimed == 2
    board.end(key)
    assert board.claim_node(run, 1) is False


def _pinned_follower(stack_parts, node_rank, endpoint, stop):
    queue, store, registry, cache = stack_parts
    handler = TrainingHandler(store, registry, cache, allow_distributed=True, rdzv_host="127.0.0.1")
    return RunFollower(handler, queue, stop, node_rank=node_rank, endpoint=endpoint)


@pytest.fixture
def stack_parts(redis_url, tmp_path):
    from loraflow.jobs.queue import JobQueue
    from loraflow.jobs.registry import Registry
    from loraflow.options.config import connect_redis
    from loraflow.storage.store import open_store

    client = connect_redis(redis_url)
    yield JobQueue(client, "train"), open_store((tmp_path / "store").as_uri()), Registry(client), tmp_path / "cache"
    client.close()


def test_a_pinned_follower_ignores_other_node_zeros_and_leaves_a_run_that_needs_fewer_nodes(stack_parts):
    queue = stack_parts[0]
    board = RunBoard(queue.redis)
    other = board.open("other-job", 1, "other-0.svc:29400", nnodes=4, nproc=1, resume_key="")
    stop = threading.Event()
    follower = _pinned_follower(stack_parts, 2, "train-0.svc:29400", stop)
    assert follower.run_once() is False and follower.not_needed is None
    assert board.refresh(other).claimed == 0  # another Job's node 0: not claimed
    ours = board.open("small-job", 1, "train-0.svc:29400", nnodes=2, nproc=1, resume_key="")
    assert follow_one_run(follower, queue, stop) == EXIT_SUCCEEDED  # node rank 2 is not part of a 2-node job
    assert follower.not_needed.job_id == "small-job" and follower.last is None
    assert board.refresh(ours).claimed == 0 and queue.redis.sismember(RUNS_KEY, ours)


def test_a_one_run_follower_stopped_before_any_run_exits_stopped(stack_parts):
    stop = threading.Event()
    follower = _pinned_follower(stack_parts, 1, "train-0.svc:29400", stop)
    threading.Timer(0.5, stop.set).start()
    assert follow_one_run(follower, stack_parts[0], stop) == EXIT_STOPPED
