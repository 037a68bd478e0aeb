"""The inference service's own numeric flags are bounded: a bad value stops it at start with the flag named."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("flag,value,words", [
    ("--num-threads", "100000", "must be in 0..256"),
    ("--num-threads", "-1", "must be in 0..256"),
    ("--max-waiting", "0", "must be in 1..100000"),
    ("--max-waiting", "10**9", "must be an integer"),
    ("--adapter-wait-s", "nan", "must be in 0..3600"),
    ("--adapter-wait-s", "-1", "must be in 0..3600"),
    ("--adapter-cache-bytes", str(2**41), "must be in 0..1099511627776"),
])
def test_out_of_range_flag_refuses_to_start(flag, value, words):
    proc = subprocess.run([sys.executable, "-m", "services.inference", "--listen", "127.0.0.1:0", flag, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"argument {flag}" in proc.stderr and words in proc.stderr
