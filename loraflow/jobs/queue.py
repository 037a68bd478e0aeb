"""The Redis Streams job system: queue, worker loop, leases, reaper, attempt fencing, dead letters, events.

Keys of one queue (kind = "train" | "compile"):

    loraflow:jobs:{kind}:stream         the work stream (one entry per delivery: {job_id}); group "workers"
    loraflow:jobs:{kind}:dead           dead-letter stream (job_id, reason, attempt, time)
    loraflow:jobs:{kind}:index          sorted set job_id -> create time (listing, newest first)
    loraflow:jobs:{kind}:request_ids    hash request_id -> job_id (idempotent submit)
    loraflow:jobs:{kind}:job:{id}       job state hash
    loraflow:jobs:{kind}:job:{id}:events  capped event stream; entry id "{seq}-0"

Delivery is at-least-once. A running worker renews its lease (XCLAIM to itself, which resets the
entry's idle time) every lease/3 seconds; a reaper in every worker takes over entries idle for 3
leases (XAUTOCLAIM), i.e. the jobs of dead or frozen workers. Every start bumps the job's `attempt`,
and every write of a running job is checked against it (Lua scripts or WATCH/MULTI), so a zombie
worker of an older attempt can no longer write: it gets LeaseLost. A job whose runs were lost
`max_deliveries` times goes to the dead-letter stream and ends FAILED. A worker that stops
gracefully re-queues its job (a fresh stream entry) without counting a failed delivery.

Redis outages: inside a running job every Redis call of JobContext is retried with backoff for up to
`outage_seconds` (2 leases by default, so nobody can have taken the job over meanwhile); a blip is
never a crash of the job. An outage longer than that ends the attempt with RedisOutage (a LeaseLost):
the job is released when Redis answers again, or taken over by the reaper, and runs again; it is
never marked FAILED for it. The worker loop itself (including creating the consumer group at start)
survives outages, logging once per outage, and reports readiness through `on_ready`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import random
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from loraflow.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobCancelled,
    LeaseLost,
    LoraflowError,
    NotFound,
    Unavailable,
    WorkerStopping,
)
from loraflow.options import names
from loraflow.options.names import validate_name

log = logging.getLogger(__name__)

KINDS = ("train", "compile")
STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
GROUP = "workers"
MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID_LEN = 128
MAX_LABELS = 64
MAX_LABEL_LEN = 256

# What "Redis is unreachable" looks like: the client's errors, and ours wrapping them (JobQueue._run).
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, Unavailable)


def redis_unavailable(exc: BaseException) -> Unavailable:
    """What a caller sees of an unreachable Redis: the same reason as the server's interceptor gives, and
    no address (the cause stays chained for the logs)."""
    log.debug("redis unreachable: %s", exc)
    return Unavailable(f"job store (redis) is unreachable; retry later ({type(exc).__name__})",
                       reason="REDIS_UNAVAILABLE")


class RedisOutage(LeaseLost):
    """Redis stayed unreachable past a running job's outage budget: the attempt stops, the job is redelivered."""


def _s(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _ts(value: Any) -> datetime | None:
    text = _s(value)
    if not text:
        return None
    return datetime.fromtimestamp(float(text), UTC)


@dataclass(frozen=True)
class JobRecord:
    """One job as stored in Redis; fields mirror loraflow.v1.Job (state without the JOB_STATE_ prefix)."""

    id: str
    kind: str
    state: str
    payload: dict
    create_time: datetime
    attempt: int = 0
    progress: float = 0.0
    message: str = ""
    error: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    result: dict | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    update_time: datetime | None = None
    worker: str = ""
    releases: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class JobEventRecord:
    """One entry of a job's event stream; seq starts at 1 and grows by one."""

    job_id: str
    seq: int
    time: datetime
    state: str
    progress: float
    message: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


# -- Lua: every write of a job happens atomically and, for running jobs, fenced by the attempt number. --

_EVENT_FN = """
local function add_event(job, events, now, maxlen, metrics)
  local seq = redis.call('HINCRBY', job, 'seq', 1)
  local h = redis.call('HMGET', job, 'state', 'progress', 'message')
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, seq .. '-0', 'seq', seq, 'time', now,
             'state', h[1], 'progress', h[2], 'message', h[3], 'metrics', metrics)
  return seq
end
local function ack(stream, group, msg_id)
  if msg_id and msg_id ~= '' then
    redis.call('XACK', stream, group, msg_id)
    redis.call('XDEL', stream, msg_id)
  end
end
local function terminal(state)
  return state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED'
end
"""

# KEYS: job, events, stream, index, request_ids
# ARGV: job_id, request_id, now, payload, labels, kind, maxlen, state, result, message
_SUBMIT = _EVENT_FN + """
if ARGV[2] ~= '' then
  local existing = redis.call('HGET', KEYS[5], ARGV[2])
  if existing then return {0, existing} end
  redis.call('HSET', KEYS[5], ARGV[2], ARGV[1])
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'kind', ARGV[6], 'state', ARGV[8], 'payload', ARGV[4],
           'labels', ARGV[5], 'request_id', ARGV[2], 'attempt', 0, 'releases', 0, 'progress', 0,
           'message', ARGV[10], 'error', '', 'create_time', ARGV[3], 'update_time', ARGV[3], 'seq', 0,
           'result', ARGV[9], 'worker', '')
if ARGV[8] == 'SUCCEEDED' then
  redis.call('HSET', KEYS[1], 'progress', 1, 'end_time', ARGV[3])
else
  local id = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1])
  redis.call('HSET', KEYS[1], 'msg_id', id)
end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
add_event(KEYS[1], KEYS[2], ARGV[3], ARGV[7], '{}')
return {1, ARGV[1]}
"""

# KEYS: job, events, stream, dead
# ARGV: now, consumer, msg_id, max_deliveries, maxlen, group
_START = _EVENT_FN + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'releases', 'id', 'worker')
if not h[1] then
  ack(KEYS[3], ARGV[6], ARGV[3])
  return {'MISSING', 0}
