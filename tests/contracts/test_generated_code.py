"""The committed code in loraflow/v1 must be exactly what `make proto` generates from protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"


def test_committed_generated_code_is_fresh(tmp_path):
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "loraflow" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos],
        check=True,
        cwd=PROTO_DIR,
    )
    fresh = tmp_path / "loraflow" / "v1"
    committed = ROOT / "loraflow" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert len(generated) == 3 * len(protos)
    stale = [name for name in generated if not filecmp.cmp(fresh / name, committed / name, shallow=False)]
    assert not stale, f"stale generated code, run `make proto`: {stale}"


def test_every_proto_element_is_commented():
    """buf style: a comment on every service, rpc, message, enum, enum value and field."""
    uncommented = []
    for proto in sorted((PROTO_DIR / "loraflow" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith(("//", "}", "syntax", "package", "import", "option", "oneof")):
                continue
            prev = lines[i - 1].strip() if i else ""
            if not prev.startswith("//"):
                uncommented.append(f"{proto.name}:{i + 1}: {s}")
    assert not uncommented, "uncommented proto elements:\n" + "\n".join(uncommented)


def test_enums_start_with_unspecified_zero():
    from loraflow.v1 import inference_pb2, jobs_pb2

    for enum in (jobs_pb2.JobState, jobs_pb2.JobKind, inference_pb2.FinishReason):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED"), zero
