"""Multi-machine training attempts in Redis: node 0 opens a run, follower workers claim its other nodes.

    loraflow:train:run:{job_id}:{attempt}   hash: job_id, attempt, endpoint (HOST:PORT of node 0's
                                            rendezvous), nnodes, nproc, resume_key, claimed (a counter),
                                            state ("open" / "ended"), release (a follower asks node 0
                                            to checkpoint and hand the job back)
    loraflow:train:runs                     set of the run keys that may still want followers

Crash safety: the run hash expires unless node 0 refreshes it (every poll, TTL = RUN_TTL_SECONDS), so a
run whose node 0 died reads as ended; followers drop set entries whose hash is gone. Node ranks are
claimed in one script (a ``node:K`` field set once, then the ``claimed`` counter), so two followers never get
the same node rank, whether they take any free one (``claim``) or a fixed one (``claim_node``, an Indexed
Job's pod index).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

RUN_PREFIX = "loraflow:train:run:"
RUNS_KEY = "loraflow:train:runs"
RUN_TTL_SECONDS = 10
# Claim only while the run is open (a write alone would recreate an expired hash without a TTL).
# ARGV[1] = the node rank wanted, 0 = the lowest free one. Returns {node, claimed so far} or -1.
_CLAIM = """
if redis.call('hget', KEYS[1], 'state') ~= 'open' then return -1 end
local n = tonumber(redis.call('hget', KEYS[1], 'nnodes'))
local lo, hi = tonumber(ARGV[1]), tonumber(ARGV[1])
if lo == 0 then lo, hi = 1, n - 1 end
for k = lo, hi do
  if k >= 1 and k < n and redis.call('hsetnx', KEYS[1], 'node:' .. k, 1) == 1 then
    return {k, redis.call('hincrby', KEYS[1], 'claimed', 1)}
  end
end
return -1
"""


@dataclass(frozen=True)
class RunRecord:
    key: str
    job_id: str
    attempt: int
    endpoint: str
    nnodes: int
    nproc: int
    resume_key: str  # "" = train from scratch


@dataclass(frozen=True)
class RunState:
    release: bool  # a follower is stopping: checkpoint and hand the job back
    failed: str  # a follower could not start its ranks (our own error message, never file bytes)
    claimed: int  # node ranks followers took so far


def run_key(job_id: str, attempt: int) -> str:
    return f"{RUN_PREFIX}{job_id}:{attempt}"


class RunBoard:
    def __init__(self, client: redis.Redis):
        self.redis = client

    # --- node 0 ---------------------------------------------------------------------------------

    def open(self, job_id: str, attempt: int, endpoint: str, nnodes: int, nproc: int, resume_key: str) -> str:
        key = run_key(job_id, attempt)
        pipe = self.redis.pipeline()
        pipe.delete(key)
        pipe.hset(key, mapping={"job_id": job_id, "attempt": attempt, "endpoint": endpoint, "nnodes": nnodes,
                                "nproc": nproc, "resume_key": resume_key, "claimed": 0, "state": "open"})
        pipe.expire(key, RUN_TTL_SECONDS)
        pipe.sadd(RUNS_KEY, key)
        pipe.execute()
        return key

    def refresh(self, key: str) -> RunState:
        """Keep the run alive; what its followers asked for."""
        pipe = self.redis.pipeline()
        pipe.expire(key, RUN_TTL_SECONDS)
        pipe.hmget(key, ["release", "failed", "claimed"])
        _, (release, failed, claimed) = pipe.execute()
        return RunState(release=bool(release), failed=(failed.decode() if isinstance(failed, bytes) else failed) or "",
                        claimed=int(claimed or 0))

    def end(self, key: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(key, "state", "ended")
        pipe.expire(key, RUN_TTL_SECONDS)
        pipe.srem(RUNS_KEY, key)
        pipe.execute()

    # --- followers ------------------------------------------------------------------------------

    def open_runs(self) -> list[RunRecord]:
        runs = []
        for raw_key in sorted(self.redis.smembers(RUNS_KEY)):
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            run = self.get(key)
            if run is None:
                self.redis.srem(RUNS_KEY, key)  # its node 0 is gone
            else:
                runs.append(run)
        return runs

    def get(self, key: str) -> RunRecord | None:
        raw = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
               for k, v in self.redis.hgetall(key).items()}
        if raw.get("state") != "open":
            return None
        return RunRecord(key=key, job_id=raw["job_id"], attempt=int(raw["attempt"]), endpoint=raw["endpoint"],
                         nnodes=int(raw["nnodes"]), nproc=int(raw["nproc"]), resume_key=raw["resume_key"])

    def claim(self, run: RunRecord) -> int | None:
        """A node rank 1..nnodes-1 of the run for this caller, or None when every node is taken."""
        return self._claim(run, 0)

    def claim_node(self, run: RunRecord, node: int) -> bool:
        """Node rank ``node`` (1..nnodes-1) of the run for this caller; False when taken or out of range."""
        return 1 <= node < run.nnodes and self._claim(run, node) == node

    def _claim(self, run: RunRecord, want: int) -> int | None:
        reply = self.redis.eval(_CLAIM, 1, run.key, int(want))
        if not isinstance(reply, list):
            return None
        node, claimed = int(reply[0]), int(reply[1])
        if claimed >= run.nnodes - 1:
            self.redis.srem(RUNS_KEY, run.key)  # full: nobody else needs to look at it
        return node

    def is_open(self, key: str) -> bool:
        state = self.redis.hget(key, "state")
        return state in (b"open", "open")

    def ask_release(self, key: str) -> None:
        self.redis.hset(key, "release", 1)

    def fail(self, key: str, message: str) -> None:
        self.redis.hset(key, "failed", message[:500])