end
if terminal(h[1]) then
  ack(KEYS[3], ARGV[6], ARGV[3])
  return {'TERMINAL', 0}
end
local attempt = tonumber(h[2])
local lost = attempt - tonumber(h[3])
if lost >= tonumber(ARGV[4]) then
  local reason = 'dead-lettered after ' .. attempt .. ' deliveries: the worker running it was lost every time'
  if h[5] and h[5] ~= '' then reason = reason .. ' (last: ' .. h[5] .. ')' end
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'error', reason, 'end_time', ARGV[1], 'update_time', ARGV[1],
             'message', 'moved to the dead-letter stream', 'worker', '')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'job_id', h[4], 'reason', reason,
             'attempt', attempt, 'time', ARGV[1])
  ack(KEYS[3], ARGV[6], ARGV[3])
  add_event(KEYS[1], KEYS[2], ARGV[1], ARGV[5], '{}')
  return {'DEAD', attempt}
end
attempt = attempt + 1
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'attempt', attempt, 'start_time', ARGV[1], 'worker', ARGV[2],
           'msg_id', ARGV[3], 'update_time', ARGV[1], 'message', 'running (attempt ' .. attempt .. ')')
add_event(KEYS[1], KEYS[2], ARGV[1], ARGV[5], '{}')
return {'STARTED', attempt}
"""

# KEYS: job, stream.  ARGV: group, consumer, msg_id, attempt
_RENEW = _EVENT_FN + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if tonumber(h[2]) ~= tonumber(ARGV[4]) then return 'LOST' end
if h[1] == 'CANCELLED' then return 'CANCELLED' end
if h[1] ~= 'RUNNING' then return 'LOST' end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 'OK'
"""

# KEYS: job, events.  ARGV: attempt, now, progress, message, metrics, maxlen
_REPORT = _EVENT_FN + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if tonumber(h[2]) ~= tonumber(ARGV[1]) then return 'LOST' end
if h[1] == 'CANCELLED' then return 'CANCELLED' end
if h[1] ~= 'RUNNING' then return 'LOST' end
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'message', ARGV[4], 'update_time', ARGV[2])
add_event(KEYS[1], KEYS[2], ARGV[2], ARGV[6], ARGV[5])
return 'OK'
"""

# KEYS: job, events, stream.  ARGV: attempt, now, action (FAIL | RELEASE | RETRY), text, msg_id, group, maxlen
_FINISH = _EVENT_FN + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'id')
if tonumber(h[2]) ~= tonumber(ARGV[1]) then return 'LOST' end
if h[1] == 'CANCELLED' then
  ack(KEYS[3], ARGV[6], ARGV[5])
  return 'CANCELLED'
end
if h[1] ~= 'RUNNING' then return 'LOST' end
ack(KEYS[3], ARGV[6], ARGV[5])
if ARGV[3] == 'FAIL' then
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'error', ARGV[4], 'message', 'failed', 'end_time', ARGV[2],
             'update_time', ARGV[2], 'worker', '')
else
  -- Back in the queue as a fresh entry, so any worker picks it up at once.
  if ARGV[3] == 'RELEASE' then redis.call('HINCRBY', KEYS[1], 'releases', 1) end
  local id = redis.call('XADD', KEYS[3], '*', 'job_id', h[3])
  redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'message', ARGV[4], 'msg_id', id, 'update_time', ARGV[2],
             'worker', '')
end
add_event(KEYS[1], KEYS[2], ARGV[2], ARGV[7], '{}')
return 'OK'
"""

# KEYS: job, events.  ARGV: now, maxlen
_CANCEL = _EVENT_FN + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'MISSING' end
if terminal(state) then return state end
redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'message', 'cancelled', 'end_time', ARGV[1],
           'update_time', ARGV[1])
