"""The compiler asks PyTorch for transparent huge pages before torch is imported, and the ask takes effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.compiler.huge_pages import ENV

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != ENV}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


ASK = "from services.compiler.huge_pages import prefer_huge_pages as p; import os; print(p(), os.environ.get({env!r}))"


def test_huge_pages_are_asked_for_before_torch_and_an_operator_setting_wins():
    assert _python(ASK.format(env=ENV)) == "True 1"
    assert _python(ASK.format(env=ENV), **{ENV: "0"}) == "True 0"
    assert _python("import torch; " + ASK.format(env=ENV)) == "False None"  # too late: not pretended


def test_the_compiler_entry_point_imports_no_torch_before_asking():
    # services/compiler/__main__.py calls prefer_huge_pages() after its imports: they must not pull in torch.
    assert _python("import sys, services.compiler.__main__; print('torch' in sys.modules)") == "False"


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are off on this host")
def test_a_large_torch_buffer_gets_huge_pages_when_asked():
    code = ("from services.compiler.huge_pages import prefer_huge_pages; prefer_huge_pages(); import torch; "
            "t = torch.empty(64 << 20, dtype=torch.uint8); t.fill_(1); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))")
    assert int(_python(code)) >= 32 << 10  # KiB: at least half the 64 MiB buffer in huge pages
