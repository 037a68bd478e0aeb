"""BufferPool: the compiler's reused memory for same-shaped tensors (export, reference), and its two users."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
import torch

from services.compiler.fused.builder import ExternalData, FusedGraphBuilder, FusedGraphOptions
from services.compiler.fused.readback import ArtifactWeights
from services.compiler.modeling import CheckpointWeights
from services.compiler.modeling.buffer_pool import BufferPool
from tests.support.tiny_models import write_random_checkpoint


def test_a_given_back_buffer_serves_the_next_tensor_of_its_byte_size_in_any_shape_and_dtype():
    pool = BufferPool()
    first = pool.take((4, 6), torch.float32)
    ptr = first.data_ptr()
    assert pool.give_back(first)
    second = pool.take((6, 2), torch.float64)  # 96 bytes again
    assert second.data_ptr() == ptr and second.shape == (6, 2) and second.dtype == torch.float64
    assert second.is_contiguous()
    third = pool.take((5,), torch.float32)  # another size: fresh memory
    assert third.data_ptr() != ptr
    assert (pool.taken, pool.reused) == (3, 1)


def test_a_numpy_view_of_a_whole_buffer_gives_it_back_and_a_part_or_a_stranger_does_not():
    pool = BufferPool()
    whole = pool.take((8, 8), torch.float32).numpy()
    assert pool.give_back(whole)
    part = pool.take((8, 8), torch.float32)
    assert not pool.give_back(part[:4])  # the rest may still be in use: the buffer stays out
    assert not pool.give_back(part.numpy()[:, :4])
    assert not pool.give_back(torch.empty(8, 8))  # not the pool's
    assert not pool.give_back(np.empty((8, 8), np.float32))
    assert pool.idle_bytes() == 0
    assert pool.give_back(part)
    assert not pool.give_back(part)  # twice: the second is refused
    assert pool.idle_bytes() == 8 * 8 * 4


def test_idle_buffers_are_bounded_per_size_and_clear_frees_them():
    pool = BufferPool(keep=2)
    out = [pool.take((1024,), torch.float32) for _ in range(3)]
    assert all(pool.give_back(t) for t in out)
    assert pool.idle_bytes() == 2 * 4096  # the third was freed
    pool.clear()
    assert pool.idle_bytes() == 0
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        BufferPool(keep=0)


def test_another_thread_gives_back_what_one_took():
    pool = BufferPool()
    taken = [pool.take((256,), torch.float32) for _ in range(2)]
    ptrs = {t.data_ptr() for t in taken}
    worker = threading.Thread(target=lambda: [pool.give_back(t.numpy()) for t in taken])
    worker.start()
    worker.join()
    again = {pool.take((256,), torch.float32).data_ptr() for _ in range(2)}
    assert again == ptrs


def test_the_export_reuses_buffers_layer_after_layer_and_writes_every_weight_intact(tmp_path):
    # The writer thread gives each converted weight back after writing it while the builder converts the next:
    # a buffer handed out again too early would corrupt a weight in the file.
    model = write_random_checkpoint(tmp_path / "m", "llama", dtype="BF16", num_hidden_layers=4)
    weights = CheckpointWeights.open(model)
    external = ExternalData(tmp_path / "model.onnx.data", "model.onnx.data")
    builder = FusedGraphBuilder(weights.cfg, weights, FusedGraphOptions(dtype="fp32", ctx_len=16, num_slots=2,
                                                                       max_rank=8, lora_modules=()), external)
    graph = builder.build()
    external.close()
    assert external.buffers.reused >= external.buffers.taken // 2, (external.buffers.taken, external.buffers.reused)
    onnx.save(graph, str(tmp_path / "model.onnx"))
    readback = ArtifactWeights(weights.cfg, tmp_path / "model.onnx", builder.written)
    for name in builder.written:
        assert torch.equal(readback.get(name), weights.get(name)), name


def test_the_reference_over_reused_buffers_equals_one_over_fresh_tensors(tmp_path):
    from services.compiler.modeling import layerwise
    from services.compiler.modeling.layerwise import ReferenceRow, Variant

    weights = CheckpointWeights.open(write_random_checkpoint(tmp_path / "m", "llama", dtype="BF16",
                                                             num_hidden_layers=3))

    class Fresh:  # the same tensors, each read into memory of its own
        cfg = weights.cfg

        def get(self, name, buffers=None):
            return weights.get(name)

    rows = [ReferenceRow(tokens=(3, 1, 4, 1, 5), lora_id=0), ReferenceRow(tokens=(9, 2, 6), lora_id=0)]

    def run(source):
        variants = {"fp32": Variant(source), "fp64": Variant(source, torch.float64, rows=(1,))}
        return layerwise.reference_logits(variants, rows, {}, ())

    pooled, fresh = run(weights), run(Fresh())
    for label in ("fp32", "fp64"):
        assert len(pooled[label].logits) == len(fresh[label].logits)
        for got, want in zip(pooled[label].logits, fresh[label].logits, strict=True):
            assert np.array_equal(got, want), label