add_event(KEYS[1], KEYS[2], ARGV[1], ARGV[2], '{}')
return 'OK'
"""


def _encode_token(score: float, job_id: str) -> str:
    raw = json.dumps([repr(score), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    """(score, job_id) of the last job of the previous page; InvalidArgument naming page_token otherwise."""
    try:
        padded = token + "=" * (-len(token) % 4)
        score_text, job_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        score = float(score_text)
        if not math.isfinite(score) or not isinstance(job_id, str):
            raise ValueError(token)
        validate_name("page_token", job_id)
    except (ValueError, TypeError, binascii.Error, UnicodeError, InvalidArgument):
        raise InvalidArgument(f"page_token is not a token returned by this service: {token[:80]!r}",
                              field="page_token", value=token) from None
    return score, job_id


def _validate_page_size(page_size: int) -> int:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size!r}",
                              field="page_size", value=page_size)
    return page_size


def _validate_state(state: str | None) -> str | None:
    if state is None or state == "":
        return None
    if state not in STATES:
        raise InvalidArgument(f"state must be one of {', '.join(STATES)}, got {state!r}", field="state", value=state)
    return state


def validate_request_id(request_id: str) -> str:
    # One rule for every service's request_id (trainer, compiler, inference): loraflow.options.names.
    return names.validate_request_id(request_id)


def validate_labels(labels: dict[str, str] | None) -> dict[str, str]:
    labels = dict(labels or {})
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels, got {len(labels)}", field="labels", value=len(labels))
    for key, value in labels.items():
        validate_name("labels", key)
        if not isinstance(value, str) or len(value) > MAX_LABEL_LEN:
            raise InvalidArgument(f"label {key!r} must be text of at most {MAX_LABEL_LEN} characters",
                                  field=f"labels[{key}]", value=value)
    return labels


class JobQueue:
    """One job kind's queue; all processes using the same kind and Redis share it.

    lease_seconds: renewal every lease/3 s; another worker takes a job over after 3 leases without renewal.
    max_deliveries: runs a job may lose (worker death, transient errors) before it is dead-lettered.
    outage_seconds: how long a running job retries Redis before giving the attempt up (default 2 leases,
    below the 3 leases after which the reaper takes a job over).
    liveness_redis: the client lease renewals use (default `redis_client`); a worker process gives it a pool
    of its own, so a renewal never waits behind client load (loraflow.options.config.LIVENESS_REDIS_CONNECTIONS).
    """

    def __init__(self, redis_client: redis.Redis, kind: str, *, lease_seconds: float = 30.0,
                 max_deliveries: int = 3, events_maxlen: int = 10_000, outage_seconds: float | None = None,
                 liveness_redis: redis.Redis | None = None):
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}", field="kind", value=kind)
        if not lease_seconds > 0:
            raise InvalidArgument(f"lease_seconds must be > 0, got {lease_seconds}", field="lease_seconds",
                                  value=lease_seconds)
        if max_deliveries < 1:
            raise InvalidArgument(f"max_deliveries must be >= 1, got {max_deliveries}", field="max_deliveries",
                                  value=max_deliveries)
        self.redis = redis_client
        self.liveness = liveness_redis if liveness_redis is not None else redis_client
        self.kind = kind
        self.lease_seconds = float(lease_seconds)
        self.max_deliveries = int(max_deliveries)
        self.events_maxlen = int(events_maxlen)
        self.outage_seconds = float(outage_seconds if outage_seconds is not None else 2 * self.lease_seconds)
        if not self.outage_seconds >= 0:
            raise InvalidArgument(f"outage_seconds must be >= 0, got {outage_seconds}", field="outage_seconds",
                                  value=outage_seconds)
        base = f"loraflow:jobs:{kind}"
        self.stream_key = f"{base}:stream"
        self.dead_key = f"{base}:dead"
        self.index_key = f"{base}:index"
        self.request_ids_key = f"{base}:request_ids"
        self._job_prefix = f"{base}:job:"
        self._scripts = {name: redis_client.register_script(src) for name, src in (
            ("submit", _SUBMIT), ("start", _START), ("renew", _RENEW), ("report", _REPORT),
            ("finish", _FINISH), ("cancel", _CANCEL))}
        self._group_ready = False

    # -- keys and plumbing --

    def job_key(self, job_id: str) -> str:
        return self._job_prefix + job_id

    def events_key(self, job_id: str) -> str:
        return self._job_prefix + job_id + ":events"

    @property
    def reclaim_idle_ms(self) -> int:
        """Idle time after which the reaper takes a job over: three leases."""
        return int(3 * self.lease_seconds * 1000)

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.stream_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _run(self, name: str, keys: list[str], args: list[Any], client: redis.Redis | None = None):
        try:
            return self._scripts[name](keys=keys, args=args, client=client)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise redis_unavailable(exc) from exc

    def new_job_id(self) -> str:
        return f"{self.kind}-{uuid.uuid4().hex[:16]}"

    # -- client side --

    def submit(self, payload: dict, *, request_id: str = "", labels: dict[str, str] | None = None) -> JobRecord:
        """Queue a job; a request_id seen before returns the original job instead."""
        return self._create(payload, request_id=request_id, labels=labels, state="QUEUED", result=None,
                            message="queued")

    def submit_succeeded(self, payload: dict, result: dict, *, request_id: str = "",
                         labels: dict[str, str] | None = None, message: str = "cache hit") -> JobRecord:
        """A job born SUCCEEDED (a cache hit): same record and events as a job that ran, nothing queued."""
        return self._create(payload, request_id=request_id, labels=labels, state="SUCCEEDED", result=result,
                            message=message)

    def _create(self, payload, *, request_id, labels, state, result, message) -> JobRecord:
        if not isinstance(payload, dict):
            raise InvalidArgument("payload must be a dict", field="payload", value=type(payload).__name__)
        request_id = validate_request_id(request_id or "")
        labels = validate_labels(labels)
        self.ensure_group()
        job_id = self.new_job_id()
        created, existing_id = self._run("submit", [
            self.job_key(job_id), self.events_key(job_id), self.stream_key, self.index_key, self.request_ids_key,
        ], [job_id, request_id, repr(time.time()), json.dumps(payload), json.dumps(labels), self.kind,
            self.events_maxlen, state, json.dumps(result) if result is not None else "", message])
        return self.get(_s(existing_id))

    def get(self, job_id: str) -> JobRecord:
        validate_name("job_id", job_id)
        try:
            raw = self.redis.hgetall(self.job_key(job_id))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise redis_unavailable(exc) from exc
        if not raw:
            raise NotFound(f"no {self.kind} job {job_id!r}", field="job_id", value=job_id)
        return self._record(raw)

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except NotFound:
            return None

    @staticmethod
    def _record(raw: dict) -> JobRecord:
        h = {_s(k): _s(v) for k, v in raw.items()}
        return JobRecord(
            id=h["id"], kind=h["kind"], state=h["state"], payload=json.loads(h.get("payload") or "{}"),
            create_time=_ts(h["create_time"]), attempt=int(h.get("attempt") or 0),
            progress=float(h.get("progress") or 0.0), message=h.get("message", ""), error=h.get("error", ""),
            labels=json.loads(h.get("labels") or "{}"), request_id=h.get("request_id", ""),
            result=json.loads(h["result"]) if h.get("result") else None, start_time=_ts(h.get("start_time")),
            end_time=_ts(h.get("end_time")), update_time=_ts(h.get("update_time")), worker=h.get("worker", ""),
            releases=int(h.get("releases") or 0))

    def list(self, state: str | None = None, page_size: int = 50, page_token: str = "") -> tuple[list[JobRecord], str]:
        """Jobs newest first, optionally only in `state`; returns (page, next_page_token or "")."""
        state = _validate_state(state)
        page_size = _validate_page_size(page_size)
        cursor = _decode_token(page_token) if page_token else None
        out: list[tuple[float, JobRecord]] = []
        for score, record in self._scan(cursor):
            if state is None or record.state == state:
                out.append((score, record))
                if len(out) > page_size:
                    break
        more = len(out) > page_size
        out = out[:page_size]
        token = _encode_token(out[-1][0], out[-1][1].id) if more and out else ""
        return [r for _, r in out], token

    def _scan(self, cursor: tuple[float, str] | None, chunk: int = 200) -> Iterator[tuple[float, JobRecord]]:
        """(score, record) newest first, strictly after `cursor` in (score desc, id desc) order."""
        max_score: Any = "+inf" if cursor is None else repr(cursor[0])
        offset = 0
        while True:
            rows = self.redis.zrevrangebyscore(self.index_key, max_score, "-inf", start=offset, num=chunk,
                                               withscores=True)
            if not rows:
                return
            offset += len(rows)
            ids = [_s(m) for m, _ in rows]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            for (member, score), raw in zip(rows, pipe.execute(), strict=True):
                job_id = _s(member)
                if cursor is not None and (score, job_id) >= cursor:
                    continue
                if raw:
                    yield score, self._record(raw)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job at once; FailedPrecondition when it already ended."""
        validate_name("job_id", job_id)
        outcome = _s(self._run("cancel", [self.job_key(job_id), self.events_key(job_id)],
                               [repr(time.time()), self.events_maxlen]))
        if outcome == "MISSING":
            raise NotFound(f"no {self.kind} job {job_id!r}", field="job_id", value=job_id)
        if outcome != "OK":
            raise FailedPrecondition(f"job {job_id} already ended in state {outcome}; it cannot be cancelled",
                                     field="job_id", value=job_id, metadata={"state": outcome})
        return self.get(job_id)

    def events(self, job_id: str, after_seq: int = 0) -> list[JobEventRecord]:
        validate_name("job_id", job_id)
        _validate_after_seq(after_seq)
        rows = self.redis.xrange(self.events_key(job_id), min=f"{after_seq + 1}-0", max="+")
        return [self._event(job_id, fields) for _, fields in rows]

    @staticmethod
    def _event(job_id: str, fields: dict) -> JobEventRecord:
        f = {_s(k): _s(v) for k, v in fields.items()}
        return JobEventRecord(job_id=job_id, seq=int(f["seq"]), time=_ts(f["time"]), state=f["state"],
                              progress=float(f.get("progress") or 0.0), message=f.get("message", ""),
                              metrics={k: float(v) for k, v in json.loads(f.get("metrics") or "{}").items()})

    def watch(self, job_id: str, after_seq: int = 0, stop: threading.Event | None = None,
              poll_ms: int = 500) -> Iterator[JobEventRecord]:
        """Past events after `after_seq`, then live ones, until the terminal event (or `stop` is set)."""
        job = self.get(job_id)  # NotFound for unknown jobs before anything is yielded
        _validate_after_seq(after_seq)
        last = after_seq
        key = self.events_key(job_id)
        while True:
            for event in self.events(job_id, last):
                last = event.seq
                yield event
                if event.terminal:
                    return
            if stop is not None and stop.is_set():
                return
            job = self.get(job_id)
            if job.terminal:
                # Terminal and nothing newer than `last` (e.g. after_seq already past the end).
                if not self.events(job_id, last):
                    return
                continue
            self.redis.xread({key: f"{last}-0"}, count=100, block=poll_ms)

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        rows = self.redis.xrange(self.dead_key, count=count)
        return [{_s(k): _s(v) for k, v in fields.items()} for _, fields in rows]

    # -- worker side (used by JobWorker / JobContext) --

    def _start(self, job_id: str, consumer: str, msg_id: str) -> tuple[str, int]:
        status, attempt = self._run("start", [self.job_key(job_id), self.events_key(job_id), self.stream_key,
                                              self.dead_key],
                                    [repr(time.time()), consumer, msg_id, self.max_deliveries, self.events_maxlen,
                                     GROUP])
        return _s(status), int(attempt)

    def _finish(self, job_id: str, attempt: int, msg_id: str, action: str, text: str) -> str:
        return _s(self._run("finish", [self.job_key(job_id), self.events_key(job_id), self.stream_key],
                            [attempt, repr(time.time()), action, text, msg_id, GROUP, self.events_maxlen]))

    def _ack(self, msg_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.xack(self.stream_key, GROUP, msg_id)
        pipe.xdel(self.stream_key, msg_id)
        pipe.execute()


def _validate_after_seq(after_seq: int) -> None:
    if not isinstance(after_seq, int) or not 0 <= after_seq < 2**62:
        raise InvalidArgument(f"after_seq must be >= 0, got {after_seq!r}", field="after_seq", value=after_seq)


def list_jobs_merged(queues: Iterable[JobQueue], state: str | None = None, page_size: int = 50,
                     page_token: str = "") -> tuple[list[JobRecord], str]:
    """One newest-first page across several queues (the page token is shared: it orders by time, then id)."""
    queues = list(queues)
    if len(queues) == 1:
        return queues[0].list(state, page_size, page_token)
    _validate_page_size(page_size)
    merged: list[JobRecord] = []
    more = False
    for q in queues:
        page, token = q.list(state, page_size, page_token)
        merged.extend(page)
        more = more or bool(token)
    merged.sort(key=lambda r: (r.create_time.timestamp(), r.id), reverse=True)
    more = more or len(merged) > page_size
    merged = merged[:page_size]
    if not more or not merged:
        return merged, ""
    last = merged[-1]
    score = float(queues[0].redis.zscore(next(q.index_key for q in queues if q.kind == last.kind), last.id))
    return merged, _encode_token(score, last.id)


def retry_redis(call: Callable[[], Any], *, budget: float, what: str, stop: threading.Event | None = None) -> Any:
    """call() again (backoff 0.05 s doubling to 1 s) while Redis is unreachable, for up to `budget` seconds.

    Logs once when the outage starts and once when it ends. RedisOutage once the budget is spent, or
    at once when `stop` is set (a stopping worker must not wait for Redis).
    """
    deadline = None
    delay = 0.05
    while True:
        try:
            value = call()
        except REDIS_UNREACHABLE as exc:
            now = time.monotonic()
            if deadline is None:
                deadline = now + budget
                log.warning("%s: redis unreachable (%s); retrying for up to %.0fs", what, exc.__cause__ or exc,
                            budget)
            if now >= deadline or (stop is not None and stop.is_set()):
                raise RedisOutage(f"{what}: redis unreachable for {now - deadline + budget:.1f}s ({exc}); "
                                  "the job will be redelivered") from exc
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 1.0)
            continue
        if deadline is not None:
            log.info("%s: redis reachable again", what)
        return value


