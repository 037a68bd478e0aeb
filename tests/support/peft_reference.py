"""Greedy reference tokens from HF/PEFT `generate`, one adapter active at a time (torch lives here, never in
the code under test). Used by the inference suite and by the compose test on the host."""

from __future__ import annotations

from pathlib import Path


class PeftReference:
    """Greedy tokens from HF generate on the base model or PEFT with one adapter active (cached)."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.torch = torch
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self._cache: dict = {}

    def generate(self, prompt_ids: list[int], adapter: str, max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), adapter, max_new_tokens)
        if key not in self._cache:
            torch = self.torch
            ids = torch.tensor([prompt_ids])
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
            with torch.no_grad():
                if adapter:
                    self.model.set_adapter(adapter)
                    out = self.model.generate(input_ids=ids, **kwargs)
                else:
                    with self.model.disable_adapter():
                        out = self.model.generate(input_ids=ids, **kwargs)
            self._cache[key] = out[0, len(prompt_ids):].tolist()
        return self._cache[key]
