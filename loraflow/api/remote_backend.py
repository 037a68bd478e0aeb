"""The same calls against running services, through `loraflow.Client` (tokens and TLS as it sends them).

compile() asks the compiler for the base model with room for the loaded adapters (the max_rank,
adapter_slots and target_modules in-process compile would resolve for them), loads that artifact on
the inference service, and binds each adapter under its own name with LoadAdapter: the banks hold
the same numbers as an in-process artifact, so greedy ids are the same, and an adapter's name is
the one the script gave (a compiled-in adapter would be named after its directory).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from loraflow.api.adapter_set import AdapterSet, LoadedAdapter
from loraflow.api.generation import GenerationRow, Timer, stream_to
from loraflow.api.registered import RegisteredAdapter, room_check, with_first_use_room
from loraflow.artifact.graph_contract import ALL_LORA_MODULES, LORA_TARGET_MODULES
from loraflow.errors import FailedPrecondition
from services.compiler.options import EXTRA_SLOTS, MIN_DEFAULT_RANK, CompileOptions

BATCH_CHUNK = 32  # requests per GenerateBatch call: well under the service's waiting-queue bound


def service_spec(spec: str, local: Path | None) -> str:
    """What to send for a model or adapter: the absolute local path when we resolved one, else the spec."""
    return str(local.resolve()) if local is not None and "://" not in spec else spec


class RemoteBackend:
    def __init__(self, client, *, base_model: str, device: str = "", owns_client: bool = True):
        self.client = client
        self.owns_client = owns_client  # a Client the caller passed in stays open for them
        self.base_model = base_model
        self.device = device
        self.model_id: str | None = None
        self.artifact_id: str | None = None
        self.options: dict[str, Any] = {}
        self.bound: dict[str, int] = {}  # adapter name -> slot on the service

    def _capacity(self, adapters: AdapterSet, options: CompileOptions) -> CompileOptions:
        ranks, targets = [], []
        for a in adapters:
            if a.adapter is not None:
                ranks.append(a.adapter.max_module_rank)
                targets.append(a.adapter.target_modules)
            elif "://" in a.spec:  # an s3:// adapter only the services read: room for any targets
                ranks.append(0)
                targets.append(LORA_TARGET_MODULES)
            else:  # a registered name: the trainer's record says rank and targets
                lora = self.client.get_adapter(a.spec).lora
                ranks.append(int(lora.r))
                targets.append(tuple(lora.target_modules) or LORA_TARGET_MODULES)
        options = with_first_use_room(options, list(zip(ranks, targets, strict=True)),
                                      list(adapters.registered.values()))
        union = {m for t in targets for m in t}
        return replace(
            options,
            max_rank=options.max_rank or max([MIN_DEFAULT_RANK, *ranks]),
            adapter_slots=options.adapter_slots or len(adapters) + EXTRA_SLOTS,
            target_modules=options.target_modules or tuple(m for m in ALL_LORA_MODULES if m in union))

    def compile(self, adapters: AdapterSet, options: CompileOptions, progress=None) -> tuple[str, bool]:
        opts = self._capacity(adapters, options)
        job = self.client.compile(
            self.base_model, [], target=opts.target, batch_size=opts.batch_size, full_batch_size=opts.full_batch_size,
            prefill_seq_len=opts.prefill_seq_len, ctx_len=opts.ctx_len, max_rank=opts.max_rank,
            slots=opts.adapter_slots, dtype=opts.dtype, num_cores=opts.num_cores,
            target_modules=opts.target_modules, mxfp6_matmul=opts.mxfp6_matmul)
        done = self.client.wait(job.id, "compile")
        result = done.compile_result
        model = self.client.load_artifact(result.artifact_id, self.device)
        self.model_id, self.artifact_id = model.model_id, result.artifact_id
        self.options = opts.to_dict()
        self.bound = {a.name: a.slot for a in model.adapters}
        for entry in adapters:
            self.hot_add(entry)
        return result.artifact_uri, bool(result.cache_hit)

    @property
    def ctx_len(self) -> int:
        return int(self.options["ctx_len"])

    def slot_ids(self) -> dict[str, int]:
        return dict(self.bound)

    def check_room(self, entry: RegisteredAdapter) -> None:
        """FailedPrecondition unless the compiled artifact's banks fit ``entry`` (rank and target modules)."""
        room_check(entry, int(self.options["max_rank"]), tuple(self.options["target_modules"]), self.artifact_id)

    def hot_add(self, entry: LoadedAdapter) -> int:
        if entry.name in self.bound:
            return self.bound[entry.name]  # bound earlier (this script, or a previous run of it)
        loaded = {m.model_id: m for m in self.client.list_models()}.get(self.model_id)
        if loaded is not None and loaded.free_adapter_slots == 0:
            # The service would reuse an idle slot, silently dropping an adapter this script still names.
            raise FailedPrecondition(f"adapter {entry.name!r}: every adapter slot of artifact {self.artifact_id} is "
                                     "taken; it is loaded for the next compile(): call compile() again (or "
                                     "compile(adapter_slots=N) for room to hot-add)", field="adapter_slots",
                                     value=len(loaded.adapters))
        try:
            model = self.client.load_adapter(self.model_id, service_spec(entry.spec, entry.path), entry.name)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"adapter {entry.name!r} cannot be served by artifact {self.artifact_id} "
                                     f"without recompiling: {exc.message}; it is loaded for the next compile(): "
                                     "call compile() again", field=exc.field, value=exc.value,
                                     metadata={"adapter": entry.name}) from None
        self.bound = {a.name: a.slot for a in model.adapters}
        return self.bound[entry.name]

    def generate(self, rows: list[GenerationRow], sampling: dict[str, Any], timer: Timer,
                 streamer=None) -> list[tuple[list[int], str]]:
        from loraflow.v1 import inference_pb2

        ids: list[list[int]] = [[] for _ in rows]
        reasons = [""] * len(rows)
        if streamer is not None:
            stream_to(streamer, rows[0].prompt_ids)
        try:
            for start in range(0, len(rows), BATCH_CHUNK):
                chunk = rows[start:start + BATCH_CHUNK]
                requests = [dict(prompt=r.prompt_ids, model_id=self.model_id, adapter=r.adapter,
                                 max_new_tokens=r.max_new_tokens, **sampling) for r in chunk]
                for index, response in self.client.generate_batch(requests):
                    row = start + index
                    ids[row].extend(response.token_ids)
                    timer.token(row, len(response.token_ids))
                    if row == 0:
                        stream_to(streamer, response.token_ids)
                    if response.finish_reason:
                        reasons[row] = inference_pb2.FinishReason.Name(response.finish_reason).lower() \
                            .removeprefix("finish_reason_")
        finally:
            if streamer is not None:
                streamer.end()
        return list(zip(ids, reasons, strict=True))

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
