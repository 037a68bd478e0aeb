"""Data-parallel LoRA training inside one torch.distributed rank (launched by torchrun, see rank_group).

Same model whatever world_size is: an optimiser step still consumes the same global batch
(batch_size x gradient_accumulation_steps examples, in the seeded order of one process); rank r takes
every world_size-th example of it (DistributedSampler's interleaving, per step), and each rank divides
its summed loss by the step's *global* loss-token count, times world_size because DDP averages
gradients over ranks. So the synchronised gradient is exactly the one-process gradient of the step,
up to float summation order.

DDP wraps a small module whose forward is the selected-token loss. Only parameters with requires_grad
(the LoRA A/B matrices) are registered with DDP's reducer; the frozen base weights and buffers are also
excluded from DDP's start-up broadcast (every rank loads them from the same checkpoint), so they are
never sent over the wire.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from services.trainer.dataset import IGNORE_INDEX, Example
from services.trainer.training import LoraTrainer, collate, selected_token_loss


class _TokenLoss(torch.nn.Module):
    """forward() = summed cross-entropy over the loss tokens, so DDP sees (and syncs) one forward."""

    def __init__(self, causal_lm: torch.nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask, labels):
        loss, _ = selected_token_loss(self.causal_lm, input_ids, attention_mask, labels)
        return loss


def _loss_tokens(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)


class DistributedLoraTrainer(LoraTrainer):
    """LoraTrainer whose steps are split across the ranks of the default process group.

    Every rank holds the full (tokenized) dataset and computes the same order; only rank 0 evaluates,
    checkpoints and reports. ``stop_requested()`` (rank 0's view) is agreed by all ranks before each step.
    """

    def __init__(self, *args, stop_requested=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.stop_requested = stop_requested or (lambda: False)
        module = _TokenLoss(self.causal_lm)
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(module, device_ids=ids)

    def synced_parameters(self) -> tuple[int, int]:
        """(tensors, float32 elements) DDP's reducer all-reduces, as DDP itself reports them."""
        data = self.ddp._get_ddp_logging_data()
        return int(data["num_parameter_tensors"]), int(data["total_parameter_size_bytes"]) // 4

    def _share(self, step_batches: list[list[Example]]) -> list[list[Example]]:
        flat = [e for batch in step_batches for e in batch]
        mine = flat[self.rank::self.world_size]
        bs = self.training.batch_size
        return [mine[i:i + bs] for i in range(0, len(mine), bs)]

    def _forward_backward(self, step_batches: list[list[Example]]) -> tuple[float, int]:
        flat = [e for batch in step_batches for e in batch]
        n_global = max(sum(_loss_tokens(e) for e in flat), 1)
        seen_global = sum(len(e.input_ids) for e in flat)
        micro = self._share(step_batches)
        weight = float(self.world_size) / n_global
        if not micro:
            # A short last step can leave a rank without examples; DDP still needs its backward.
            micro, weight = [flat[:1]], 0.0
        local = torch.zeros((), dtype=torch.float64)
        for i, examples in enumerate(micro):
            batch = collate(examples, self.pad_id, self.device)
            last = i == len(micro) - 1
            with self.ddp.no_sync() if not last else nullcontext():
                loss_sum = self.ddp(**batch)
                (loss_sum * weight).backward()
            if weight:
                local += loss_sum.detach().double().cpu()
        total = local.to(self.device)
        dist.all_reduce(total)
        return float(total) / n_global, seen_global

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if (self.rank == 0 and (self.stop.is_set() or self.stop_requested())) else 0.0],
                            device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag) > 0:
            self.stop.set()
        return self.stop.is_set()

    def evaluate(self) -> float | None:
        return super().evaluate() if self.rank == 0 else None

    def _checkpoint_due(self) -> None:
        if self.rank == 0:
            super()._checkpoint_due()

    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        if self.rank != 0:
            raise RuntimeError("only rank 0 writes checkpoints")
        return super().save_checkpoint(directory)

    def metrics(self) -> dict[str, float]:
        m = super().metrics()
        m["world_size"] = float(self.world_size)
        return m
