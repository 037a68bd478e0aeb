"""The whole lifecycle across separate processes on SmolLM2-135M-Instruct.

Redis, the trainer, the compiler and the inference service each run as their own process
(`python -m services.<name>`), exactly as deployed; the test talks to them only through
`loraflow.Client`. Two adapters are trained, compiled into one artifact, served in one mixed
batch, and every row's greedy tokens must equal what PEFT produces with that adapter alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loraflow.client import Client
from loraflow.jobs.embedded_redis import EmbeddedRedis, free_port
from tests.support.bare_onnx import bare_prefill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from loraflow.storage.models_import import import_model

    return import_model("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2):
    home = tmp_path_factory.mktemp("e2e-home")
    redis = EmbeddedRedis()
    env = dict(os.environ, LORAFLOW_REDIS_URL=redis.url, LORAFLOW_STORE_URL=f"file://{home / 'store'}",
               LORAFLOW_CACHE_DIR=str(home / "cache"), OMP_NUM_THREADS="2")
    ports = {name: free_port() for name in ("trainer", "compiler", "inference")}
    procs, logs = [], []
    for name, port in ports.items():
        log = open(home / f"{name}.log", "wb")
        logs.append(log)
        # The services may read the imported model and the example datasets, nothing else on the host.
        procs.append(subprocess.Popen([sys.executable, "-m", f"services.{name}", "all", "--listen",
                                       f"127.0.0.1:{port}", "--log-level", "WARNING",
                                       "--allow-local-paths", f"{smollm2},{DATA}"],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    client = Client(trainer=f"127.0.0.1:{ports['trainer']}", compiler=f"127.0.0.1:{ports['compiler']}",
                    inference=f"127.0.0.1:{ports['inference']}", timeout=120)
    deadline = time.monotonic() + 90
    pending = set(ports)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            try:
                client.health(name, timeout=1)
                pending.discard(name)
            except Exception:  # noqa: BLE001 - not up yet
                pass
        for name, proc in zip(ports, procs, strict=True):
            if proc.poll() is not None:
                tail = (home / f"{name}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")
        time.sleep(0.3)
    assert not pending, f"services not healthy after 90s: {pending}"
    yield client, home
    client.close()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for log in logs:
        log.close()
    redis.stop()


def _eval_prompts(task: str, n: int) -> list[str]:
    lines = (DATA / f"{task}_eval.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["prompt"] for line in lines]


def _peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int]) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_train_compile_serve_mixed_batch_matches_peft(cluster, smollm2):
    client, home = cluster
    adapters = {}
    for task in ("vex", "badge"):
        job = client.train(str(smollm2), str(DATA / f"{task}_train.jsonl"), task, r=8, alpha=16,
                           targets=["q_proj", "v_proj"], steps=6, batch_size=4, lr=3e-3, max_seq_len=64,
                           checkpoint_every=3, seed=1)
        done = client.wait(job.id, timeout=600)
        assert done.train_result.adapter_name == task
        adapters[task] = done.train_result.adapter_uri
    for task in adapters:
        assert client.get_adapter(task).metrics["steps"] == 6

    job = client.compile(str(smollm2), list(adapters), ctx_len=128, prefill_seq_len=32, full_batch_size=4)
    done = client.wait(job.id, timeout=900)
    artifact_id = done.compile_result.artifact_id
    assert not done.compile_result.cache_hit
    again = client.compile(str(smollm2), list(adapters), ctx_len=128, prefill_seq_len=32, full_batch_size=4)
    assert again.compile_result.cache_hit and again.compile_result.artifact_id == artifact_id

    # The artifact runs in a bare onnxruntime session too.
    logits = bare_prefill(home / "store" / "artifacts" / artifact_id, [[1, 2, 3, 4]], [0])
    assert logits.shape[:2] == (1, 1) and np.isfinite(logits).all()

    model = client.load_artifact(artifact_id)
    assert sorted(a.name for a in model.adapters) == ["badge", "vex"]

    rows = [("", _eval_prompts("vex", 1)[0]), ("vex", _eval_prompts("vex", 2)[1]),
            ("badge", _eval_prompts("badge", 1)[0]), ("", _eval_prompts("badge", 2)[1])]
    requests = [{"model_id": model.model_id, "prompt": prompt, "adapter": adapter, "chat": True,
                 "max_new_tokens": MAX_NEW_TOKENS} for adapter, prompt in rows]
    tokens: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    usage = {}
    for index, chunk in client.generate_batch(requests):
        tokens[index].extend(chunk.token_ids)
        if chunk.finish_reason:
            usage[index] = chunk.usage
    assert sorted(usage) == list(range(len(rows)))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for i, (adapter, prompt) in enumerate(rows):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
        assert usage[i].prompt_tokens == len(prompt_ids)
        assert usage[i].completion_tokens == len(tokens[i]) <= MAX_NEW_TOKENS
        adapter_dir = None
        if adapter:
            uri = adapters[adapter]
            adapter_dir = Path(uri[len("file://"):]) if uri.startswith("file://") else Path(uri)
        want = _peft_greedy(smollm2, adapter_dir, list(prompt_ids))
        assert tokens[i] == want, f"row {i} ({adapter or 'base'}): {tokens[i]} != PEFT {want}"
    # The adapters really change the model: the same prompt gives other tokens than the base model.
    assert tokens[1] != _peft_greedy(smollm2, None, list(tokenizer.apply_chat_template(
        [{"role": "user", "content": rows[1][1]}], tokenize=True, add_generation_prompt=True, return_dict=False)))
