"""deploy/ checked without a Docker engine: files parse, references resolve, commands and flags exist in the
real service modules, ports match the defaults. The Kubernetes side is the rendered deploy/k8s/base (the pinned
kustomize, tests/deploy/kustomize.py); tests/deploy/test_k8s.py checks the rendered manifests in depth."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from loraflow.cli import app
from loraflow.client import DEFAULT_ADDRESSES
from loraflow.console.up import service_available
from tests.deploy.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
SERVICES = ("trainer", "compiler", "inference")
PORTS = {name: int(addr.rsplit(":", 1)[1]) for name, addr in DEFAULT_ADDRESSES.items()}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s_docs() -> list[dict]:
    return list(render("base"))


def _containers(kind: str = "Deployment"):
    for doc in _k8s_docs():
        if doc["kind"] == kind:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def _dockerfile(service: str) -> str:
    return (DEPLOY / "docker" / f"{service}.Dockerfile").read_text()


def _exec_form(dockerfile: str, instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", dockerfile, re.M)
    assert match, f"no exec-form {instruction}"
    return yaml.safe_load(match.group(1))


def _listen_port(args: list[str]) -> int | None:
    if "--listen" in args:
        return int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
    return None


def _invocations() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(where, service, args) for every `python -m services.X ...` the deploy files run."""
    found = []
    for service in SERVICES:
        text = _dockerfile(service)
        entry, cmd = _exec_form(text, "ENTRYPOINT"), _exec_form(text, "CMD")
        assert entry == ["python", "-m", f"services.{service}"]
        found.append((f"{service}.Dockerfile", service, tuple(cmd)))
    images = {spec.get("image"): spec for spec in _compose()["services"].values()}
    for name, spec in _compose()["services"].items():
        image = spec.get("image", "")
        match = re.fullmatch(r"loraflow-(\w+):latest", image)
        if match:
            found.append((f"compose {name}", match.group(1), tuple(spec["command"])))
    assert images
    for doc, container in _containers():
        match = re.fullmatch(r"loraflow-(\w+):[\w.-]+", container["image"])
        if match:
            found.append((f"k8s {doc['metadata']['name']}", match.group(1), tuple(container["args"])))
    return found


# ------------------------------------------------------------------------------------------------ parsing

def test_every_yaml_parses_and_k8s_objects_are_well_formed():
    compose = _compose()
    assert set(compose["services"]) >= {"redis", "trainer-api", "trainer-worker", "compiler-api", "compiler-worker",
                                        "inference"}
    kinds = set()
    for doc in _k8s_docs():
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        kinds.add(doc["kind"])
    # No Secret: the operator creates them (deploy/k8s/secrets), so an apply never overwrites credentials.
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Job"} <= kinds and "Secret" not in kinds


def test_compose_graph_has_no_missing_references():
    compose = _compose()
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    built_images = {spec["image"] for spec in services.values() if "build" in spec}
    for name, spec in services.items():
        for dependency in spec.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in spec.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name} mounts undeclared volume {source}"
        if "build" in spec:
            context = (COMPOSE.parent / spec["build"]["context"]).resolve()
            assert (context / spec["build"]["dockerfile"]).is_file(), name
        elif spec["image"].startswith("loraflow-"):
            assert spec["image"] in built_images, f"{name} uses {spec['image']} that no service builds"
    # No cycles: a topological order exists.
    remaining = {name: set(spec.get("depends_on") or {}) for name, spec in services.items()}
    while remaining:
        ready = [n for n, deps in remaining.items() if not deps & set(remaining)]
        assert ready, f"dependency cycle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]
    # Every loraflow service gets the settings it needs.
    for name, spec in services.items():
        if spec.get("image", "").startswith("loraflow-"):
            env = spec["environment"]
            assert {"LORAFLOW_REDIS_URL", "LORAFLOW_STORE_URL", "AWS_ENDPOINT_URL"} <= set(env), name
            host = urlsplit(env["LORAFLOW_REDIS_URL"]).hostname
            assert host in services
            s3_host = env["AWS_ENDPOINT_URL"].split("//", 1)[1].split(":", 1)[0]
            assert s3_host in services


