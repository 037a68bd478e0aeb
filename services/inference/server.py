"""InferenceService servicer: protobuf ↔ domain objects around the ModelManager and engines.

Validation and translation only. Domain errors (loraflow.errors) propagate to the shared error
interceptor, which turns them into canonical gRPC statuses. A client that cancels or misses its
deadline triggers the RPC's callback, which cancels the request so its slot frees on the next step;
one that goes away while its prompt is still being checked or tokenized is noticed before submit.

The request checks both front doors share (sampling fields, prompt sizes, token ids, the adapter) are in
``request_validation``. A prompt's size is checked in bytes against what the model's context can hold before it is tokenized
(``check_prompt_text``), and tokenizing runs without the GIL (TextTokenizer), so a huge prompt costs its
own caller a refusal, never another caller's latency.
"""

from __future__ import annotations

import queue
import threading

from loraflow.artifact.scheduler import FinishReason
from loraflow.errors import InvalidArgument
from loraflow.options.names import validate_request_id
from loraflow.v1 import inference_pb2, inference_pb2_grpc
from services.inference.engine import Engine, GenerationChunk, GenerationRequest, RequestHandle
from services.inference.model_manager import LoadedModel, ModelManager
from services.inference.request_validation import (
    build_generation,
    check_prompt_text,
    check_prompt_token_ids,
    sampling_from_proto,
)
from services.inference.runtime import check_num_threads

SERVICE_NAME = "loraflow.v1.InferenceService"

_FINISH = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: inference_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}
# GenerateBatch's documented maximum. It may exceed the engine's waiting-queue bound (--max-waiting):
# a batch's requests enter the queue as the engine admits earlier ones, so the queue stays bounded and
# a batch of up to this many requests succeeds on an idle server.
MAX_BATCH_REQUESTS = 256


def model_to_proto(model: LoadedModel) -> inference_pb2.Model:
    runtime = model.runtime
    adapters = []
    for i, s in runtime.adapters.serving():  # loading slots serve nothing yet
        adapters.append(inference_pb2.ModelAdapter(slot=i, name=s.name, r=s.r, active_requests=s.active_requests))
    return inference_pb2.Model(
        model_id=model.model_id, artifact_id=model.artifact_id, adapters=adapters, device=model.device,
        free_adapter_slots=runtime.free_adapter_slots(), batch_slots=runtime.full_batch_size,
        ctx_len=runtime.ctx_len, memory_bytes=runtime.memory_bytes(), base_model=model.base_model,
        active_requests=model.engine.num_active())


def chunk_to_proto(chunk: GenerationChunk) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(text=chunk.text, token_ids=list(chunk.token_ids),
                                              finish_reason=_FINISH[chunk.finish_reason],
                                              request_id=chunk.request_id)
    if chunk.finish_reason is not None:
        response.usage.prompt_tokens = chunk.prompt_tokens
        response.usage.completion_tokens = chunk.completion_tokens
    return response


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, manager: ModelManager, reconciler=None):
        self.manager = manager
        # With a deployment (services.inference.reconciler.Reconciler), model changes go through its desired
        # state in Redis so every replica follows; without, they stay local to this process.
        self.models = reconciler if reconciler is not None else manager

    # ---- models ----------------------------------------------------------------------------
    def LoadArtifact(self, request, context):
        check_num_threads(request.num_threads)
        model = self.models.load_artifact(request.artifact_id, request.device or "cpu", request.model_id,
                                          request.num_threads)
        return model_to_proto(model)

    def UnloadModel(self, request, context):
        model = self.manager.get(request.model_id)
        snapshot = model_to_proto(model)
        self.models.unload(request.model_id)
        return inference_pb2.UnloadModelResponse(model=snapshot)

    def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=[model_to_proto(m) for m in self.manager.list()])

    def LoadAdapter(self, request, context):
        model = self.models.load_adapter(request.model_id, request.adapter, request.name)
        return model_to_proto(model)

    # ---- generation ------------------------------------------------------------------------
    def _prepare(self, request: inference_pb2.GenerateRequest, prefix: str = "") -> tuple[Engine, GenerationRequest]:
        """Validate one request (errors name ``prefix``-ed fields) into what its model's engine takes."""
        validate_request_id(request.request_id, field=f"{prefix}request_id")
        model = self.manager.get(request.model_id)
        tokenizer = model.tokenizer
        which = request.WhichOneof("input")
        if which == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
            check_prompt_token_ids(ids, model, f"{prefix}prompt_token_ids")
        elif which == "prompt":
            check_prompt_text(request.prompt, model, f"{prefix}prompt")
            ids = tokenizer.encode_chat(request.prompt) if request.chat else tokenizer.encode(request.prompt)
        else:
            ids = []
        sampling = sampling_from_proto(request.sampling, f"{prefix}sampling")
        generation = build_generation(self.manager, model, ids, request.adapter, sampling, request.request_id,
                                      prompt_field=f"{prefix}prompt", adapter_field=f"{prefix}adapter")
        return model.engine, generation

    def Generate(self, request, context):
        gone = threading.Event()  # client cancel or deadline, from before tokenizing on
        if not context.add_callback(gone.set):
            return
        engine, generation = self._prepare(request)
        if gone.is_set():  # nobody is waiting for it: never queue it
            return
        handle = engine.submit(generation)
        context.add_callback(handle.cancel)  # frees the slot on the next step
        if gone.is_set():
            handle.cancel()
        try:
            for chunk in handle:
                yield chunk_to_proto(chunk)
        finally:
            if not handle.finished.is_set():
                handle.cancel()

    def GenerateBatch(self, request, context):
        """Every request is validated before any is queued; they then enter their engine's waiting queue
        as it has room (see MAX_BATCH_REQUESTS), and their chunks stream as they come, tagged by index."""
        if not request.requests:
            raise InvalidArgument("requests must not be empty", field="requests", value=0)
        if len(request.requests) > MAX_BATCH_REQUESTS:
            raise InvalidArgument(f"requests may hold at most {MAX_BATCH_REQUESTS} entries, got "
                                  f"{len(request.requests)}", field="requests", value=len(request.requests))
        gave_up = threading.Event()  # client cancel, deadline, or the RPC ended
        handles: list[RequestHandle] = []
        lock = threading.Lock()

        def cancel_all():
            gave_up.set()
            with lock:
                started = list(handles)
            for h in started:
                h.cancel()

        if not context.add_callback(cancel_all):
            return
        prepared = []
        for i, r in enumerate(request.requests):
            if gave_up.is_set():  # the client left while earlier prompts were checked and tokenized
                return
            prepared.append(self._prepare(r, prefix=f"requests[{i}]."))
        merged: queue.Queue = queue.Queue()

        def pump(index: int, handle: RequestHandle) -> None:
            try:
                for chunk in handle:
                    merged.put((index, chunk))
            except BaseException as err:  # re-raised in the RPC thread
                merged.put((index, err))
            merged.put((index, None))

        def feed() -> None:
            for index, (engine, generation) in enumerate(prepared):
                if gave_up.is_set():
                    return
                try:
                    handle = engine.submit(generation, wait_for_room=gave_up)
                except BaseException as err:  # re-raised in the RPC thread
                    merged.put((index, err))
                    return
                with lock:
                    handles.append(handle)
                if gave_up.is_set():
                    handle.cancel()
                threading.Thread(target=pump, args=(index, handle), daemon=True).start()

        threading.Thread(target=feed, name="generate-batch-feed", daemon=True).start()
        remaining = len(prepared)
        try:
            while remaining:
                index, item = merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield inference_pb2.GenerateBatchResponse(index=index, response=chunk_to_proto(item))
        finally:
            cancel_all()
