"""A real InferenceService whose artifact has 2 adapter slots (beta compiled in), adapters in a real
registry and store, and a gate on the model's runtime that holds requests in flight on demand.

Shared by test_adapters_on_first_use.py and test_lora_metrics.py (imported as fixtures)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import redis

from loraflow.jobs.registry import AdapterRecord, ArtifactRecord, Registry
from loraflow.server.grpc_server import GrpcServer
from loraflow.storage.store import open_store
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from services.inference.model_manager import ModelManager
from services.inference.server import SERVICE_NAME, InferenceServicer

ADAPTER_WAIT_S = 2.0  # short bound for the tests (the service default is 30 s)
REGISTERED = ("alpha", "gamma", "hot", "big")


def _big_adapter(tiny_llama, out: Path) -> Path:
    """r=16 on q_proj: does not fit the artifact's max_rank=8."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(out)
    return out


class CountingFetches:
    """Counts store.fetch_dir calls (the real fetch still runs); while ``hold()`` is in effect each
    fetch waits for ``release()``, so a test can act while a load is in flight."""

    def __init__(self, store):
        self.calls: list[str] = []
        self._go = threading.Event()
        self._go.set()
        self._fetch = store.fetch_dir
        store.fetch_dir = self

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def __call__(self, key, dest, **kw):
        self.calls.append(key)
        self._go.wait(60)
        return self._fetch(key, dest, **kw)


class Gate:
    """Blocks the model's runtime steps while closed, so submitted requests stay queued/running."""

    def __init__(self, runtime):
        self.open_event = threading.Event()
        self.open_event.set()
        execute = runtime.execute
        runtime.execute = lambda step: (self.open_event.wait(60), execute(step))[1]

    def close(self) -> None:
        self.open_event.clear()

    def open(self) -> None:
        self.open_event.set()


@pytest.fixture(scope="module")
def few_slots_artifact(tiny_llama, tiny_adapters, tmp_path_factory):
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    out = tmp_path_factory.mktemp("artifact-2-slots")
    options = CompileOptions(batch_size=2, full_batch_size=4, prefill_seq_len=8, ctx_len=64, max_rank=8,
                             adapter_slots=2)
    manifest = build_artifact(tiny_llama, [("beta", tiny_adapters["beta"])], options, out)
    return out, manifest


@pytest.fixture(scope="module")
def few_slots(few_slots_artifact, tiny_adapters, tiny_llama, redis_server, tmp_path_factory, input_policy):
    artifact_dir, manifest = few_slots_artifact
    root = tmp_path_factory.mktemp("few-slots")
    store = open_store((root / "store").as_uri())
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    registry = Registry(client)
    uri = store.publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    registry.put_artifact(ArtifactRecord(artifact_id=manifest.artifact_id, uri=uri,
                                         base_model=manifest.base_model.source))
    sources = {**tiny_adapters, "big": _big_adapter(tiny_llama, root / "big")}
    for name in REGISTERED:
        registry.put_adapter(AdapterRecord(name=name, uri=store.publish_dir(f"adapters/{name}", sources[name]),
                                           base_model=manifest.base_model.source))
    fetches = CountingFetches(store)
    server = GrpcServer(listen="127.0.0.1:0", service_names=[SERVICE_NAME])
    manager = ModelManager(store=store, registry=registry, cache_dir=root / "cache", inputs=input_policy,
                           adapter_wait_s=ADAPTER_WAIT_S)
    server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"stub": inference_pb2_grpc.InferenceServiceStub(channel), "manager": manager, "fetches": fetches,
           "artifact_id": manifest.artifact_id, "registry": registry}
    channel.close()
    server.stop(grace=0)
    manager.close()


def load_model(service, model_id: str):
    """A fresh model on the 2-slot artifact (beta in slot 1), with a Gate on its runtime."""
    service["stub"].LoadArtifact(pb.LoadArtifactRequest(artifact_id=service["artifact_id"], model_id=model_id,
                                                        num_threads=1))
    model = service["manager"].get(model_id)
    return model, Gate(model.runtime)


def loaded(model) -> set[str]:
    return {name for name in model.runtime.adapter_names() if not name.startswith("\x00")}


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