def test_dockerfiles_copy_existing_files_and_install_the_right_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for service in SERVICES:
        text = _dockerfile(service)
        for line in re.findall(r"^COPY\s+(?!--from=)(.+)$", text, re.M):  # --from: another stage's files
            sources = line.split()[:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{service}.Dockerfile copies missing {source}"
        assert f"'.[{service}]'" in text
        assert re.search(rf"^{service}\s*=", pyproject, re.M), f"pyproject has no [{service}] extra"
        assert "USER " in text, "containers must not run as root"
    for service in ("trainer", "compiler"):
        assert "torch==2.13.0+cpu" in _dockerfile(service)
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in _dockerfile(service)
    for service in SERVICES:
        # The public base by default; the compose test passes its locally built one.
        assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in _dockerfile(service)
        # Dependencies are installed before the sources are copied, so a code change reuses that layer
        # (in the image's own stage, the last one).
        text = _dockerfile(service)
        final = text[text.rindex("\nFROM "):]
        assert final.index(f"'.[{service}]'") < final.index("COPY loraflow")
    for service in ("compiler", "inference"):
        # The LoraRows kernel comes from a stage of its own, built for a baseline CPU, never -march=native.
        text = _dockerfile(service)
        assert "FROM ${BASE_IMAGE} AS native" in text and "NATIVE_MARCH=x86-64-v2" in text
        assert "COPY --from=native /out/ /opt/loraflow-native/" in text
        assert "ENV LORAFLOW_NATIVE_LIBRARY=/opt/loraflow-native/liblora_rows.so" in text
    # One build context rule for every image: an allow-list, so the venv, models and git never travel.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("**") + 1:][:1] and "!loraflow/**" in ignore and "!services/**" in ignore
    inference = _dockerfile("inference")
    assert "pip install torch" not in inference and "[trainer" not in inference and "[compiler" not in inference
    inference_extra = re.search(r"^inference\s*=\s*\[(.*?)\]", pyproject, re.M | re.S).group(1)
    assert "torch" not in inference_extra


def test_long_running_services_restart_and_the_compose_test_swaps_only_third_party_images():
    compose = _compose()
    one_shots = {dep for spec in compose["services"].values() for dep, cond in (spec.get("depends_on") or {}).items()
                 if cond.get("condition") == "service_completed_successfully"}
    assert one_shots == {"minio-init"}
    for name, spec in compose["services"].items():
        if name not in one_shots:
            assert spec.get("restart") == "unless-stopped", f"{name} has no restart policy"
    override = yaml.safe_load((DEPLOY / "compose-test" / "docker-compose.test.yml").read_text())
    for name, spec in override["services"].items():
        assert name in compose["services"], f"the override adds a service {name}"
        base_image = compose["services"][name]["image"]
        if base_image.startswith("loraflow-"):
            assert set(spec) == {"build"}, f"the override changes {sorted(set(spec) - {'build'})} of {name}"
            assert set(spec["build"]["args"]) <= {"BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_FIND_LINKS"}
        else:
            assert spec["image"].startswith("loraflow-test-"), name
    replaced = {n for n, s in compose["services"].items() if not s["image"].startswith("loraflow-")}
    assert replaced == set(override["services"]) - {n for n, s in compose["services"].items()
                                                    if s["image"].startswith("loraflow-")}


# ------------------------------------------------------------------------------------------------ ports + probes

def test_ports_match_the_defaults_everywhere():
    compose = _compose()
    for name, spec in compose["services"].items():
        match = re.fullmatch(r"loraflow-(\w+):latest", spec.get("image", ""))
        if not match:
            continue
        service, port = match.group(1), PORTS[match.group(1)]
        listen = _listen_port(spec["command"])
        if listen is not None:
            assert listen == port, name
            assert spec["ports"] == [f"{port}:{port}"], name
            assert f"127.0.0.1:{port}" in spec["healthcheck"]["test"], name
        assert f"EXPOSE {port}" in _dockerfile(service)
    for doc, container in _containers():
        match = re.fullmatch(r"loraflow-(\w+):[\w.-]+", container["image"])
        if not match:
            continue
        listen = _listen_port(container["args"])
        if listen is None:
            continue
        assert listen == PORTS[match.group(1)]
        grpc_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
        assert grpc_ports == [listen], doc["metadata"]["name"]
    for doc in _k8s_docs():
        if doc["kind"] == "Service" and doc["metadata"]["name"] in PORTS:
            assert doc["spec"]["ports"][0]["port"] == PORTS[doc["metadata"]["name"]]


def test_k8s_services_select_pods_and_workers_get_time_to_checkpoint():
    """(Probes: tests/deploy/test_k8s.py.) Every loraflow container gets settings and credentials from the
    environment, and a worker gets time to checkpoint or release its job."""
    apis = 0
    for doc, container in _containers():
        if not container["image"].startswith("loraflow-"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert {"configMapRef", "secretRef"} <= {k for ref in container.get("envFrom", []) for k in ref}
        if "--listen" not in container["args"]:
            assert container["args"][0] == "worker"
            assert pod["terminationGracePeriodSeconds"] >= 120, doc["metadata"]["name"]
            continue
        apis += 1
    assert apis == 3
    # Each Service selects the pods of an existing Deployment and targets a named port they expose.
    deployments = [d for d in _k8s_docs() if d["kind"] == "Deployment"]
    for svc in (d for d in _k8s_docs() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        targets = [d for d in deployments + [d for d in _k8s_docs() if d["kind"] == "StatefulSet"]
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {svc['metadata']['name']} selects nothing"
        names = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names


def test_health_command_lines_parse_in_the_real_cli():
    """Every `loraflow ...` probe line is a valid CLI call: against a closed port it fails with UNAVAILABLE
    (exit 1), not with a usage error (exit 2)."""
    lines = [spec["healthcheck"]["test"][1:] for spec in _compose()["services"].values()
             if spec.get("healthcheck") and spec["healthcheck"]["test"][1] == "loraflow"]
    for _doc, container in _containers():
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command and command[0] == "loraflow":
                lines.append(command)
    assert len(lines) >= 3
    runner = CliRunner()
    for line in lines:
        args = list(line[1:])
        for i, arg in enumerate(args):  # point every address at a port where nothing listens
            if re.fullmatch(r"127\.0\.0\.1:\d+", arg):
                args[i] = "127.0.0.1:1"
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (line, result.output)
        assert "UNAVAILABLE" in result.stdout, (line, result.stdout)


# ------------------------------------------------------------------------------------------------ commands

@cache
def _help(service: str, mode: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"services.{service}", mode, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"python -m services.{service} {mode} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_command_and_flag_exists(service):
    if not service_available(service):
        pytest.skip(f"services.{service}.__main__ is not written yet")
    invocations = [(where, args) for where, svc, args in _invocations() if svc == service]
    assert invocations
    for where, args in invocations:
        mode = args[0]
        assert mode in ("all", "api", "worker"), (where, args)
        text = _help(service, mode)
        for flag in (a for a in args if a.startswith("--")):
            assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", text), \
                f"{where}: `python -m services.{service} {shlex.join(args)}` uses {flag}, unknown to the module"


# ------------------------------------------------------------------------------------------------ redis

def _redis_flags(args: list[str]) -> dict[str, str]:
    return {args[i].lstrip("-"): args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}


def test_every_redis_keeps_an_append_only_file_on_a_volume_and_requires_a_password():
    compose = _compose()
    redis_spec = compose["services"]["redis"]
    flags = _redis_flags(redis_spec["command"][1:])
    assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec"
    assert flags["requirepass"]
    assert any(v.split(":", 1) == ["redis-data", "/data"] for v in redis_spec["volumes"])
    assert redis_spec["environment"]["REDISCLI_AUTH"] == flags["requirepass"]  # the healthcheck authenticates
    for name, spec in compose["services"].items():
        if spec.get("image", "").startswith("loraflow-"):
            assert urlsplit(spec["environment"]["LORAFLOW_REDIS_URL"]).password == flags["requirepass"], name

    # The Kubernetes Redis (AOF on a PVC, password from the Secret): tests/deploy/test_k8s.py.
    for doc, container in _containers():
        if container["image"].startswith("loraflow-"):
            refs = [s.get("secretRef", {}).get("name") for s in container["envFrom"]]
            assert "loraflow-redis" in refs, doc["metadata"]["name"]


def test_workers_have_a_readiness_signal_their_probe_reads():
    compose = _compose()
    for name in ("trainer-worker", "compiler-worker"):
        spec = compose["services"][name]
        ready_file = spec["command"][spec["command"].index("--ready-file") + 1]
        assert spec["healthcheck"]["test"] == ["CMD", "test", "-f", ready_file], name
    # Kubernetes reads /readyz and /healthz on the metrics port instead: tests/deploy/test_k8s.py.


def _serves_grpc_beyond_loopback(args: tuple[str, ...]) -> bool:
    from loraflow.server.grpc_server import is_loopback, parse_listen

    if args and args[0] == "worker":
        return False
    return "--listen" in args and not is_loopback(parse_listen(args[args.index("--listen") + 1])[0])


def test_every_api_beyond_loopback_gets_a_tokens_file_from_a_secret_and_none_opts_out():
    compose = _compose()
    secrets = compose.get("secrets") or {}
    checked = 0
    for name, spec in compose["services"].items():
        args = tuple(spec.get("command") or ())
        if not spec.get("image", "").startswith("loraflow-"):
            continue
        assert "--allow-unauthenticated" not in args, name
        if not _serves_grpc_beyond_loopback(args):
            assert "LORAFLOW_AUTH_TOKENS_FILE" not in spec["environment"], f"{name} serves no gRPC, mounts no tokens"
            continue
        path = spec["environment"].get("LORAFLOW_AUTH_TOKENS_FILE", "")
        assert path.startswith("/run/secrets/"), f"compose {name} listens beyond loopback without tokens"
        secret = path.removeprefix("/run/secrets/")
        assert secret in (spec.get("secrets") or []) and secret in secrets, name
        checked += 1
    assert checked == 3
    checked = 0
    for doc, container in _containers():
        args = tuple(container.get("args") or ())
        if not container["image"].startswith("loraflow-"):
            continue
        assert "--allow-unauthenticated" not in args, doc["metadata"]["name"]
        if not _serves_grpc_beyond_loopback(args):
            continue
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        path = Path(env.get("LORAFLOW_AUTH_TOKENS_FILE") or "/missing")
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes") or []}
        mounted = [name for name, where in mounts.items() if Path(where) == path.parent]
        assert mounted, f"k8s {doc['metadata']['name']}: {path} is not on a mounted volume"
        secret = volumes[mounted[0]]["secret"]
        assert secret["secretName"] == "loraflow-auth" and secret["defaultMode"] & 0o022 == 0  # never writable
        # uid 10001 reads it through its group; the Secret itself is created by the operator, not applied here.
        assert doc["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
        checked += 1
    assert checked == 3
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"] == "loraflow-auth" for d in _k8s_docs())


# ------------------------------------------------------------------------------------------------ gateway

GATEWAY = K8S / "gateway"


def _gateway_docs() -> dict[tuple[str, str], dict]:
    """The gateway example as kustomize renders it (base + the pool, the picker and their patch)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in render("gateway")}


def test_gateway_example_inferencepool_and_endpoint_picker_use_the_metrics_we_export():
    from prometheus_client import REGISTRY, generate_latest

    from services.inference import metrics
    from services.inference.__main__ import parse_args

    kustomization = yaml.safe_load((GATEWAY / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "loraflow"
    for resource in kustomization["resources"]:
        target = GATEWAY / resource
        assert (target / "kustomization.yaml").is_file() if target.is_dir() else target.is_file(), resource
    # The example is opt-in: the default apply needs no Gateway API CRDs.
    assert "gateway" not in str(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    docs = _gateway_docs()
    for (kind, name), doc in docs.items():
        assert doc["apiVersion"] and (kind == "Namespace" or doc["metadata"]["namespace"] == "loraflow"), (kind, name)

    # InferencePool, as the v1 CRD (inference.networking.k8s.io/v1) defines it.
    pool = docs[("InferencePool", "loraflow")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "endpointPickerRef"} and set(spec) >= {"selector", "targetPorts",
                                                                                           "endpointPickerRef"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert len(spec["targetPorts"]) == 1 and set(spec["targetPorts"][0]) == {"number"}
    target_port = spec["targetPorts"][0]["number"]
    assert isinstance(target_port, int) and 1 <= target_port <= 65535
    picker = spec["endpointPickerRef"]
    assert set(picker) <= {"group", "kind", "name", "port", "failureMode"} and picker.get("kind", "Service") == "Service"
    assert picker["failureMode"] in ("FailOpen", "FailClose") and set(picker["port"]) == {"number"}

    # The pool selects the inference pods, on the HTTP port the patch opens with the real flag.
    deployment = docs[("Deployment", "inference")]
    pod = deployment["spec"]["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    args = parse_args(container["args"])
    assert int(args.http_listen.rsplit(":", 1)[1]) == target_port
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == target_port

    # The picker's Service and Deployment: the port the pool names, the pool it watches.
    service = docs[("Service", picker["name"])]
    assert service["spec"]["ports"][0]["port"] == picker["port"]["number"]
    epp = docs[("Deployment", picker["name"])]
    epp_container = epp["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["containerPort"] for p in epp_container["ports"]}["grpc"] == picker["port"]["number"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in epp_container["args"])
    assert flags["pool-name"] == pool["metadata"]["name"] and flags["pool-namespace"] == "loraflow"
    assert epp["spec"]["template"]["spec"]["serviceAccountName"] in {n for k, n in docs if k == "ServiceAccount"}

    # It scrapes the inference pods' --metrics-port, for names our /metrics really exports.
    assert int(flags["model-server-metrics-port"]) == args.metrics_port
    assert flags["total-queued-requests-metric"] == metrics.NUM_REQUESTS_WAITING
    assert flags["kv-cache-usage-percentage-metric"] == metrics.KV_CACHE_USAGE
    assert flags["lora-info-metric"] == metrics.LORA_REQUESTS_INFO
    exported = generate_latest(REGISTRY).decode()
    for name in (metrics.NUM_REQUESTS_WAITING, metrics.KV_CACHE_USAGE, metrics.LORA_REQUESTS_INFO):
        assert f"# TYPE {name} gauge" in exported, name

    # The scheduling profile only names plugins it declares, and scores LoRA affinity.
    config_map = docs[("ConfigMap", "loraflow-epp")]
    mounted = {v["name"]: v["configMap"]["name"] for v in epp["spec"]["template"]["spec"]["volumes"]}
    assert config_map["metadata"]["name"] in mounted.values()
    config_file = Path(flags["config-file"])
    plugins = yaml.safe_load(config_map["data"][config_file.name])
    declared = {p.get("name", p["type"]) for p in plugins["plugins"]}
    assert "lora-affinity-scorer" in declared
    for profile in plugins["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared
