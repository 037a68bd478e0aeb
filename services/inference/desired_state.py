"""The models an inference deployment serves, kept in Redis so every replica converges to the same set.

Keys of one deployment (name validated like every loraflow name):

    loraflow:inference:{deployment}:desired   hash model_id -> JSON DesiredModel
    loraflow:inference:{deployment}:version   counter, bumped by every change
    loraflow:inference:{deployment}:changes   pub/sub channel; each change publishes the new version

A change is one WATCH/MULTI transaction (entry + version), then a PUBLISH. Pub/sub is only a hint: a
replica that missed it sees the version move on its next bounded poll (see services.inference.reconciler).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis

from loraflow.errors import AlreadyExists, InvalidArgument, NotFound
from loraflow.options.names import validate_name

DEFAULT_DEPLOYMENT = "default"
# Bounds on what one entry may hold: Redis could otherwise be filled through LoadAdapter.
MAX_DESIRED_MODELS = 64
MAX_DESIRED_ADAPTERS = 256


@dataclass(frozen=True)
class DesiredAdapter:
    adapter: str  # a registered name or a store URI, as LoadAdapter was given it
    name: str  # the name LoadAdapter was given ("" = the one the adapter itself gives, the same everywhere)


@dataclass(frozen=True)
class DesiredModel:
    model_id: str
    artifact_id: str
    device: str
    num_threads: int = 0
    adapters: tuple[DesiredAdapter, ...] = ()  # in the order they were hot-added
    generation: int = 1  # bumped by every change of this entry
    load_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # a new LoadArtifact = a new load_id

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> DesiredModel:
        data = json.loads(raw)
        # Checked on read too: Redis could hold a planted entry; the reconciler records it as a failure.
        for key in ("model_id", "artifact_id"):
            validate_name(key, data.get(key, ""))
        adapters = tuple(DesiredAdapter(str(a["adapter"]), str(a["name"])) for a in data.get("adapters", ()))
        return cls(model_id=data["model_id"], artifact_id=data["artifact_id"], device=str(data["device"]),
                   num_threads=int(data.get("num_threads", 0)), adapters=adapters,
                   generation=int(data.get("generation", 1)), load_id=str(data.get("load_id", "")))


class DesiredState:
    """Read and change one deployment's desired models; `subscribe()` for change notifications."""

    def __init__(self, client: redis.Redis, deployment: str = DEFAULT_DEPLOYMENT):
        validate_name("deployment", deployment)
        self.redis = client
        self.deployment = deployment
        prefix = f"loraflow:inference:{deployment}"
        self.desired_key = f"{prefix}:desired"
        self.version_key = f"{prefix}:version"
        self.channel = f"{prefix}:changes"

    # ---- reads -------------------------------------------------------------------------------
    def models(self) -> dict[str, DesiredModel]:
        """model_id -> entry; entries that do not parse are returned as ValueError under their id."""
        out: dict = {}
        for key, raw in self.redis.hgetall(self.desired_key).items():
            model_id = key.decode() if isinstance(key, bytes) else key
            try:
                out[model_id] = DesiredModel.from_json(raw)
            except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
                out[model_id] = ValueError(f"desired entry {model_id!r} is malformed: {exc}")
        return out

    def get(self, model_id: str) -> DesiredModel | None:
        raw = self.redis.hget(self.desired_key, model_id)
        return DesiredModel.from_json(raw) if raw is not None else None

    def version(self) -> int:
        return int(self.redis.get(self.version_key) or 0)

    # ---- changes -----------------------------------------------------------------------------
    def _change(self, model_id: str, update: Callable[[DesiredModel | None], DesiredModel | None]) -> DesiredModel | None:
        """update(current) -> new entry (None = delete), applied atomically; returns the new entry."""
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(self.desired_key)
                    raw = pipe.hget(self.desired_key, model_id)
                    current = DesiredModel.from_json(raw) if raw is not None else None
                    count = pipe.hlen(self.desired_key)
                    new = update(current)
                    if current is None and new is not None and count >= MAX_DESIRED_MODELS:
                        raise InvalidArgument(f"deployment {self.deployment!r} already serves {count} models "
                                              f"(at most {MAX_DESIRED_MODELS})", field="model_id", value=model_id)
                    pipe.multi()
                    if new is None:
                        pipe.hdel(self.desired_key, model_id)
                    else:
                        pipe.hset(self.desired_key, model_id, new.to_json())
                    pipe.incr(self.version_key)
                    version = pipe.execute()[-1]
                except redis.WatchError:
                    continue  # another replica changed the set meanwhile: read again
            self.redis.publish(self.channel, str(version))
            return new

    def put_model(self, model_id: str, artifact_id: str, device: str, num_threads: int = 0) -> DesiredModel:
        """Desire a model (idempotent for the same artifact and device; AlreadyExists for another one)."""
        def update(current: DesiredModel | None) -> DesiredModel:
            if current is not None:
                if current.artifact_id == artifact_id and current.device == device:
                    return current
                raise AlreadyExists(f"model_id {model_id!r} is already served by deployment {self.deployment!r} "
                                    f"(artifact {current.artifact_id} on {current.device})",
                                    field="model_id", value=model_id)
            return DesiredModel(model_id, artifact_id, device, num_threads)

        return self._change(model_id, update)

    def remove_model(self, model_id: str, load_id: str | None = None) -> DesiredModel | None:
        """Stop desiring a model; with `load_id`, only if the entry is still that load (a rollback)."""
        removed: list[DesiredModel] = []

        def update(current: DesiredModel | None) -> DesiredModel | None:
            if current is None:
                raise NotFound(f"model {model_id!r} is not served by deployment {self.deployment!r}",
                               field="model_id", value=model_id)
            if load_id is not None and current.load_id != load_id:
                return current
            removed.append(current)
            return None

        self._change(model_id, update)
        return removed[0] if removed else None

    def add_adapter(self, model_id: str, adapter: str, name: str) -> DesiredModel:
        def update(current: DesiredModel | None) -> DesiredModel:
            if current is None:
                raise NotFound(f"model {model_id!r} is not served by deployment {self.deployment!r}",
                               field="model_id", value=model_id)
            if DesiredAdapter(adapter, name) in current.adapters:
                return current  # listed already: every replica has it or is adding it
            # The same served name from another source replaces the older entry, as a slot would.
            kept = tuple(a for a in current.adapters if not (name and a.name == name))
            if len(kept) >= MAX_DESIRED_ADAPTERS:
                raise InvalidArgument(f"model {model_id!r} already lists {len(kept)} hot-added adapters (at most "
                                      f"{MAX_DESIRED_ADAPTERS})", field="adapter", value=adapter)
            return DesiredModel(current.model_id, current.artifact_id, current.device, current.num_threads,
                                (*kept, DesiredAdapter(adapter, name)), current.generation + 1, current.load_id)

        return self._change(model_id, update)

    # ---- notifications -----------------------------------------------------------------------
    def subscribe(self) -> ChangeWatch:
        return ChangeWatch(self)


class ChangeWatch:
    """A pub/sub subscription to one deployment's changes; `wait(timeout)` is True when one came."""

    def __init__(self, state: DesiredState):
        self._state = state
        self._pubsub = None
        self._lock = threading.Lock()

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` s for a change message. Redis errors propagate (the caller backs off)."""
        if self._pubsub is None:
            self._pubsub = self._state.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(self._state.channel)
        try:
            message = self._pubsub.get_message(timeout=timeout)
        except (redis.ConnectionError, redis.TimeoutError):
            self.close()  # a fresh subscription next time
            raise
        changed = message is not None and message.get("type") == "message"
        while changed and self._pubsub.get_message(timeout=0) is not None:
            pass  # several changes in a burst: one reconcile covers them all
        return changed

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except redis.RedisError:
                pass
            self._pubsub = None