class JobContext:
    """What a handler sees of its job: payload, attempt, progress reporting and the control checks."""

    def __init__(self, queue: JobQueue, record: JobRecord, attempt: int, msg_id: str,
                 stop_event: threading.Event):
        self.queue = queue
        self.record = record
        self.job_id = record.id
        self.attempt = attempt
        self.payload = record.payload
        self.labels = record.labels
        self.msg_id = msg_id
        self._stop_event = stop_event
        self._cancelled = threading.Event()
        self._lost = threading.Event()
        self.finished = False

    def _redis(self, what: str, call: Callable[[], Any]) -> Any:
        """call() retried through a Redis outage for up to queue.outage_seconds (RedisOutage after)."""
        return retry_redis(call, budget=self.queue.outage_seconds, what=f"job {self.job_id} {what}",
                           stop=self._stop_event)

    @property
    def stopping(self) -> bool:
        """True once the worker was asked to stop: checkpoint and raise/return soon."""
        return self._stop_event.is_set()

    def _raise_for(self, outcome: str) -> None:
        if outcome == "CANCELLED":
            self._cancelled.set()
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if outcome == "LOST":
            self._lost.set()
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} was taken over by another worker")

    def check(self) -> None:
        """Raise JobCancelled, LeaseLost or WorkerStopping when the handler must stop; call it often."""
        if self._cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} was taken over by another worker")
        state, attempt = (_s(v) for v in self._redis("check", lambda: self.queue.redis.hmget(
            self.queue.job_key(self.job_id), "state", "attempt")))
        if attempt != str(self.attempt) or state not in ("RUNNING", "CANCELLED"):
            self._raise_for("LOST")
        if state == "CANCELLED":
            self._raise_for("CANCELLED")
        if self._stop_event.is_set():
            raise WorkerStopping(f"worker stopping; job {self.job_id} will be redelivered")

    def report(self, progress: float, message: str = "", metrics: dict[str, float] | None = None) -> None:
        """Record progress (0..1), a status line and numeric metrics as an event; raises like check()
        for cancellation and lost leases (not for stopping: use check() or `stopping` for that)."""
        progress = min(max(float(progress), 0.0), 1.0)
        clean = {str(k): float(v) for k, v in (metrics or {}).items() if math.isfinite(float(v))}
        now = repr(time.time())
        outcome = _s(self._redis("report", lambda: self.queue._run(
            "report", [self.queue.job_key(self.job_id), self.queue.events_key(self.job_id)],
            [self.attempt, now, repr(progress), message, json.dumps(clean), self.queue.events_maxlen])))
        self._raise_for(outcome)

    def succeed(self, result: dict, commit: Callable[[redis.client.Pipeline], None] | None = None,
                message: str = "succeeded") -> None:
        """Publish the result, atomically with `commit`'s writes, only if this attempt still owns the job."""
        q = self.queue
        job_key, events_key = q.job_key(self.job_id), q.events_key(self.job_id)
        payload = json.dumps(result)
        interrupted = False  # a connection error may hide a transaction that did commit

        def attempt_publish() -> bool:
            nonlocal interrupted
            with q.redis.pipeline() as pipe:
                try:
                    pipe.watch(job_key)
                    state, attempt, seq = (_s(v) for v in pipe.hmget(job_key, "state", "attempt", "seq"))
                    if attempt != str(self.attempt):
                        self._raise_for("LOST")
                    if state == "SUCCEEDED" and interrupted:
                        return True  # our EXEC landed before the connection broke; only this attempt writes it
                    if state == "CANCELLED":
                        self._raise_for("CANCELLED")
                    if state != "RUNNING":
                        self._raise_for("LOST")
                    now = repr(time.time())
                    seq_next = int(seq or 0) + 1
                    pipe.multi()
                    pipe.hset(job_key, mapping={"state": "SUCCEEDED", "result": payload, "progress": 1,
                                                "message": message, "end_time": now, "update_time": now,
                                                "error": "", "seq": seq_next, "worker": ""})
                    pipe.xadd(events_key, {"seq": seq_next, "time": now, "state": "SUCCEEDED", "progress": 1,
                                           "message": message, "metrics": "{}"},
                              id=f"{seq_next}-0", maxlen=q.events_maxlen, approximate=True)
                    if commit is not None:
                        commit(pipe)
                    pipe.xack(q.stream_key, GROUP, self.msg_id)
                    pipe.xdel(q.stream_key, self.msg_id)
                    try:
                        pipe.execute()
                    except REDIS_UNREACHABLE:
                        interrupted = True
                        raise
                    return True
                except redis.WatchError:
                    return False  # someone wrote the job meanwhile (a report, a cancel): look again

        while not self._redis("publish", attempt_publish):
            pass
        self.finished = True


