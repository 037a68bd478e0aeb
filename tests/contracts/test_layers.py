"""One-way layers: the import-linter contracts in pyproject.toml hold, and no module imports itself round a cycle.

Each contract is also shown to break on a copy of the tree with one import added, so a contract that
cannot fail (a typo in a module name, a wildcard that matches nothing) fails here instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = {c["id"]: c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
             ["importlinter"]["contracts"]}
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def _lint(cwd: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def _broken(output: str) -> set[str]:
    flat = " ".join(output.split())  # long contract names wrap
    return {cid for cid, name in CONTRACTS.items() if re.search(re.escape(name) + r" BROKEN", flat)}


def _cycles(cwd: Path) -> list[list[str]]:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "contracts" / "import_graph.py")], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout)


def test_the_layer_contracts_are_kept():
    assert set(CONTRACTS) == {"services-independent", "core-below-services", "user-facing-on-top",
                              "services-below-user-facing"}
    code, output = _lint(ROOT)
    assert code == 0, output
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in output, output


def test_no_import_cycles():
    assert _cycles(ROOT) == []


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The two packages' Python files and pyproject.toml, to add an import to."""
    dest = tmp_path_factory.mktemp("tree")
    for package in ("loraflow", "services"):
        shutil.copytree(ROOT / package, dest / package, ignore=lambda d, names: [
            n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir()) or n == "__pycache__"])
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _with_import(tree: Path, module_file: str, line: str):
    path = tree / module_file
    original = path.read_text() if path.exists() else None
    path.write_text((original or "") + f"\n{line}\n")
    return path, original


def _restore(path: Path, original: str | None) -> None:
    if original is None:
        path.unlink()
    else:
        path.write_text(original)


@pytest.mark.parametrize(("module_file", "line", "contract"), [
    ("services/compiler/worker.py", "import services.inference.engine", "services-independent"),
    ("services/trainer/server.py", "from services.compiler import options", "services-independent"),
    ("loraflow/options/names.py", "import services.trainer.worker", "core-below-services"),
    ("loraflow/artifact/step_driver.py", "from services.inference import runtime", "core-below-services"),
    ("loraflow/storage/store.py", "import loraflow.client", "user-facing-on-top"),
    ("loraflow/new_unplaced_module.py", "import loraflow.errors", "user-facing-on-top"),  # exhaustive layers
    ("services/inference/engine.py", "import loraflow.cli", "services-below-user-facing"),
])
def test_an_import_against_the_layers_breaks_its_contract(tree_copy, module_file, line, contract):
    code, output = _lint(tree_copy)
    assert code == 0, output  # the copy itself is clean
    path, original = _with_import(tree_copy, module_file, line)
    try:
        code, output = _lint(tree_copy)
    finally:
        _restore(path, original)
    assert code != 0, output
    assert contract in _broken(output), output  # (a core import of a service also joins two services)


@pytest.mark.parametrize(("imports", "cycle"), [
    # the three cycles there were before the shared parts moved down, each closed again by the imports added
    ([("loraflow/security/auth.py", "from loraflow.server.grpc_server import status_for")],
     ["loraflow.server.grpc_server", "loraflow.security.auth"]),
    ([("services/inference/runtime.py", "from services.inference.ai100_runtime import Ai100Runtime"),
      ("services/inference/ai100_runtime.py", "from services.inference.runtime import OrtRuntime")],
     ["services.inference.ai100_runtime", "services.inference.runtime"]),
    ([("services/trainer/distributed_job.py", "from services.trainer.worker import TrainingHandler")],
     ["services.trainer.distributed_job", "services.trainer.worker"]),
])
def test_an_import_cycle_is_found(tree_copy, imports, cycle):
    assert not any(set(cycle) <= set(component) for component in _cycles(tree_copy))
    added = [_with_import(tree_copy, module_file, line) for module_file, line in imports]
    try:
        found = _cycles(tree_copy)
    finally:
        for path, original in reversed(added):
            _restore(path, original)
    assert any(set(cycle) <= set(component) for component in found), found


def test_what_moved_down_imports_no_torch_and_no_service():
    """The scheduler, the AI 100 stepper and the sampling fields serve the torch-free inference image too."""
    probe = ("import sys\n"
             "import loraflow.artifact.ai100_stepper, loraflow.artifact.scheduler, loraflow.options.sampling_params\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'services')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout
