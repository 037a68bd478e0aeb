"""Every LORAFLOW_* variable is a declared setting (loraflow/options/settings.py) and only the registry reads one."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.options.settings import INFERENCE_ADDR, REGISTRY, all_settings

ROOT = Path(__file__).resolve().parents[2]
REGISTRY_FILE = ROOT / "loraflow" / "options" / "settings.py"
# A LORAFLOW_* name read from the environment directly: os.environ[...] / .get(...), getenv(...), a mapping
# called env, or click's envvar=.
DIRECT_READ = re.compile(r"""(environ|getenv|\benv)\s*(\.get\s*\(|\[|\()\s*f?["']LORAFLOW_|envvar\s*=\s*["']LORAFLOW_""")
NAME = re.compile(r"LORAFLOW_[A-Z0-9_]*[A-Z0-9]")


def _code_files() -> list[Path]:
    files = [p for package in ("loraflow", "services") for p in (ROOT / package).rglob("*.py")]
    return sorted(p for p in files if p != REGISTRY_FILE and "v1" not in p.relative_to(ROOT).parts)


def direct_reads(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if DIRECT_READ.search(line)]


def names_in_strings(path: Path) -> set[str]:
    """LORAFLOW_* names inside the file's string literals (help texts, messages, keys), not identifiers."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {name for t in tokens if t.type == tokenize.STRING for name in NAME.findall(t.string)}


def test_no_variable_is_read_outside_the_registry():
    offenders = [hit for path in _code_files() for hit in direct_reads(path)]
    assert not offenders, "read LORAFLOW_* through loraflow.options.settings:\n" + "\n".join(offenders)


def test_the_scan_finds_a_direct_read(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import os\nx = os.environ.get("LORAFLOW_X")\ny = env["LORAFLOW_Y"]\nz = os.getenv("LORAFLOW_Z")\n'
                      'w = typer.Option(envvar="LORAFLOW_W")\nok = REDIS_URL.raw(env)\n')
    hits = [h.split(":")[1] for h in direct_reads_outside(sample, tmp_path)]
    assert hits == ["2", "3", "4", "5"]


def direct_reads_outside(path: Path, root: Path) -> list[str]:
    return [f"{path.relative_to(root)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if DIRECT_READ.search(line)]


def test_every_variable_the_code_names_is_declared():
    known = {s.env for s in all_settings()} | {a for s in all_settings() for a in s.aliases}
    unknown = {f"{name} ({path.relative_to(ROOT)})" for path in _code_files() for name in names_in_strings(path)
               if name not in known}
    assert not unknown, sorted(unknown)


def test_every_setting_has_a_flag_an_env_name_and_help():
    settings = all_settings()
    assert len(settings) >= 43 and len({s.env for s in settings}) == len(settings)
    for s in settings:
        assert s.env.startswith("LORAFLOW_") and s.help.strip(), s
        assert s.flag.startswith("--") or s.env_only, f"{s.env} has no flag and no reason for none"
        assert not (s.flag and s.env_only), s
    assert REGISTRY["LORAFLOW_MEMORY_BUDGET"].flag == "--memory-budget"  # declared in loraflow.options.budget
    assert REGISTRY["LORAFLOW_MAX_REQUEST_BYTES"].flag == "--max-request-bytes"  # loraflow.security.limits


def test_one_address_one_name_the_old_one_warns():
    with pytest.warns(FutureWarning, match="LORAFLOW_INFERENCE is deprecated: set LORAFLOW_INFERENCE_ADDR"):
        assert INFERENCE_ADDR.raw({"LORAFLOW_INFERENCE": "old:1"}) == "old:1"
    assert INFERENCE_ADDR.raw({"LORAFLOW_INFERENCE_ADDR": "new:2", "LORAFLOW_INFERENCE": "old:1"}) == "new:2"
    assert INFERENCE_ADDR.raw({}) is None


def test_the_client_and_the_python_api_read_the_same_address(monkeypatch):
    from loraflow.api.connection import make_client
    from loraflow.client import Client

    monkeypatch.setenv("LORAFLOW_INFERENCE_ADDR", "127.0.0.1:1")
    assert Client().addresses["inference"] == "127.0.0.1:1"
    assert make_client(None).addresses["inference"] == "127.0.0.1:1"
    monkeypatch.delenv("LORAFLOW_INFERENCE_ADDR")
    monkeypatch.setenv("LORAFLOW_INFERENCE", "127.0.0.1:2")
    with pytest.warns(FutureWarning):
        assert Client().addresses["inference"] == "127.0.0.1:2"


def test_loraflow_settings_lists_every_variable(monkeypatch):
    from loraflow.cli import app

    monkeypatch.setenv("LORAFLOW_RDZV_HOST", "node0.example")
    result = CliRunner().invoke(app, ["settings", "-o", "json"])
    assert result.exit_code == 0, result.output
    import json

    listed = {row["env"]: row for row in json.loads(result.output)}
    assert set(listed) == {s.env for s in all_settings()}
    assert listed["LORAFLOW_RDZV_HOST"]["value"] == "node0.example"
    assert listed["LORAFLOW_MEMORY_BUDGET"]["flag"] == "--memory-budget" and listed["LORAFLOW_MEMORY_BUDGET"]["help"]
    # The readable form: one block per setting, the variable and its flag on the first line, the value set here.
    text = CliRunner().invoke(app, ["settings"], terminal_width=80).output
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("LORAFLOW_")]
    blocks = {lines[i].split()[0]: "\n".join(lines[i:j]) for i, j in zip(starts, [*starts[1:], len(lines)], strict=True)}
    assert set(blocks) == {s.env for s in all_settings()}
    for setting in all_settings():
        assert (setting.flag or "(env only)") in blocks[setting.env]
    assert "set here: node0.example" in next(line for line in lines if line.startswith("LORAFLOW_RDZV_HOST "))


def test_declared_help_states_the_defaults_the_code_uses():
    from loraflow.options import settings
    from loraflow.security.settings import (
        DEFAULT_MAX_CONCURRENT_STREAMS,
        DEFAULT_METRICS_HOST,
        MAX_CONCURRENT_STREAMS_LIMIT,
    )
    from loraflow.server.redis_health import DEFAULT_LIVENESS_GRACE_S, MAX_LIVENESS_GRACE_S
    from loraflow.storage.storage_layout import StorageLimits
    from loraflow.storage.upload_sweeper import (
        DEFAULT_BLOB_TTL_SECONDS,
        MAX_BLOB_TTL_SECONDS,
        MIN_BLOB_TTL_SECONDS,
    )
    from services.trainer.node_flags import DEFAULT_JOIN_TIMEOUT_S, DEFAULT_RDZV_PORT, MAX_JOIN_TIMEOUT_S
    from services.trainer.training import MAX_NODES

    stated = [(settings.MAX_CONCURRENT_STREAMS, [DEFAULT_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS_LIMIT]),
              (settings.METRICS_HOST, [DEFAULT_METRICS_HOST]),
              (settings.LIVENESS_GRACE, [f"{DEFAULT_LIVENESS_GRACE_S:g}", f"{MAX_LIVENESS_GRACE_S:g}"]),
              (settings.UPLOAD_BLOB_TTL, [f"{v:.0f}" for v in (DEFAULT_BLOB_TTL_SECONDS, MIN_BLOB_TTL_SECONDS,
                                                               MAX_BLOB_TTL_SECONDS)]),
              (settings.MAX_UPLOAD_FILES, [StorageLimits().max_files]),
              (settings.NODE_RANK, [f"0..{MAX_NODES - 1}"]),
              (settings.RDZV_PORT, [DEFAULT_RDZV_PORT]),
              (settings.JOIN_TIMEOUT, [f"{DEFAULT_JOIN_TIMEOUT_S:g}", f"{MAX_JOIN_TIMEOUT_S:g}"])]
    for setting, values in stated:
        for value in values:
            assert str(value) in setting.help, (setting.env, value)