HandlerFn = Callable[[JobContext], dict | None]


# Longest wait between two tries of a worker that cannot reach Redis (or create its group).
MAX_BACKOFF_S = 2.0


class _GroupRefused(Exception):
    """Redis answered XGROUP CREATE with an error: retried like an outage."""


class JobWorker:
    """Takes jobs of one queue and runs `handler(ctx) -> result dict` until `stop_event` is set.

    Handler outcomes: a returned dict → SUCCEEDED (unless cancelled or fenced); JobCancelled → acked,
    nothing published; LeaseLost → dropped (another worker owns it); WorkerStopping → re-queued without
    counting a failed delivery; RedisOutage or a Redis connection error → released once Redis answers
    (else left to the reaper), never FAILED; Unavailable → re-queued, counted; any other exception → FAILED.

    on_ready(bool) is called when the worker becomes able to take jobs (consumer group created, Redis
    answering) and when it loses that (a Redis outage); see loraflow.server.redis_health for probes.
    """

    def __init__(self, queue: JobQueue, handler: HandlerFn, consumer: str | None = None,
                 stop_event: threading.Event | None = None, *, poll_ms: int = 2000,
                 reaper_interval: float | None = None, on_ready: Callable[[bool], None] | None = None):
        self.queue = queue
        self.on_ready = on_ready
        self.ready = False
        self._started = False
        self.handler = handler
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.stop_event = stop_event or threading.Event()
        self.poll_ms = int(poll_ms)
        self.reaper_interval = float(reaper_interval if reaper_interval is not None else queue.lease_seconds)
        self.current: JobContext | None = None
        self.jobs_done = 0

    def stop(self) -> None:
        self.stop_event.set()

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            if ready and not self._started:
                self._started = True
                log.info("worker %s on queue %s started", self.consumer, self.queue.kind)
            self.ready = ready
            if self.on_ready is not None:
                self.on_ready(ready)

    def run(self) -> None:
        """The job loop; survives Redis outages (capped exponential backoff with jitter, one log line per
        outage) and a consumer group Redis refuses to create (READONLY replica, WRONGTYPE key, ...)."""
        self._started = False
        next_reap = 0.0
        outage_since: float | None = None
        backoff = 0.1
        while not self.stop_event.is_set():
            try:
                try:
                    self.queue.ensure_group()
                except redis.ResponseError as exc:
                    # Not an outage, but the worker cannot take jobs either: retry, never die.
                    raise _GroupRefused(str(exc)) from exc
                if outage_since is not None:
                    log.info("worker %s: redis reachable again after %.1fs", self.consumer,
                             time.monotonic() - outage_since)
                    outage_since, backoff = None, 0.1
                self._set_ready(True)
                message = None
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self.reaper_interval
                    message = self._reap_one()
                if message is None:
                    message = self._read_one()
                if message is not None:
                    self._process(*message)
            except (*REDIS_UNREACHABLE, _GroupRefused) as exc:
                self._set_ready(False)
                if outage_since is None:
                    outage_since = time.monotonic()
                    what = ("cannot create its consumer group" if isinstance(exc, _GroupRefused)
                            else "redis unreachable")
                    log.warning("worker %s: %s (%s); not ready, retrying with backoff", self.consumer, what,
                                exc.__cause__ or exc)
                # Full jitter: workers that lost the same Redis do not all knock again at the same instant.
                self.stop_event.wait(random.uniform(0.5, 1.0) * backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted under us (a flushed or restarted Redis): recreate the group.
                log.warning("worker %s: consumer group missing; recreating it", self.consumer)
                self.queue._group_ready = False
        self._set_ready(False)
        log.info("worker %s on queue %s stopped", self.consumer, self.queue.kind)

    def run_once(self, timeout_ms: int | None = None) -> bool:
        """Process at most one job (reaping first); True if one was taken. For tests and tools."""
        self.queue.ensure_group()
        message = self._reap_one() or self._read_one(timeout_ms)
        if message is None:
            return False
        self._process(*message)
        return True

    def _read_one(self, timeout_ms: int | None = None) -> tuple[str, str] | None:
        reply = self.queue.redis.xreadgroup(GROUP, self.consumer, {self.queue.stream_key: ">"}, count=1,
                                            block=timeout_ms if timeout_ms is not None else self.poll_ms)
        for _stream, entries in reply or []:
            for msg_id, fields in entries:
                return _s(msg_id), _s(fields.get(b"job_id", fields.get("job_id")))
        return None

    def _reap_one(self) -> tuple[str, str] | None:
        """Take over one entry idle for 3 leases (its worker died or froze)."""
        reply = self.queue.redis.xautoclaim(self.queue.stream_key, GROUP, self.consumer,
                                            min_idle_time=self.queue.reclaim_idle_ms, start_id="0-0", count=1)
        for entry in reply[1] if reply and len(reply) > 1 else []:
            if not entry or entry[1] is None:
                continue
            msg_id, fields = entry
            job_id = _s(fields.get(b"job_id", fields.get("job_id")))
            log.warning("worker %s reclaimed job %s (entry %s) from a lost worker", self.consumer, job_id,
                        _s(msg_id))
            return _s(msg_id), job_id
        return None

    def _process(self, msg_id: str, job_id: str) -> None:
        q = self.queue
        status, attempt = q._start(job_id, self.consumer, msg_id)
        if status == "DEAD":
            log.error("job %s dead-lettered after %d deliveries", job_id, attempt)
            return
        if status != "STARTED":
            log.info("job %s skipped (%s)", job_id, status)
            return
        try:
            record = retry_redis(lambda: q.get(job_id), budget=q.outage_seconds, what=f"job {job_id} load",
                                 stop=self.stop_event)
        except RedisOutage as exc:
            log.warning("job %s attempt %d not run: %s", job_id, attempt, exc)
            return  # RUNNING with a pending entry: the reaper hands it out again
        ctx = JobContext(q, record, attempt, msg_id, self.stop_event)
        self.current = ctx
        done = threading.Event()
        renewer = threading.Thread(target=self._renew_loop, args=(ctx, done), name=f"lease-{job_id}", daemon=True)
        renewer.start()
        try:
            result = self.handler(ctx)
            if not ctx.finished:
                ctx.succeed(result or {})
            log.info("job %s attempt %d succeeded", job_id, attempt)
        except JobCancelled:
            q._ack(msg_id)
            log.info("job %s attempt %d cancelled; nothing published", job_id, attempt)
        except (RedisOutage, redis.ConnectionError, redis.TimeoutError) as exc:
            # Not the job's fault: hand it back without counting a lost delivery, if Redis lets us.
            self._release_after_outage(ctx, exc)
        except LeaseLost as exc:
            log.warning("job %s attempt %d fenced: %s", job_id, attempt, exc)
        except WorkerStopping:
            outcome = q._finish(job_id, attempt, msg_id, "RELEASE",
                                f"re-queued: worker {self.consumer} stopped (attempt {attempt})")
            log.info("job %s attempt %d released on stop (%s)", job_id, attempt, outcome)
        except Unavailable as exc:
            if exc.reason == "REDIS_UNAVAILABLE":  # raised by a JobQueue call of the handler's own
                self._release_after_outage(ctx, exc)
                return
            outcome = q._finish(job_id, attempt, msg_id, "RETRY", f"re-queued after a transient error: {exc}")
            log.warning("job %s attempt %d re-queued after %s (%s)", job_id, attempt, exc, outcome)
        except Exception as exc:  # noqa: BLE001 - a handler bug must end the job, not the worker
            if isinstance(exc, LoraflowError):
                text = str(exc)
            else:
                text = f"{type(exc).__name__}: {exc}"
                log.error("job %s attempt %d crashed:\n%s", job_id, attempt, traceback.format_exc())
            outcome = q._finish(job_id, attempt, msg_id, "FAIL", text)
            log.info("job %s attempt %d failed (%s): %s", job_id, attempt, outcome, text)
        finally:
            done.set()
            renewer.join()
            self.current = None
            self.jobs_done += 1

    def _release_after_outage(self, ctx: JobContext, exc: BaseException) -> None:
        q = self.queue
        text = f"re-queued: redis was unreachable during attempt {ctx.attempt}"
        try:
            outcome = retry_redis(lambda: q._finish(ctx.job_id, ctx.attempt, ctx.msg_id, "RELEASE", text),
                                  budget=q.lease_seconds, what=f"job {ctx.job_id} release")
        except RedisOutage:
            log.warning("job %s attempt %d stopped (%s); redis still away: the reaper will redeliver it",
                        ctx.job_id, ctx.attempt, exc)
            return
        log.warning("job %s attempt %d released after a redis outage (%s): %s", ctx.job_id, ctx.attempt,
                    outcome, exc)

    def _renew_loop(self, ctx: JobContext, done: threading.Event) -> None:
        """Keep the lease while the handler runs; flag cancellation and takeover for ctx.check()."""
        q = self.queue
        failing = False
        while not done.wait(q.lease_seconds / 3):
            try:
                outcome = _s(q._run("renew", [q.job_key(ctx.job_id), q.stream_key],
                                    [GROUP, self.consumer, ctx.msg_id, ctx.attempt], client=q.liveness))
            except (Unavailable, redis.RedisError) as exc:
                if not failing:  # once per outage; the handler's own calls decide when to give up
                    log.warning("lease renewal of %s failed (%s); retrying", ctx.job_id, exc)
                failing = True
                continue
            if failing:
                log.info("lease renewal of %s works again", ctx.job_id)
                failing = False
            if outcome == "CANCELLED":
                ctx._cancelled.set()
                return
            if outcome == "LOST":
                ctx._lost.set()
                return
