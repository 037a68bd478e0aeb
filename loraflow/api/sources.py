"""What `from_pretrained` and `load_adapter` name → a local directory, in this process.

A model is a local Hugging Face checkpoint directory, a name known to `loraflow models import`
(already imported into the cache: this library never downloads), or a store URI (file:// or
s3://, fetched sha256-verified into the cache). An adapter is a PEFT directory, a store URI, or a
name `loraflow.finetune` trained in this process.

The paths are the user's own (this is their process, not a service taking requests), so any local
directory is allowed except the kernel's trees; links leading out of a directory are still refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from loraflow.errors import FailedPrecondition
from loraflow.security.local_paths import LocalPathPolicy
from loraflow.storage.model_source import InputPolicy, is_location, is_remote, materialize

# adapter name -> directory, for adapters `loraflow.finetune` wrote in this process.
_TRAINED_HERE: dict[str, Path] = {}


def remember_trained(name: str, path: Path) -> None:
    _TRAINED_HERE[name] = Path(path)


def trained_here(name: str) -> Path | None:
    return _TRAINED_HERE.get(name)


def _store_and_cache(cache_dir: Path | None):
    from loraflow.options.config import Settings
    from loraflow.storage.store import open_store

    settings = Settings.from_env()
    return open_store(settings.store_url), Path(cache_dir or settings.cache_dir)


def _policy_for(spec: str) -> InputPolicy:
    bucket = (urlparse(spec).netloc,) if is_remote(spec) else ()
    return InputPolicy(LocalPathPolicy(("/",)), s3_buckets=bucket)


def _fetch(spec: str, *, field: str, kind: str, cache_dir: Path | None) -> Path:
    store, cache = _store_and_cache(cache_dir)
    return materialize(spec, store, cache, field=field, kind=kind, policy=_policy_for(spec))


def spec_string(spec: str | os.PathLike, field: str) -> str:
    if isinstance(spec, os.PathLike):
        return str(Path(spec).expanduser().resolve())
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"{field} must be a path, store URI or name (str or os.PathLike), got {spec!r}")
    return spec


def resolve_model(spec: str | os.PathLike, *, cache_dir: Path | None = None) -> Path:
    """The local checkpoint directory for a model spec; FileNotFoundError / InvalidArgument otherwise."""
    from loraflow.storage.models_import import KNOWN_MODELS, is_imported, model_dir

    spec = spec_string(spec, "pretrained_model_name_or_path")
    if spec in KNOWN_MODELS:
        path = model_dir(spec, cache_dir)
        if not is_imported(path):
            raise FileNotFoundError(f"model {spec!r} is not imported yet (looked in {path}); run "
                                    f"`loraflow models import {spec}` first (this library never downloads)")
        return path
    if "://" in spec:
        return _fetch(spec, field="base_model", kind="models", cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r} is neither a local checkpoint directory nor a name known to "
                                f"`loraflow models import` ({sorted(KNOWN_MODELS)}); there is no hub to "
                                "download it from")
    return _fetch(str(path.resolve()), field="base_model", kind="models", cache_dir=cache_dir)


def model_type(model_dir: Path) -> str | None:
    from loraflow.storage.model_source import read_json_file

    config = read_json_file(str(model_dir), "config.json", None, field="base_model",
                            policy=_policy_for(str(model_dir)))
    value = config.get("model_type")
    return value if isinstance(value, str) else None


def resolve_adapter(spec: str | os.PathLike, *, cache_dir: Path | None = None) -> Path:
    """The local PEFT directory for an adapter spec."""
    spec = spec_string(spec, "adapter")
    if is_location(spec):
        if "://" not in spec and not Path(spec).expanduser().is_dir():
            raise FileNotFoundError(f"adapter {spec!r} is not a directory")
        local = spec if "://" in spec else str(Path(spec).expanduser().resolve())
        return _fetch(local, field="adapter", kind="adapters", cache_dir=cache_dir)
    trained = trained_here(spec)
    if trained is not None:
        return trained
    if Path(spec).is_dir():  # a relative directory name in the working directory
        return _fetch(str(Path(spec).resolve()), field="adapter", kind="adapters", cache_dir=cache_dir)
    raise FileNotFoundError(f"adapter {spec!r} is not a directory, a store URI or an adapter loraflow.finetune "
                            "trained in this process; a name registered with the trainer service needs "
                            "connect='host:port' (no hub: download_adapter is not supported)")


def write_overridden_checkpoint(model_dir: Path, overrides: dict, cache_dir: Path | None) -> Path:
    """A copy of `model_dir` whose config.json has `overrides` applied (weights hard-linked when possible).

    Only keys config.json already has may be overridden: anything else is not a config value of this model."""
    import hashlib
    import shutil
    import tempfile

    config = json.loads((model_dir / "config.json").read_text())
    unknown = sorted(k for k in overrides if k not in config)
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {unknown}: config overrides must "
                        f"be keys of {model_dir / 'config.json'} (it has {sorted(config)})")
    config.update(overrides)
    digest = hashlib.sha256(json.dumps([str(model_dir.resolve()), config], sort_keys=True).encode()).hexdigest()
    _, cache = _store_and_cache(cache_dir)
    dest = cache / "models" / f"override-{digest[:24]}"
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".override-", dir=dest.parent))
    for src in model_dir.iterdir():
        if src.is_file() and src.name != "config.json":
            try:
                os.link(src, tmp / src.name)
            except OSError:  # another filesystem: copy
                shutil.copyfile(src, tmp / src.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    if not (dest / "config.json").is_file():
        raise FailedPrecondition(f"could not write the overridden checkpoint {dest}", field="config_overrides",
                                 value=sorted(overrides))
    return dest

