"""The `loraflow` command line: a thin layer of typer + rich over `loraflow.Client`.

Every command takes `-o json` for scripts (stable keys: the proto field names); errors print the gRPC
status code, the message and the offending field, and exit non-zero.
"""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from loraflow import errors
from loraflow.client import Client, JobFailed
from loraflow.console import formatting as fmt
from loraflow.options import settings
from loraflow.options.sampling_params import SAMPLING
from loraflow.v1 import inference_pb2, jobs_pb2

app = typer.Typer(name="loraflow", help="Train, compile and serve mixed-adapter LoRA models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
jobs_app = typer.Typer(help="Training and compile jobs.", no_args_is_help=True)
adapters_app = typer.Typer(help="Registered adapters: trained here or registered (trainer registry).",
                            no_args_is_help=True)
artifacts_app = typer.Typer(help="Compiled artifacts (compiler registry).", no_args_is_help=True)
models_app = typer.Typer(help="Models: loaded on the inference service, or imported checkpoints.",
                         no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(models_app, name="models")
datasets_app = typer.Typer(help="Datasets: push a local JSONL file into the services' store.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

out_console = Console()
err_console = Console(stderr=True)

# Exit codes: 1 = the service refused or failed the request, 3 = a job ended FAILED/CANCELLED, 130 = ^C.
EXIT_RPC_ERROR = 1
EXIT_JOB_FAILED = 3
EXIT_INTERRUPTED = 130


class Output(enum.StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table (for people) or json (for scripts).")]


class _State:
    """Global options, shared by every command through the typer context."""

    def __init__(self, trainer: str | None, compiler: str | None, inference: str | None, timeout: float,
                 credentials: dict[str, str | None] | None = None):
        self.trainer, self.compiler, self.inference, self.timeout = trainer, compiler, inference, timeout
        self.credentials = credentials or {}  # token_file, tls_ca, tls_client_cert, tls_client_key
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.trainer, self.compiler, self.inference, timeout=self.timeout,
                                  on_upload=_report_upload, **self.credentials)
        return self._client


@app.callback()
def main(ctx: typer.Context,
         trainer: Annotated[str | None, typer.Option(help="Trainer address.",
                                                     envvar=settings.TRAINER_ADDR.env)] = None,
         compiler: Annotated[str | None, typer.Option(help="Compiler address.",
                                                      envvar=settings.COMPILER_ADDR.env)] = None,
         inference: Annotated[str | None, typer.Option(help="Inference address.",
                                                       envvar=settings.INFERENCE_ADDR.env)] = None,
         timeout: Annotated[float, typer.Option(help="Deadline of each unary call, seconds.")] = 30.0,
         token_file: Annotated[str | None, typer.Option(
             help="File holding the bearer token (else $LORAFLOW_TOKEN, else the token `loraflow up` wrote).",
             envvar=settings.TOKEN_FILE.env)] = None,
         tls_ca: Annotated[str | None, typer.Option(help="CA certificate (PEM) the servers' TLS certificates are "
                                                         "checked against.", envvar=settings.TLS_CA.env)] = None,
         tls_client_cert: Annotated[str | None, typer.Option(help="Client certificate (PEM) for mTLS.",
                                                             envvar=settings.TLS_CLIENT_CERT.env)] = None,
         tls_client_key: Annotated[str | None, typer.Option(help="Client private key (PEM) for mTLS.",
                                                            envvar=settings.TLS_CLIENT_KEY.env)] = None) -> None:
    ctx.obj = _State(trainer, compiler, inference, timeout,
                     {"token_file": token_file, "tls_ca": tls_ca, "tls_client_cert": tls_client_cert,
                      "tls_client_key": tls_client_key})


def _state(ctx: typer.Context) -> _State:
    return ctx.find_object(_State)


def handles_errors(fn: Callable) -> Callable:
    """Turn loraflow errors into a printed status + non-zero exit, in the command's output format."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        output = kwargs.get("output", Output.table)
        try:
            return fn(*args, **kwargs)
        except JobFailed as exc:
            fmt.print_error(exc, output, err_console)
            raise typer.Exit(EXIT_JOB_FAILED) from None
        except errors.LoraflowError as exc:
            fmt.print_error(exc, output, err_console)
            raise typer.Exit(EXIT_RPC_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _report_upload(result) -> None:
    """train/compile pushed a local input because the service is remote: say so, and where it went."""
    if result.uploaded_files:
        sent = f"{result.uploaded_files} of {result.files} files, {fmt.human_bytes(result.uploaded_bytes)} sent"
    else:
        sent = "already in the store, nothing sent"
    err_console.print(f"uploaded {result.local_path} -> {result.target} ({sent})", highlight=False)


UploadOpt = Annotated[bool | None, typer.Option(
    "--upload/--no-upload",
    help="Push local paths through the service's StorageService and send their store URIs (default: when the "
         "service is not on this machine, or refuses the paths, as one in a container does).")]
ServiceOpt = Annotated[str, typer.Option(help="Service whose store to use: trainer or compiler.")]


def _split(values: str | None) -> list[str]:
    return [v.strip() for v in (values or "").split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------ up

@app.command()
def up(ctx: typer.Context,
       services: Annotated[str, typer.Option(help="Comma-separated services to run.")] = "trainer,compiler,inference",
       redis_url: Annotated[str | None, typer.Option(help="Use this Redis instead of an embedded one.",
                                                     envvar=settings.REDIS_URL.env)] = None,
       store_url: Annotated[str | None, typer.Option(help="Object store URL (default file store under the home).",
                                                     envvar=settings.STORE_URL.env)] = None,
       home: Annotated[str | None, typer.Option(help="State directory (default ~/.loraflow).")] = None,
       ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for each service's health.")] = 180.0,
       grace: Annotated[float, typer.Option(help="Seconds a service gets to stop before it is killed.")] = 30.0,
       output: OutputOpt = Output.table) -> None:
    """Run Redis (embedded unless --redis-url), the file store and the services on this machine."""
    from loraflow.console.up import UpConfig, run_up

    state = _state(ctx)
    try:
        config = UpConfig.build(services=_split(services), redis_url=redis_url, store_url=store_url, home=home,
                                addresses={"trainer": state.trainer, "compiler": state.compiler,
                                           "inference": state.inference},
                                ready_timeout=ready_timeout, grace=grace, json_output=output == Output.json)
    except errors.LoraflowError as exc:
        fmt.print_error(exc, output, err_console)
        raise typer.Exit(EXIT_RPC_ERROR) from None
    raise typer.Exit(run_up(config, out_console, err_console))


@app.command()
@handles_errors
def health(ctx: typer.Context,
           services: Annotated[list[str] | None, typer.Argument(help="trainer, compiler, inference (default all).")]
           = None,
           service_name: Annotated[str, typer.Option("--name", help="Health service name to ask for ('' = server).")]
           = "",
           live: Annotated[bool, typer.Option(help="Liveness: any answer counts, NOT_SERVING included.")] = False,
           output: OutputOpt = Output.table) -> None:
    """gRPC health of the services; exits 1 unless every one asked is SERVING (usable as a container probe)."""
    client = _state(ctx).client
    names = services or ["trainer", "compiler", "inference"]
    rows = []
    for name in names:
        if name not in client.addresses:
            raise errors.InvalidArgument(f"service must be one of {sorted(client.addresses)}, got {name!r}",
                                         field="service", value=name)
        try:
            status = client.health(name, service_name)
        except errors.LoraflowError as exc:
            status = exc.code
        rows.append({"service": name, "address": client.addresses[name], "status": status})
    if output == Output.json:
        fmt.print_json({"services": rows})
    else:
        out_console.print(fmt.table(None, ["service", "address", "status"],
                                    [(r["service"], r["address"], r["status"]) for r in rows]))
    healthy = ("SERVING", "NOT_SERVING") if live else ("SERVING",)
    if any(r["status"] not in healthy for r in rows):
        raise typer.Exit(EXIT_RPC_ERROR)


# ------------------------------------------------------------------------------------------------ jobs

def _job_rows(jobs: list[jobs_pb2.Job]) -> list[tuple]:
    return [(j.id, fmt.kind_name(j.kind), fmt.styled_state(j.state), f"{j.progress * 100:.0f}%",
             fmt.timestamp(j.create_time), _job_outcome(j)) for j in jobs]


def _job_outcome(job: jobs_pb2.Job) -> str:
    if job.error:
        return job.error
    which = job.WhichOneof("result")
    if which == "train_result":
        return f"adapter {job.train_result.adapter_name}"
    if which == "compile_result":
        hit = " (cache hit)" if job.compile_result.cache_hit else ""
        return f"artifact {job.compile_result.artifact_id}{hit}"
    return job.message


def _print_job(job: jobs_pb2.Job, output: Output) -> None:
    if output == Output.json:
        fmt.print_json(fmt.to_dict(job))
        return
    pairs = [("id", job.id), ("kind", fmt.kind_name(job.kind)), ("state", fmt.styled_state(job.state)),
             ("progress", f"{job.progress * 100:.1f}%"), ("attempt", job.attempt),
             ("created", fmt.timestamp(job.create_time)), ("started", fmt.timestamp(job.start_time)),
             ("ended", fmt.timestamp(job.end_time)), ("message", job.message)]
    if job.error:
        pairs.append(("error", f"[red]{job.error}[/red]"))
    if job.request_id:
        pairs.append(("request_id", job.request_id))
    if job.labels:
        pairs.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))))
    which = job.WhichOneof("result")
    if which == "train_result":
        r = job.train_result
        pairs += [("adapter", r.adapter_name), ("adapter_uri", r.adapter_uri), ("metrics", fmt.fmt_metrics(r.metrics))]
        if r.loss_curve_uri:
            pairs.append(("loss_curve", r.loss_curve_uri))
    elif which == "compile_result":
        r = job.compile_result
        pairs += [("artifact", r.artifact_id), ("artifact_uri", r.artifact_uri), ("cache_hit", r.cache_hit)]
    out_console.print(fmt.key_values(f"job {job.id}", pairs))


@jobs_app.command("list")
@handles_errors
def jobs_list(ctx: typer.Context,
              kind: Annotated[str | None, typer.Option(help="train or compile (default both).")] = None,
              state: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, cancelled.")]
              = None,
              limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
              output: OutputOpt = Output.table) -> None:
    """Jobs, newest first."""
    jobs = _state(ctx).client.list_jobs(kind=kind, state=state, limit=limit)
    if output == Output.json:
        fmt.print_json({"jobs": [fmt.to_dict(j) for j in jobs]})
    else:
        out_console.print(fmt.table(None, ["id", "kind", "state", "progress", "created", "result / message"],
                                    _job_rows(jobs)))


@jobs_app.command("get")
@handles_errors
def jobs_get(ctx: typer.Context, job_id: str,
             kind: Annotated[str | None, typer.Option(help="train or compile (default: ask both).")] = None,
             output: OutputOpt = Output.table) -> None:
    """One job with its result."""
    _print_job(_state(ctx).client.get_job(job_id, kind), output)


@jobs_app.command("cancel")
@handles_errors
def jobs_cancel(ctx: typer.Context, job_id: str,
                kind: Annotated[str | None, typer.Option(help="train or compile (default: ask both).")] = None,
                output: OutputOpt = Output.table) -> None:
    """Cancel a queued or running job."""
    _print_job(_state(ctx).client.cancel_job(job_id, kind), output)


@jobs_app.command("watch")
@handles_errors
def jobs_watch(ctx: typer.Context, job_id: str,
               kind: Annotated[str | None, typer.Option(help="train or compile (default: ask both).")] = None,
               after_seq: Annotated[int, typer.Option(help="Skip events up to this sequence number.")] = 0,
               output: OutputOpt = Output.table) -> None:
    """Print a job's events (past, then live) until it ends; JSON lines with -o json."""
    client = _state(ctx).client
    for event in client.watch_job(job_id, kind, after_seq=after_seq):
        if output == Output.json:
            fmt.print_json_line(fmt.to_dict(event))
        else:
            out_console.print(f"{event.seq:>4} {fmt.timestamp(event.time)} {fmt.styled_state(event.state):<9} "
                              f"{event.progress * 100:5.1f}%  {event.message}  {fmt.fmt_metrics(event.metrics)}",
                              highlight=False)
    job = client.get_job(job_id, kind)
    if job.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
        raise JobFailed(job)


# ------------------------------------------------------------------------------------------------ progress

def _follow(client: Client, job: jobs_pb2.Job, output: Output, describe: Callable[[jobs_pb2.JobEvent], str]
            ) -> jobs_pb2.Job:
    """Wait for a job; a live progress bar on stderr unless -o json (then only the final Job is printed)."""
    if output == Output.json:
        return client.wait(job.id)
    if not err_console.is_terminal:
        # Logs and CI: one plain line per event instead of a redrawn bar.
        def print_line(event: jobs_pb2.JobEvent) -> None:
            err_console.print(f"{job.id} {event.progress * 100:5.1f}%  {describe(event)}", highlight=False)

        return client.wait(job.id, on_event=print_line)
    progress = Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, transient=False)
    with progress:
        task = progress.add_task("queued", total=1.0, label=job.id)

        def on_event(event: jobs_pb2.JobEvent) -> None:
            progress.update(task, completed=event.progress, description=describe(event))

        try:
            final = client.wait(job.id, on_event=on_event)
        except KeyboardInterrupt:
            err_console.print(f"stopped watching; job {job.id} keeps running (loraflow jobs cancel {job.id})")
            raise
    return final


def _train_line(event: jobs_pb2.JobEvent) -> str:
    m = event.metrics
    parts = [fmt.state_name(event.state).lower()]
    if "step" in m:
        parts.append(f"step {int(m['step'])}")
    for key, label in (("loss", "loss"), ("eval_loss", "eval"), ("learning_rate", "lr"),
                       ("tokens_per_second", "tok/s")):
        if key in m:
            parts.append(f"{label} {m[key]:.4g}")
    if event.message:
        parts.append(event.message)  # the trainer puts its eta here
    return "  ".join(parts)


def _compile_line(event: jobs_pb2.JobEvent) -> str:
    return event.message or fmt.state_name(event.state).lower()


# ------------------------------------------------------------------------------------------------ train

@app.command()
@handles_errors
def train(ctx: typer.Context,
          base: Annotated[str, typer.Argument(help="Base model: HF checkpoint dir or store URI.")],
          data: Annotated[str, typer.Argument(help="JSONL dataset: local path or store URI.")],
          name: Annotated[str, typer.Option(help="Adapter name to register.")],
          r: Annotated[int | None, typer.Option(help="LoRA rank (default: the server's, 8).")] = None,
          alpha: Annotated[float, typer.Option(help="lora_alpha (0 = 2*r).")] = 0.0,
          targets: Annotated[str | None, typer.Option(help="Comma-separated modules, or all-linear.")] = None,
          dropout: Annotated[float, typer.Option(help="lora_dropout.")] = 0.0,
          rslora: Annotated[bool, typer.Option(help="Rank-stabilised scaling alpha/sqrt(r).")] = False,
          bias: Annotated[str, typer.Option(help="only none: the compiler serves no trained biases.")] = "",
          steps: Annotated[int, typer.Option(help="max_steps (0 = run --epochs).")] = 0,
          epochs: Annotated[float, typer.Option(help="num_epochs when --steps is 0.")] = 0.0,
          batch_size: Annotated[int, typer.Option()] = 0,
          grad_accum: Annotated[int, typer.Option(help="gradient_accumulation_steps.")] = 0,
          lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.0,
          max_seq_len: Annotated[int, typer.Option()] = 0,
          eval_fraction: Annotated[float, typer.Option()] = 0.0,
          seed: Annotated[int, typer.Option()] = 0,
          checkpoint_every: Annotated[int, typer.Option(help="checkpoint_every_steps.")] = 0,
          warmup_steps: Annotated[int, typer.Option()] = 0,
          lr_scheduler: Annotated[str, typer.Option(help="cosine, linear or constant.")] = "",
          gradient_checkpointing: Annotated[bool, typer.Option()] = False,
          device: Annotated[str, typer.Option(help="cpu, cuda or qaic.")] = "",
          world_size: Annotated[int, typer.Option(help="Data-parallel ranks (torch.distributed) for this job; "
                                                       "0 = 1.")] = 0,
          nodes: Annotated[int, typer.Option(help="Machines the ranks span (must divide --world-size); 0 = 1.")] = 0,
          request_id: Annotated[str, typer.Option(help="Idempotency key.")] = "",
          wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar until it ends.")] = False,
          upload: UploadOpt = None,
          output: OutputOpt = Output.table) -> None:
    """Submit a LoRA fine-tuning job (local inputs are pushed first when the trainer is remote)."""
    client = _state(ctx).client
    job = client.train(base, data, name, r=r, alpha=alpha, targets=_split(targets), dropout=dropout, rslora=rslora,
                       bias=bias, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                       max_seq_len=max_seq_len, eval_fraction=eval_fraction, seed=seed,
                       checkpoint_every=checkpoint_every, device=device, warmup_steps=warmup_steps,
                       lr_scheduler=lr_scheduler, gradient_checkpointing=gradient_checkpointing,
                       request_id=request_id, world_size=world_size, nodes=nodes, upload=upload)
    if wait:
        job = _follow(client, job, output, _train_line)
    _print_job(job, output)


# ------------------------------------------------------------------------------------------------ adapters

def _adapter_pairs(a) -> list[tuple[str, object]]:
    return [("name", a.name), ("uri", a.uri), ("base_model", a.base_model), ("r", a.lora.r),
            ("lora_alpha", a.lora.lora_alpha), ("targets", ",".join(a.lora.target_modules)),
            ("rslora", a.lora.use_rslora), ("metrics", fmt.fmt_metrics(a.metrics)), ("job_id", a.job_id),
            ("digest", a.digest), ("created", fmt.timestamp(a.create_time))]


@adapters_app.command("list")
@handles_errors
def adapters_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Registered adapters."""
    adapters = _state(ctx).client.list_adapters()
    if output == Output.json:
        fmt.print_json({"adapters": [fmt.to_dict(a) for a in adapters]})
        return
    out_console.print(fmt.table(None, ["name", "base_model", "r", "targets", "metrics", "created"], [
        (a.name, a.base_model, a.lora.r, ",".join(a.lora.target_modules),
         fmt.fmt_metrics(a.metrics, ["train_loss", "eval_loss", "steps"]), fmt.timestamp(a.create_time))
        for a in adapters]))


@adapters_app.command("get")
@handles_errors
def adapters_get(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """One adapter."""
    adapter = _state(ctx).client.get_adapter(name)
    if output == Output.json:
        fmt.print_json(fmt.to_dict(adapter))
    else:
        out_console.print(fmt.key_values(f"adapter {adapter.name}", _adapter_pairs(adapter)))


@adapters_app.command("register")
@handles_errors
def adapters_register(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Name to register it under ([A-Za-z0-9._-], 1..64 chars).")],
        adapter: Annotated[str, typer.Argument(metavar="DIR|URI",
                                               help="PEFT adapter directory (adapter_config.json + "
                                                    "adapter_model.safetensors) or its store URI.")],
        base: Annotated[str, typer.Option(help="Base model it was trained on: HF checkpoint dir or store URI, as "
                                               "compile is given it.")],
        upload: UploadOpt = None,
        output: OutputOpt = Output.table) -> None:
    """Register an adapter trained elsewhere, checked as load-adapter checks it; inference serves it by name on
    first use. A local directory is pushed first when the trainer is remote."""
    response = _state(ctx).client.register_adapter(name, adapter, base, upload=upload)
    if output == Output.json:
        fmt.print_json(fmt.to_dict(response))
        return
    status = "already registered, nothing written" if response.already_registered else "registered"
    out_console.print(fmt.key_values(f"adapter {response.adapter.name} ({status})",
                                     _adapter_pairs(response.adapter)))


@adapters_app.command("delete")
@handles_errors
def adapters_delete(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """Delete an adapter from the registry and the store."""
    adapter = _state(ctx).client.delete_adapter(name)
    if output == Output.json:
        fmt.print_json({"deleted": fmt.to_dict(adapter)})
    else:
        out_console.print(f"deleted adapter {adapter.name or name}")


# ------------------------------------------------------------------------------------------------ compile

@app.command("compile")
@handles_errors
def compile_(ctx: typer.Context,
             base: Annotated[str, typer.Argument(help="Base model: HF checkpoint dir or store URI.")],
             adapters: Annotated[str, typer.Option(help="Comma-separated adapter names/URIs in slot order.")] = "",
             target: Annotated[str, typer.Option(help="onnxruntime or ai100.")] = "",
             ctx_len: Annotated[int | None, typer.Option()] = None,
             prefill_seq_len: Annotated[int | None, typer.Option()] = None,
             batch_size: Annotated[int | None, typer.Option()] = None,
             full_batch_size: Annotated[int | None, typer.Option(help="Continuous-batching slots.")] = None,
             slots: Annotated[int | None, typer.Option(help="Adapter slots (>= number of adapters).")] = None,
             max_rank: Annotated[int | None, typer.Option()] = None,
             dtype: Annotated[str, typer.Option(help="fp32, fp16 (GPU), int8 or int4 (weight-only, MatMulNBits).")] = "",
             quant_block_size: Annotated[int | None, typer.Option(
                 help="int4/int8: weights per quantisation block, a power of two in 16..256 (default 32).")] = None,
             quant_accuracy_level: Annotated[int | None, typer.Option(
                 help="int4/int8: MatMulNBits accuracy_level 0..4 (default 4 = int8 activations; 0 = float, slow).")] = None,
             num_cores: Annotated[int | None, typer.Option(help="AI 100 cores.")] = None,
             target_modules: Annotated[str | None, typer.Option(help="Comma-separated modules to adapt.")] = None,
             mxfp6_matmul: Annotated[bool, typer.Option(help="AI 100: MXFP6 matmul weights.")] = False,
             ai100_stage: Annotated[str, typer.Option(
                 help="AI 100: 'compile' (needs the SDK) or 'export' (bundle and qaic-exec command, no SDK).")] = "",
             compiler_option: Annotated[list[str] | None, typer.Option(
                 help="AI 100: an extra qaic-exec option, '-name' or '-name=value' (repeatable).")] = None,
             request_id: Annotated[str, typer.Option(help="Idempotency key.")] = "",
             wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar until it ends.")] = False,
             upload: UploadOpt = None,
             output: OutputOpt = Output.table) -> None:
    """Compile a base model with an adapter set into an artifact (local directories are pushed first when the
    compiler is remote)."""
    client = _state(ctx).client
    job = client.compile(base, _split(adapters), target=target, ctx_len=ctx_len, prefill_seq_len=prefill_seq_len,
                         batch_size=batch_size, full_batch_size=full_batch_size, slots=slots, max_rank=max_rank,
                         dtype=dtype, num_cores=num_cores, target_modules=_split(target_modules),
                         mxfp6_matmul=mxfp6_matmul, request_id=request_id, upload=upload,
                         quant_block_size=quant_block_size, quant_accuracy_level=quant_accuracy_level,
                         ai100_stage=ai100_stage, compiler_options=compiler_option or ())
    if wait and job.state not in (jobs_pb2.JOB_STATE_SUCCEEDED,):
        job = _follow(client, job, output, _compile_line)
    _print_job(job, output)


# ------------------------------------------------------------------------------------------------ artifacts

def _artifact_pairs(a) -> list[tuple[str, object]]:
    o = a.options
    return [("artifact_id", a.artifact_id), ("uri", a.uri), ("base_model", a.base_model),
            ("architecture", a.architecture), ("size", fmt.human_bytes(a.size_bytes)),
            ("adapters", ", ".join(f"{s.slot}:{s.name}(r={s.r})" for s in a.adapters)),
            ("target", o.target), ("dtype", o.dtype), ("ctx_len", o.ctx_len), ("prefill_seq_len", o.prefill_seq_len),
            ("batch_size", o.batch_size), ("full_batch_size", o.full_batch_size), ("adapter_slots", o.adapter_slots),
            ("max_rank", o.max_rank), ("created", fmt.timestamp(a.create_time))]


@artifacts_app.command("list")
@handles_errors
def artifacts_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Compiled artifacts."""
    artifacts = _state(ctx).client.list_artifacts()
    if output == Output.json:
        fmt.print_json({"artifacts": [fmt.to_dict(a) for a in artifacts]})
        return
    out_console.print(fmt.table(None, ["artifact_id", "base_model", "adapters", "target", "dtype", "size", "created"], [
        (a.artifact_id, a.base_model, ",".join(s.name for s in a.adapters), a.options.target, a.options.dtype,
         fmt.human_bytes(a.size_bytes), fmt.timestamp(a.create_time)) for a in artifacts]))


@artifacts_app.command("get")
@handles_errors
def artifacts_get(ctx: typer.Context, artifact_id: str, output: OutputOpt = Output.table) -> None:
    """One artifact."""
    artifact = _state(ctx).client.get_artifact(artifact_id)
    if output == Output.json:
        fmt.print_json(fmt.to_dict(artifact))
    else:
        out_console.print(fmt.key_values(f"artifact {artifact.artifact_id}", _artifact_pairs(artifact)))


@artifacts_app.command("delete")
@handles_errors
def artifacts_delete(ctx: typer.Context, artifact_id: str, output: OutputOpt = Output.table) -> None:
    """Delete an artifact from the registry and the store."""
    artifact = _state(ctx).client.delete_artifact(artifact_id)
    if output == Output.json:
        fmt.print_json({"deleted": fmt.to_dict(artifact)})
    else:
        out_console.print(f"deleted artifact {artifact.artifact_id or artifact_id}")


# ------------------------------------------------------------------------------------------------ inference

def _model_rows(models) -> list[tuple]:
    return [(m.model_id, m.artifact_id, m.device,
             ", ".join(f"{a.slot}:{a.name}" for a in m.adapters), m.free_adapter_slots, m.batch_slots, m.ctx_len,
             m.active_requests, fmt.human_bytes(m.memory_bytes)) for m in models]


_MODEL_COLUMNS = ["model_id", "artifact_id", "device", "adapters", "free slots", "batch", "ctx", "active", "memory"]


def _print_model(model: inference_pb2.Model, output: Output) -> None:
    if output == Output.json:
        fmt.print_json(fmt.to_dict(model))
    else:
        out_console.print(fmt.table(None, _MODEL_COLUMNS, _model_rows([model])))


@app.command()
@handles_errors
def load(ctx: typer.Context, artifact: Annotated[str, typer.Argument(help="Artifact id.")],
         device: Annotated[str, typer.Option(help="cpu, cuda or ai100.")] = "",
         model_id: Annotated[str, typer.Option(help="Id to give the model (default from the artifact).")] = "",
         threads: Annotated[int, typer.Option(help="CPU intra-op threads (0 = runtime default).")] = 0,
         output: OutputOpt = Output.table) -> None:
    """Load an artifact onto a device of the inference service."""
    if output == Output.table:
        with err_console.status(f"loading {artifact}"):
            model = _state(ctx).client.load_artifact(artifact, device, model_id=model_id, num_threads=threads)
    else:
        model = _state(ctx).client.load_artifact(artifact, device, model_id=model_id, num_threads=threads)
    _print_model(model, output)


@app.command("load-adapter")
@handles_errors
def load_adapter(ctx: typer.Context, model: Annotated[str, typer.Argument(help="Loaded model id.")],
                 adapter: Annotated[str, typer.Argument(help="Registered adapter name or PEFT directory URI.")],
                 name: Annotated[str, typer.Option(help="Name to serve it under.")] = "",
                 output: OutputOpt = Output.table) -> None:
    """Bind an adapter into a free slot of a loaded model (no recompile)."""
    _print_model(_state(ctx).client.load_adapter(model, adapter, name), output)


@models_app.command("list")
@handles_errors
def models_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Models loaded on the inference service."""
    models = _state(ctx).client.list_models()
    if output == Output.json:
        fmt.print_json({"models": [fmt.to_dict(m) for m in models]})
    else:
        out_console.print(fmt.table(None, _MODEL_COLUMNS, _model_rows(models)))


@models_app.command("unload")
@handles_errors
def models_unload(ctx: typer.Context, model_id: str, output: OutputOpt = Output.table) -> None:
    """Unload a model from the inference service."""
    model = _state(ctx).client.unload_model(model_id)
    if output == Output.json:
        fmt.print_json({"unloaded": fmt.to_dict(model)})
    else:
        out_console.print(f"unloaded model {model.model_id or model_id}")


@models_app.command("import")
@handles_errors
def models_import(name: Annotated[str, typer.Argument(help="e.g. smollm2-135m-instruct")],
                  output: OutputOpt = Output.table) -> None:
    """Import a known model as a local Hugging Face checkpoint and print its path."""
    from loraflow.storage.models_import import import_model  # heavy (transformers, gguf): only when asked

    path = import_model(name)
    if output == Output.json:
        fmt.print_json({"name": name, "path": str(path)})
    else:
        out_console.print(str(path), highlight=False)


@app.command()
@handles_errors
def generate(ctx: typer.Context,
             prompt: Annotated[str, typer.Argument(help="Prompt text ('-' reads stdin).")],
             model: Annotated[str, typer.Option(help="Loaded model id (default: the only loaded model).")] = "",
             adapter: Annotated[str, typer.Option(help="Adapter name; empty = base model.")] = "",
             chat: Annotated[bool, typer.Option(help="Apply the chat template as one user turn.")] = False,
             max_new_tokens: Annotated[int, typer.Option(help=SAMPLING["max_new_tokens"].help)] = 0,
             temperature: Annotated[float, typer.Option(help=SAMPLING["temperature"].help)] = 0.0,
             top_k: Annotated[int, typer.Option(help=SAMPLING["top_k"].help)] = 0,
             top_p: Annotated[float, typer.Option(help=SAMPLING["top_p"].help)] = 0.0,
             seed: Annotated[int, typer.Option(help=SAMPLING["seed"].help)] = 0,
             stop: Annotated[list[str] | None, typer.Option(help=SAMPLING["stop"].help + " Repeatable.")] = None,
             repetition_penalty: Annotated[float, typer.Option(help=SAMPLING["repetition_penalty"].help)] = 0.0,
             ignore_eos: Annotated[bool, typer.Option(help=SAMPLING["ignore_eos"].help)] = False,
             output: OutputOpt = Output.table) -> None:
    """Stream a completion to the terminal (-o json: one object with text, tokens, finish_reason, usage)."""
    client = _state(ctx).client
    if prompt == "-":
        prompt = sys.stdin.read()
    if not model:
        models = client.list_models()
        if len(models) != 1:
            loaded = [m.model_id for m in models]
            raise errors.InvalidArgument(f"--model is required when {len(loaded)} models are loaded ({loaded})",
                                         field="model", value="")
        model = models[0].model_id
    chunks = client.generate(prompt, model, adapter, chat, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop=stop or [],
                             repetition_penalty=repetition_penalty, ignore_eos=ignore_eos)
    text, token_ids, final = [], [], None
    for chunk in chunks:
        text.append(chunk.text)
        token_ids.extend(chunk.token_ids)
        if output == Output.table and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            final = chunk
    reason = inference_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower() \
        if final else "unspecified"
    usage = {"prompt_tokens": final.usage.prompt_tokens, "completion_tokens": final.usage.completion_tokens} \
        if final else {"prompt_tokens": 0, "completion_tokens": len(token_ids)}
    if output == Output.json:
        fmt.print_json({"model_id": model, "adapter": adapter, "text": "".join(text), "token_ids": token_ids,
                        "finish_reason": reason, "usage": usage,
                        "request_id": final.request_id if final else ""})
    else:
        sys.stdout.write("\n")
        err_console.print(f"[dim]{reason} · {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
                          f"completion tokens[/dim]")



# ------------------------------------------------------------------------------------------------ push / pull

def _print_push(result, output: Output) -> None:
    if output == Output.json:
        fmt.print_json({"kind": result.kind, "name": result.name, "local_path": result.local_path,
                        "uri": result.uri, "file_uri": result.file_uri, "target": result.target,
                        "files": result.files, "total_bytes": result.total_bytes,
                        "uploaded_files": result.uploaded_files, "uploaded_bytes": result.uploaded_bytes,
                        "already_published": result.already_published})
        return
    status = "already published, nothing sent" if result.already_published and not result.uploaded_files \
        else f"published ({result.uploaded_files} files, {fmt.human_bytes(result.uploaded_bytes)} sent)"
    out_console.print(fmt.key_values(f"{result.kind} {result.name}", [
        ("uri", result.target), ("files", result.files), ("size", fmt.human_bytes(result.total_bytes)),
        ("status", status)]))
    err_console.print(f"[dim]use it as: {result.target}[/dim]", highlight=False)


def _print_pull(result, output: Output) -> None:
    if output == Output.json:
        fmt.print_json({"uri": result.uri, "dest": result.dest, "files": result.files,
                        "total_bytes": result.total_bytes})
    else:
        out_console.print(f"pulled {result.uri} -> {result.dest} ({result.files} files, "
                          f"{fmt.human_bytes(result.total_bytes)})", highlight=False)


def _push(ctx: typer.Context, kind: str, path: str, name: str | None, service: str, output: Output) -> None:
    client = _state(ctx).client
    _print_push(client.push(kind, path, name=name or None, service=service,
                            progress=None if output == Output.table else False), output)


PushNameOpt = Annotated[str | None, typer.Option(help="Name to publish it under (default: the file or directory "
                                                      "name).")]


@models_app.command("push")
@handles_errors
def models_push(ctx: typer.Context, path: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory.")],
                name: PushNameOpt = None, service: ServiceOpt = "trainer", output: OutputOpt = Output.table) -> None:
    """Upload a model directory into the store (sha256-checked, the same files upload once); prints its URI."""
    _push(ctx, "model", path, name, service, output)


@models_app.command("pull")
@handles_errors
def models_pull(ctx: typer.Context, uri: Annotated[str, typer.Argument(help="Store URI of a published directory.")],
                dest: Annotated[str, typer.Argument(help="Local directory to create.")],
                service: ServiceOpt = "trainer", output: OutputOpt = Output.table) -> None:
    """Download a published store directory (a model, adapter or artifact), sha256-checked."""
    _print_pull(_state(ctx).client.pull(uri, dest, service=service,
                                        progress=None if output == Output.table else False), output)


@adapters_app.command("push")
@handles_errors
def adapters_push(ctx: typer.Context, path: Annotated[str, typer.Argument(help="PEFT adapter directory.")],
                  name: PushNameOpt = None, service: ServiceOpt = "trainer",
                  output: OutputOpt = Output.table) -> None:
    """Upload a PEFT adapter directory into the store; prints its URI (for compile --adapters)."""
    _push(ctx, "adapter", path, name, service, output)


@adapters_app.command("pull")
@handles_errors
def adapters_pull(ctx: typer.Context,
                  adapter: Annotated[str, typer.Argument(help="Registered adapter name, or a store URI.")],
                  dest: Annotated[str, typer.Argument(help="Local directory to create.")],
                  service: ServiceOpt = "trainer", output: OutputOpt = Output.table) -> None:
    """Download an adapter (by registered name or store URI) as a plain PEFT directory."""
    from loraflow.storage.model_source import is_location

    client = _state(ctx).client
    uri = adapter if is_location(adapter) else client.get_adapter(adapter).uri
    _print_pull(client.pull(uri, dest, service=service, progress=None if output == Output.table else False),
                output)


@datasets_app.command("push")
@handles_errors
def datasets_push(ctx: typer.Context, path: Annotated[str, typer.Argument(help="JSONL file (or a directory).")],
                  name: PushNameOpt = None, service: ServiceOpt = "trainer",
                  output: OutputOpt = Output.table) -> None:
    """Upload a dataset into the store; prints the URI to train on."""
    _push(ctx, "dataset", path, name, service, output)


# ------------------------------------------------------------------------------------------------ registry (operator)

registry_app = typer.Typer(help="Operator tools for the adapter/artifact registry in Redis.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("rebuild")
@handles_errors
def registry_rebuild(
        redis_url: Annotated[str, typer.Option(help="Redis holding the registry (password and TLS in the URL: "
                                                    "rediss://:PW@host:port/0).", envvar=settings.REDIS_URL.env)],
        store_url: Annotated[str | None, typer.Option(help="Object store, the source of truth (file:// or s3://; "
                                                           "default ~/.loraflow/store).",
                                                      envvar=settings.STORE_URL.env)] = None,
        output: OutputOpt = Output.table) -> None:
    """Re-create the adapter and artifact registry from the store after a Redis loss (idempotent)."""
    import redis

    from loraflow.jobs.registry import Registry
    from loraflow.jobs.registry_rebuild import rebuild_registry
    from loraflow.options.config import Settings, connect_redis, mask_redis_url
    from loraflow.storage.store import open_store

    config = Settings(redis_url=redis_url, **({"store_url": store_url} if store_url else {}))
    client = connect_redis(config)
    try:
        report = rebuild_registry(open_store(config.store_url), Registry(client))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise errors.Unavailable(f"redis at {mask_redis_url(redis_url)} is unreachable ({type(exc).__name__})",
                                 field="redis_url", value=mask_redis_url(redis_url)) from None
    finally:
        client.close()
    rows = [{"kind": e.kind, "name": e.name, "uri": e.uri, "status": e.status, "detail": e.detail} for e in report]
    if output == Output.json:
        fmt.print_json({"entries": rows, "restored": sum(e.status == "restored" for e in report)})
        return
    out_console.print(fmt.table(f"registry rebuilt from {config.store_url}",
                                ["kind", "name", "status", "uri", "detail"],
                                [(r["kind"], r["name"], r["status"], r["uri"], r["detail"]) for r in rows]))
    restored = sum(e.status == "restored" for e in report)
    err_console.print(f"{restored} restored, {sum(e.status == 'present' for e in report)} already present, "
                      f"{sum(e.status == 'skipped' for e in report)} skipped")


# ------------------------------------------------------------------------------------------------ auth (operator)

auth_app = typer.Typer(help="Operator tools for the services' bearer tokens.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")


@auth_app.command("add-token")
@handles_errors
def auth_add_token(
        name: Annotated[str, typer.Argument(help="caller name logged by the services (letters, digits, _.@-)")],
        tokens_file: Annotated[Path, typer.Option(help="the services' --auth-tokens-file (created 0600 if missing)",
                                                  envvar=settings.AUTH_TOKENS_FILE.env)],
        output: OutputOpt = Output.table) -> None:
    """Add a random token for NAME to a tokens file and print it once (clients send it as LORAFLOW_TOKEN).

    Running services pick it up on SIGHUP or their next start."""
    from loraflow.security.auth import add_token

    token = add_token(tokens_file, name)
    if output == Output.json:
        fmt.print_json({"name": name, "tokens_file": str(tokens_file), "token": token})
        return
    out_console.print(token, markup=False, highlight=False)
    err_console.print(f"added {name!r} to {tokens_file}; send it as LORAFLOW_TOKEN, and SIGHUP the services "
                      "(or restart them) to accept it")


@app.command("settings")
@handles_errors
def settings_list(output: OutputOpt = Output.table) -> None:
    """Every LORAFLOW_* environment variable: its flag, default, help, and its value in this environment."""
    from loraflow.options.settings import all_settings

    rows = [{"env": s.env, "flag": s.flag, "default": s.default, "value": s.raw(), "help": s.help,
             "deprecated_names": list(s.aliases)} for s in all_settings()]
    if output == Output.json:
        fmt.print_json(rows)
        return
    # One block per setting (a five-column table folds every cell to nothing on an 80-column terminal).
    from rich.padding import Padding
    from rich.text import Text

    for r in rows:
        head = Text(r["env"], style="bold")
        head.append(f"  {r['flag'] or '(env only)'}", style="cyan")
        if r["default"] is not None:
            head.append(f"  default {r['default']}")
        if r["value"]:
            head.append(f"  set here: {r['value']}", style="green")
        if r["deprecated_names"]:
            head.append(f"  (deprecated: {', '.join(r['deprecated_names'])})", style="yellow")
        out_console.print(head)
        out_console.print(Padding(Text(r["help"], style="dim"), (0, 0, 0, 4)))


if __name__ == "__main__":
    app()
