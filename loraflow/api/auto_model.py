"""`AutoLoraModelForCausalLM`: QEfficient's LoRA model API over loraflow's compiler and engine.

    model = AutoLoraModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    model.load_adapter("adapters/vex", "vex")
    model.register_adapters("adapters/many")  # one PEFT dir per adapter: served on first use, not compiled in
    model.compile(prefill_seq_len=32, ctx_len=128, full_batch_size=4)
    out = model.generate(tokenizer, prompts, prompt_to_adapter_mapping=["vex", "base", "a0917"])

In-process by default; `connect=` runs the same calls against running services (see connection.py).
Unlike QEfficient, adapters of different ranks and target modules (MLP included) load together, and
an adapter loaded after compile() is served at once when it fits the compiled banks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from loraflow.api import sources
from loraflow.api.adapter_set import BASE, AdapterSet, LoadedAdapter
from loraflow.api.compile_args import build_compile_request
from loraflow.api.connection import make_client
from loraflow.api.generation import GenerationResult, Timer, decode, plan_rows, sampling_kwargs
from loraflow.api.registered import RegisteredAdapter, as_mapping
from loraflow.artifact import lora_bank
from loraflow.errors import FailedPrecondition
from loraflow.options.names import validate_name

log = logging.getLogger("loraflow.api")


class AutoLoraModelForCausalLM:
    """A base causal LM plus named LoRA adapters, compiled into one artifact and served in mixed batches."""

    def __init__(self, *, base_dir: Path | None, base_spec: str, continuous_batching: bool, cache_dir: Path,
                 client=None, device: str = "cpu", num_threads: int = 0, owns_client: bool = True):
        self.base_dir = base_dir  # local checkpoint (None when only the services can read the model)
        self.model_name = base_spec
        self.continuous_batching = continuous_batching
        self.cache_dir = cache_dir
        self.client = client
        self._adapters = AdapterSet()
        self.artifact_path: str | None = None
        self.compile_ignored: dict[str, Any] = {}  # options recorded at compile() but not used for its target
        if client is None:
            from loraflow.api.local_backend import LocalBackend

            self._backend = LocalBackend(base_dir, base_source=base_spec, cache_dir=cache_dir, device=device,
                                         num_threads=num_threads)
        else:
            from loraflow.api.remote_backend import RemoteBackend, service_spec

            self._backend = RemoteBackend(client, base_model=service_spec(base_spec, base_dir),
                                          device="" if device == "cpu" else device, owns_client=owns_client)
        self._compiled = False

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, continuous_batching: bool = False,
                        *, connect: Any = None, cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                        num_threads: int = 0, **config_overrides) -> AutoLoraModelForCausalLM:
        """A local HF checkpoint dir, a name `loraflow models import` imported, or a store URI.

        NotImplementedError for an architecture loraflow cannot compile; `config_overrides` replace
        values of the checkpoint's config.json (e.g. num_hidden_layers)."""
        from loraflow.options.config import Settings
        from services.compiler.modeling.config import SUPPORTED_ARCHITECTURES

        cache = Path(cache_dir) if cache_dir is not None else Path(Settings.from_env().cache_dir)
        client = make_client(connect)
        spec = sources.spec_string(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        remote_only = client is not None and spec.startswith("s3://")
        base_dir = None if remote_only else sources.resolve_model(spec, cache_dir=cache)
        if base_dir is not None:
            model_type = sources.model_type(base_dir)
            if model_type not in SUPPORTED_ARCHITECTURES:
                raise NotImplementedError(f"model_type {model_type!r} ({spec}) is not supported by loraflow; "
                                          f"supported model types: {list(SUPPORTED_ARCHITECTURES)}")
            if config_overrides:
                base_dir = sources.write_overridden_checkpoint(base_dir, config_overrides, cache)
                spec = str(base_dir)
        elif config_overrides:
            raise TypeError("config overrides need a checkpoint readable here, not only by the services")
        return cls(base_dir=base_dir, base_spec=spec, continuous_batching=bool(continuous_batching),
                   cache_dir=cache, client=client, device=device, num_threads=num_threads,
                   owns_client=client is not connect)

    def load_adapter(self, adapter: str | os.PathLike, adapter_name: str | None = None) -> int:
        """Add a PEFT adapter (directory, store URI, or a registered/trained name) as `adapter_name`; its id.

        After compile() it is served at once when it fits the compiled banks; otherwise it is kept for
        the next compile() and FailedPrecondition says why a recompile is needed."""
        if adapter_name is None or not isinstance(adapter_name, str):
            raise TypeError("Required adapter name argument in string format")
        validate_name("adapter_name", adapter_name)
        if adapter_name == BASE:
            raise ValueError(f"adapter_name {BASE!r} is reserved for the base model in prompt_to_adapter_mapping")
        spec = sources.spec_string(adapter, "adapter")
        entry = self._read_adapter(spec, adapter_name)
        adapter_id = self._adapters.add(entry)
        if self._compiled:
            self._backend.hot_add(entry)
        return adapter_id

    def _read_adapter(self, spec: str, name: str) -> LoadedAdapter:
        from loraflow.storage.model_source import is_location

        if self.client is not None and not is_location(spec) and sources.trained_here(spec) is None \
                and not Path(spec).is_dir():
            return LoadedAdapter(name=name, spec=spec, path=None, adapter=None)  # registered with the services
        if self.client is not None and spec.startswith("s3://"):
            return LoadedAdapter(name=name, spec=spec, path=None, adapter=None)
        path = sources.resolve_adapter(spec, cache_dir=self.cache_dir)
        read = lora_bank.read_adapter(name, path)  # InvalidArgument: not a LoRA adapter loraflow can serve
        if self.base_dir is not None:
            lora_bank.check_fits(read, self._base_bank_spec())  # wrong layer count or shapes for this model
        return LoadedAdapter(name=name, spec=spec if "://" in spec else str(path), path=path, adapter=read)

    def _base_bank_spec(self) -> lora_bank.BankSpec:
        from services.compiler.modeling.config import DecoderConfig
        from services.compiler.options import MAX_RANK

        cfg = DecoderConfig.from_model_dir(self.base_dir)
        return lora_bank.BankSpec(num_layers=cfg.num_layers, max_rank=MAX_RANK, adapter_slots=1,
                                  modules=cfg.lora_module_shapes(), architecture=cfg.architecture)

    def register_adapter(self, adapter: str | os.PathLike, adapter_name: str) -> None:
        """Register a PEFT adapter (directory or store URI) as `adapter_name`: checked now like load_adapter,
        compiled into no slot, loaded into one when a prompt first names it (see loraflow.api.registered).
        Connected, it is registered with the trainer service for this model's base model; after compile() it
        must fit the compiled banks (FailedPrecondition says why not)."""
        validate_name("adapter_name", adapter_name)
        if adapter_name == BASE:
            raise ValueError(f"adapter_name {BASE!r} is reserved for the base model in prompt_to_adapter_mapping")
        spec = sources.spec_string(adapter, "adapter")
        if "://" not in spec and not Path(spec).expanduser().is_dir():
            raise FileNotFoundError(f"adapter {spec!r} is not a directory: register_adapter takes a PEFT adapter "
                                    "directory or a store URI")
        if self.client is not None and spec.startswith("s3://"):  # only the services read it
            entry = None
        else:
            loaded = self._read_adapter(spec, adapter_name)
            entry = RegisteredAdapter(name=adapter_name, spec=loaded.spec, path=loaded.path,
                                      rank=loaded.adapter.max_module_rank,
                                      target_modules=tuple(loaded.adapter.target_modules))
        if self.client is not None:
            from loraflow.api.remote_backend import service_spec

            record = self.client.register_adapter(
                adapter_name, service_spec(spec, entry.path if entry else None), self._backend.base_model).adapter
            if entry is None:
                entry = RegisteredAdapter(name=adapter_name, spec=spec, path=None,
                                          rank=int(record.lora.r), target_modules=tuple(record.lora.target_modules))
        if self._compiled:
            self._backend.check_room(entry)
        self._adapters.register(entry)

    def register_adapters(self, adapters: str | os.PathLike | dict[str, str | os.PathLike]) -> list[str]:
        """register_adapter for each adapter of a folder (itself a PEFT dir, or one sub-directory per adapter,
        named after it) or of a {name: directory or store URI} mapping; the names, in order."""
        mapping = as_mapping(adapters)
        for name, spec in mapping.items():
            self.register_adapter(spec, name)
        return list(mapping)

    @property
    def registered_adapters(self) -> list[str]:
        """Names of the registered adapters (served on first use; they have no id in active_adapter_to_id)."""
        return list(self._adapters.registered)

    def unload_adapter(self, adapter_name: str) -> bool:
        """True when the adapter was loaded or registered (prompts can no longer name it), False otherwise."""
        if adapter_name not in self._adapters and adapter_name not in self._adapters.registered:
            log.info("adapter %r is not loaded", adapter_name)
            return False
        return self._adapters.remove(adapter_name)

    @property
    def active_adapter_to_id(self) -> dict[str, int]:
        """adapter name -> id (the slot serving it once compiled; 1..n in load order before)."""
        if not self._compiled:
            return self._adapters.ids()
        served = self._backend.slot_ids()
        return {name: served[name] for name in self._adapters.names() if name in served}

    def download_adapter(self, *args, **kwargs):
        raise NotImplementedError("loraflow has no hub to download adapters from: pass a local PEFT directory, a "
                                  "store URI (file:// or s3://) or an adapter trained with loraflow.finetune to "
                                  "load_adapter(adapter, adapter_name)")

    # ---- compile --------------------------------------------------------------------------------
    def compile(self, prefill_seq_len: int = 32, ctx_len: int = 128, full_batch_size: int | None = None,
                batch_size: int = 1, num_cores: int = 16, mxfp6_matmul: bool = False, dtype: Any = "fp32",
                target: str = "onnxruntime", **compiler_options) -> str:
        """Compile base + loaded adapters into one artifact (content-addressed) and open it; its path/URI."""
        request = build_compile_request(
            prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, full_batch_size=full_batch_size, batch_size=batch_size,
            num_cores=num_cores, mxfp6_matmul=mxfp6_matmul, dtype=dtype, target=target,
            continuous_batching=self.continuous_batching, compiler_options=compiler_options)
        if target != "onnxruntime" and self.client is None:
            log.info("target %r: the artifact is built here but this process serves only 'onnxruntime' ones", target)
        path, hit = self._backend.compile(self._adapters, request.options)
        self.compile_ignored = request.ignored
        self.artifact_path = str(path)
        self._compiled = True
        log.info("artifact %s (%s)", path, "cache hit" if hit else "compiled")
        return self.artifact_path

    # ---- generate -------------------------------------------------------------------------------
    def generate(self, tokenizer: Any, prompts: list[str] | str, prompt_to_adapter_mapping: list[str] | None = None,
                 generation_len: int | None = None, streamer: Any = None, device_id: Any = None,
                 **sampling) -> GenerationResult:
        """Every prompt with its adapter ("base" = none) in mixed continuous batches; greedy by default.

        `sampling`: the fields of loraflow.options.sampling_params.SAMPLING_FIELDS but max_new_tokens (temperature, top_k,
        top_p, seed, stop, repetition_penalty, ignore_eos)."""
        if not self._compiled:
            raise TypeError("Please run compile API first!")
        if device_id is not None:
            log.info("device_id=%r ignored: the device was chosen at from_pretrained()", device_id)
        if tokenizer is None:
            if self.client is not None:
                raise TypeError("generate() needs a tokenizer when connected to services")
            tokenizer = self._backend.model.tokenizer
        kwargs = sampling_kwargs(sampling)
        rows = plan_rows(tokenizer, prompts, prompt_to_adapter_mapping, self._adapters,
                         generation_len=generation_len, ctx_len=self._backend.ctx_len)
        served = self._backend.slot_ids()
        for row in rows:
            if row.adapter and row.adapter not in served and row.adapter not in self._adapters.registered:
                raise FailedPrecondition(f"adapter {row.adapter!r} is loaded but the compiled artifact does not serve "
                                         "it; call compile() again", field="prompt_to_adapter_mapping",
                                         value=row.adapter)
        timer = Timer(len(rows))
        results = self._backend.generate(rows, kwargs, timer, streamer)
        ids = [r[0] for r in results]
        return GenerationResult(batch_size=len(rows), generated_texts=[decode(tokenizer, i) for i in ids],
                                generated_ids=ids, perf_metrics=timer.metrics(),
                                finish_reasons=[r[1] for r in results])

    # ---- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engine (in-process) or close the channels (connected)."""
        self._backend.close()
        self._compiled = False

    def __enter__(self) -> AutoLoraModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "connected" if self.client is not None else "in-process"
        return (f"AutoLoraModelForCausalLM({self.model_name!r}, adapters={self._adapters.names()}, "
                f"registered={len(self._adapters.registered)}, {mode}, artifact={self.artifact_path!r})")
