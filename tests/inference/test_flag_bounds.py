"""The inference service's own numeric flags are bounded: a bad value stops it at start with the flag named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.inference.__main__ import parse_args


@pytest.mark.parametrize("flag,value,words", [
    ("--num-threads", "100000", "must be in 0..256"),
    ("--num-threads", "-1", "must be in 0..256"),
    ("--max-waiting", "0", "must be in 1..100000"),
    ("--max-waiting", "10**9", "must be an integer"),
    ("--adapter-wait-s", "nan", "must be in 0..3600"),
    ("--adapter-wait-s", "-1", "must be in 0..3600"),
    ("--adapter-cache-bytes", str(2**41), "must be in 0..1099511627776"),
    ("--adapter-slots", "0", "must be in 1..4096"),
    ("--adapter-slots", "lots", "must be an integer"),
])
def test_out_of_range_flag_refuses_to_start(flag, value, words):
    proc = subprocess.run([sys.executable, "-m", "services.inference", "--listen", "127.0.0.1:0", flag, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"argument {flag}" in proc.stderr and words in proc.stderr


def test_the_host_cache_bytes_come_from_the_flag_else_the_environment(monkeypatch, capsys):
    from services.inference.__main__ import ADAPTER_CACHE_ENV
    from services.inference.adapter_cache import DEFAULT_ADAPTER_CACHE_BYTES

    monkeypatch.delenv(ADAPTER_CACHE_ENV, raising=False)
    assert parse_args([]).adapter_cache_bytes == DEFAULT_ADAPTER_CACHE_BYTES
    monkeypatch.setenv(ADAPTER_CACHE_ENV, "4096")
    assert parse_args([]).adapter_cache_bytes == 4096
    assert parse_args(["--adapter-cache-bytes", "0"]).adapter_cache_bytes == 0
    monkeypatch.setenv(ADAPTER_CACHE_ENV, "-5")
    with pytest.raises(SystemExit):
        parse_args([])
    assert ADAPTER_CACHE_ENV in capsys.readouterr().err


def test_the_resident_adapter_slots_come_from_the_flag_else_the_environment(monkeypatch):
    from loraflow.options.settings import ADAPTER_SLOTS

    monkeypatch.delenv(ADAPTER_SLOTS.env, raising=False)
    assert parse_args([]).adapter_slots == "auto"
    monkeypatch.setenv(ADAPTER_SLOTS.env, "16")
    assert parse_args([]).adapter_slots == 16
    assert parse_args(["--adapter-slots", "auto"]).adapter_slots == "auto"
