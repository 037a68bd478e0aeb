"""deploy/k8s as a cluster would get it: every kustomization rendered by the pinned kustomize, every resource
validated with kubernetes-validate --strict, and the properties that make it run asserted on the output:
locked-down containers, probes on /healthz and /readyz, no Secret an apply could overwrite, pinned images
pulled IfNotPresent, PDBs and NetworkPolicies that select the right pods, KEDA triggers on the real queues,
and the Indexed Job of the distributed-training pool."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from loraflow.jobs.queue import GROUP, JobQueue
from tests.deploy.kustomize import (
    K8S,
    KUSTOMIZATIONS,
    ROOT,
    by_kind,
    pod_specs,
    render,
    selects,
    validate,
)

VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
NAMESPACE = "loraflow"
SERVICES = ("trainer", "compiler", "inference")


def _containers(docs):
    for workload, template in pod_specs(docs):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, template, container


def _is_loraflow_image(image: str) -> bool:
    return image.split(":", 1)[0] in {f"loraflow-{s}" for s in SERVICES}


def _service_of(container) -> str:
    return container["image"].split(":", 1)[0].removeprefix("loraflow-")


def _parse_service_args(service: str, args: list[str]):
    """The service's real argument parser on the container's args (unknown flags exit 2)."""
    if service == "inference":
        from services.inference.__main__ import parse_args

        return parse_args(args)
    from loraflow.jobs.queue_service import parse_args

    spec = __import__(f"services.{service}.__main__", fromlist=["SPEC"]).SPEC
    return parse_args(spec, args)


def _env(container, configmaps: dict[str, dict]) -> dict[str, str]:
    """The container's literal environment: envFrom ConfigMaps, then env values (Secrets stay out)."""
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    return env


def _writable_dirs(template, container) -> dict[str, dict]:
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])
            if not m.get("readOnly") and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in
                                          volumes[m["name"]])}


def _quantity(text: str | int) -> float:
    """A Kubernetes quantity: CPU in cores, memory in bytes."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ------------------------------------------------------------------------------------------------ render + schema

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_every_resource_validates_strictly(kustomization):
    docs = render(kustomization)
    assert validate(docs) == []
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{kustomization}: {doc['kind']} {doc['metadata']}"


def test_strict_validation_rejects_what_a_cluster_would():
    """The validator is not a rubber stamp: an unknown field and a wrong type in a rendered Deployment fail."""
    deployment = dict(by_kind(render("base"), "Deployment")["trainer-worker"])
    assert validate([deployment]) == []
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy "] = "IfNotPresent"
    wrong = yaml.safe_load(yaml.safe_dump(deployment))
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9100"
    assert len(validate([typo])) == 1 and len(validate([wrong])) == 1


def test_base_lists_every_file_beside_it():
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


# ------------------------------------------------------------------------------------------------ secrets

def _secret_refs(docs) -> set[tuple[str, str | None]]:
    """(secret, key) every workload and TriggerAuthentication reads; key None = the whole Secret."""
    refs = set()
    for _workload, template, container in _containers(docs):
        refs |= {(s["secretRef"]["name"], None) for s in container.get("envFrom", []) if "secretRef" in s}
        refs |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                 for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        refs |= {(v["secret"]["secretName"], None) for v in template["spec"].get("volumes", []) if "secret" in v}
    for auth in by_kind(docs, "TriggerAuthentication").values():
        refs |= {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    return refs


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_applied_kustomization_carries_a_secret(kustomization):
    """An apply never overwrites real credentials: no Secret resource and no generator in what is applied."""
    assert not [d for d in render(kustomization) if d["kind"] == "Secret"]
    for path in (K8S / kustomization).rglob("kustomization.yaml"):
        text = yaml.safe_load(path.read_text())
        assert "secretGenerator" not in text, path
    assert _secret_refs(render(kustomization)), kustomization


def test_secrets_kustomization_generates_every_referenced_secret_from_uncommitted_files(tmp_path):
    source = K8S / "secrets"
    files = ("s3.env", "redis.env", "tokens")
    ignored = subprocess.run(["git", "check-ignore", *[str(source / f) for f in files]], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.returncode == 0 and len(ignored.stdout.split()) == 3, "credential files must be git-ignored"
    work = tmp_path / "secrets"
    shutil.copytree(source, work)
    # The operator's files, written from the committed examples with fresh values.
    password, access, key = secrets.token_hex(24), secrets.token_hex(10), secrets.token_hex(20)
    examples = {}
    for name in ("s3.env", "redis.env"):
        examples[name] = dict(line.split("=", 1) for line in (source / f"{name}.example").read_text().split())
    assert set(examples["s3.env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    example_url = urlsplit(examples["redis.env"]["LORAFLOW_REDIS_URL"])
    assert example_url.password == examples["redis.env"]["REDIS_PASSWORD"] and example_url.hostname == "redis"
    (work / "s3.env").write_text(f"AWS_ACCESS_KEY_ID={access}\nAWS_SECRET_ACCESS_KEY={key}\n")
    (work / "redis.env").write_text(f"REDIS_PASSWORD={password}\n"
                                    f"LORAFLOW_REDIS_URL=redis://:{password}@redis:6379/0\n")
    (work / "tokens").write_text(f"ops:{secrets.token_hex(16)}\n")
    docs = render(work)
    assert validate(docs) == []
    generated = by_kind(docs, "Secret")
    assert set(generated) == {"loraflow-s3", "loraflow-redis", "loraflow-auth"}
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in generated.values())
    # Every Secret and key any applied manifest reads is generated here, under that exact name.
    for kustomization in KUSTOMIZATIONS:
        for name, key in _secret_refs(render(kustomization)):
            assert name in generated, (kustomization, name)
            assert key is None or key in generated[name]["data"], (kustomization, name, key)
    # The Redis Service the URL names is the one base creates, on its port.
    redis_service = by_kind(render("base"), "Service")["redis"]
    assert redis_service["spec"]["ports"][0]["port"] == 6379


# ------------------------------------------------------------------------------------------------ containers

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_runs_non_root_read_only_without_capabilities(kustomization):
    docs = render(kustomization)
    configmaps = by_kind(render("base"), "ConfigMap")
    checked = 0
    for workload, template, container in _containers(docs):
        where = f"{kustomization}: {workload['metadata']['name']}/{container['name']}"
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        for field in ("runAsUser", "runAsGroup"):
            assert isinstance(pod.get(field), int) and pod[field] > 0, (where, field)
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities") == {"drop": ["ALL"]}, where
        assert not sc.get("privileged"), where
        assert "runAsUser" not in sc or sc["runAsUser"] > 0, where
        image = container["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (where, image)
        assert container.get("imagePullPolicy") == "IfNotPresent", where
        if _is_loraflow_image(image):
            # A read-only root: /tmp, MPLCONFIGDIR and the library caches are on writable volumes.
            writable = _writable_dirs(template, container)
            assert "/tmp" in writable and "emptyDir" in writable["/tmp"], where
            env = _env(container, configmaps)
            assert env["TMPDIR"] == "/tmp"
            for var in ("MPLCONFIGDIR", "HF_HOME", "XDG_CACHE_HOME", "LORAFLOW_CACHE_DIR"):
                assert any(env[var] == d or env[var].startswith(d + "/") for d in writable), (where, var)
            assert any(env["MPLCONFIGDIR"].startswith(d) and "emptyDir" in v for d, v in writable.items())
        checked += 1
    assert checked >= {"base": 7, "training-distributed": 1}.get(kustomization, 1)


def test_loraflow_pods_run_as_the_images_numeric_user():
    docker = ROOT / "deploy" / "docker"
    users = {}
    for service in SERVICES:
        text = (docker / f"{service}.Dockerfile").read_text()
        match = re.search(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
        assert match, f"{service}.Dockerfile needs a numeric USER uid:gid (runAsNonRoot cannot check a name)"
        users[service] = (int(match.group(1)), int(match.group(2)))
        assert f"--uid {match.group(1)}" in text and f"--gid {match.group(2)}" in text
    for kustomization in KUSTOMIZATIONS:
        for workload, template, container in _containers(render(kustomization)):
            if _is_loraflow_image(container["image"]):
                pod = template["spec"]["securityContext"]
                assert (pod["runAsUser"], pod["runAsGroup"]) == users[_service_of(container)], workload["metadata"]


def test_images_are_pinned_to_the_project_version_and_gpu_inference_gets_the_onnxruntime_gpu_build():
    for kustomization in ("base", "overlays/production", "training-distributed"):
        for _w, _t, container in _containers(render(kustomization)):
            if _is_loraflow_image(container["image"]):
                assert container["image"] == f"loraflow-{_service_of(container)}:{VERSION}", container["image"]
    gpu = by_kind(render("overlays/gpu"), "Deployment")
    (inference,) = gpu["inference"]["spec"]["template"]["spec"]["containers"]
    base_image = by_kind(render("base"), "Deployment")["inference"]["spec"]["template"]["spec"]["containers"][0]
    assert inference["image"] == f"loraflow-inference:{VERSION}-cuda" != base_image["image"]
    assert int(inference["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "nvidia.com/gpu" not in str(base_image["resources"])
    tolerations = gpu["inference"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # The tag is the build with the onnxruntime-gpu build argument the Dockerfile declares.
    dockerfile = (ROOT / "deploy" / "docker" / "inference.Dockerfile").read_text()
    assert re.search(r"^ARG ONNXRUNTIME=onnxruntime$", dockerfile, re.M)
    overlay = (K8S / "overlays" / "gpu" / "kustomization.yaml").read_text()
    build = re.search(r'--build-arg ONNXRUNTIME="(onnxruntime-gpu[^"]*)"\s+-t\s+(\S+)', overlay)
    assert build and build.group(2) == inference["image"]
    assert re.fullmatch(r"onnxruntime-gpu(\[[\w,]+\])?==[\d.]+", build.group(1))
    # Everything else is the same as base.
    others = {n: d for n, d in gpu.items() if n != "inference"}
    assert others == {n: d for n, d in by_kind(render("base"), "Deployment").items() if n != "inference"}


# ------------------------------------------------------------------------------------------------ probes + flags

@pytest.mark.parametrize("kustomization", ("base", "overlays/production", "overlays/gpu", "training-distributed"))
def test_loraflow_probes_are_healthz_and_readyz_on_the_metrics_port_the_flags_open(kustomization):
    seen = set()
    for workload, _template, container in _containers(render(kustomization)):
        if not _is_loraflow_image(container["image"]):
            continue
        service = _service_of(container)
        args = _parse_service_args(service, container["args"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert args.metrics_port == ports["metrics"], workload["metadata"]["name"]
        assert args.metrics_host == "0.0.0.0"  # the kubelet probes the pod IP
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, (workload["metadata"], probe)
        if "startupProbe" in container:
            assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        if args.mode != "worker":
            assert int(args.listen.rsplit(":", 1)[1]) == ports["grpc"]
        else:
            assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
        if service == "inference":
            # Replicas converge on one desired state: the same deployment name in every pod.
            env = {e["name"]: e.get("value") for e in container["env"]}
            from loraflow.options.names import validate_name

            assert validate_name("deployment", env["LORAFLOW_DEPLOYMENT"]) == "inference"
        seen.add((service, args.mode))
    expected = {("trainer", "worker")} if kustomization == "training-distributed" else \
        {(s, m) for s in ("trainer", "compiler") for m in ("api", "worker")} | {("inference", "all")}
    assert seen == expected


def test_inference_reads_its_deployment_from_the_environment(monkeypatch):
    """LORAFLOW_DEPLOYMENT (the manifests set no --deployment flag) reaches the parsed args."""
    from services.inference.__main__ import parse_args

    (container,) = by_kind(render("base"), "Deployment")["inference"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    monkeypatch.setenv("LORAFLOW_DEPLOYMENT", env["LORAFLOW_DEPLOYMENT"])
    assert parse_args(container["args"]).deployment == "inference"
    monkeypatch.delenv("LORAFLOW_DEPLOYMENT")
    assert not parse_args(container["args"]).deployment


# ------------------------------------------------------------------------------------------------ sizes

def _requests(docs) -> tuple[float, float]:
    cpu = memory = 0.0
    for workload, _template, container in _containers(docs):
        if workload["kind"] == "Job":
            continue
        replicas = workload["spec"].get("replicas", 1)
        cpu += replicas * _quantity(container["resources"]["requests"]["cpu"])
        memory += replicas * _quantity(container["resources"]["requests"]["memory"])
    return cpu, memory


def test_base_fits_a_small_cluster_and_production_is_larger():
    cpu, memory = _requests(render("base"))
    assert cpu <= 4 and memory <= 10 * 2**30, (cpu, memory / 2**30)
    prod_cpu, prod_memory = _requests(render("overlays/production"))
    assert prod_cpu > 2 * cpu and prod_memory > 2 * memory
    for _w, _t, container in _containers(render("overlays/production")):
        assert container["resources"]["limits"]["memory"]
    deployments = by_kind(render("overlays/production"), "Deployment")
    for name in ("trainer-api", "compiler-api", "inference"):
        assert deployments[name]["spec"]["replicas"] >= 2, name
    for name in ("trainer-worker", "compiler-worker"):  # KEDA's HPA owns the count: an apply must not reset it
        assert "replicas" not in deployments[name]["spec"], name


# ------------------------------------------------------------------------------------------------ PDBs

@pytest.mark.parametrize("kustomization", ("base", "overlays/production", "overlays/gpu"))
def test_every_loraflow_deployment_has_one_drainable_pdb(kustomization):
    docs = render(kustomization)
    pdbs = by_kind(docs, "PodDisruptionBudget")
    workloads = [(w, t) for w, t in pod_specs(docs) if w["kind"] == "Deployment"
                 and any(_is_loraflow_image(c["image"]) for c in t["spec"]["containers"])]
    assert len(workloads) == 5
    for workload, template in workloads:
        matching = [p for p in pdbs.values() if selects(p["spec"]["selector"], template["metadata"]["labels"])]
        assert len(matching) == 1, workload["metadata"]["name"]
        assert matching[0]["spec"].get("maxUnavailable", 0) >= 1, "a single replica must stay drainable"
        assert selects(workload["spec"]["selector"], template["metadata"]["labels"])
    for pdb in pdbs.values():
        assert any(selects(pdb["spec"]["selector"], t["metadata"]["labels"]) for _w, t in pod_specs(docs)), pdb


# ------------------------------------------------------------------------------------------------ network policies

def _resolve_port(port, template) -> int | None:
    if isinstance(port, int):
        return port
    for container in template["spec"]["containers"]:
        for p in container.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
    return None


def _admits(policies, target, port: int, source_labels: dict, source_namespace: dict) -> bool:
    """Whether ingress from a pod (labels, its namespace's labels) to ``target``'s ``port`` is allowed.
    Kubernetes semantics: no policy selecting the pod = open; otherwise the union of their rules."""
    labels = target["metadata"]["labels"]
    chosen = [p for p in policies if selects(p["spec"]["podSelector"], labels)
              and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not chosen:
        return True
    same_namespace = source_namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    for policy in chosen:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and port not in {_resolve_port(p["port"], target) for p in ports}:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    ok = selects(peer["namespaceSelector"], source_namespace)
                else:
                    ok = same_namespace
                if ok and selects(peer.get("podSelector", {}), source_labels):
                    return True
    return False


HERE = {"kubernetes.io/metadata.name": NAMESPACE}
ELSEWHERE = {"kubernetes.io/metadata.name": "apps"}


def _templates(docs) -> dict[str, dict]:
    return {w["metadata"]["name"]: t for w, t in pod_specs(docs)}


@pytest.mark.parametrize("kustomization", ("base", "overlays/production", "overlays/gpu"))
def test_network_policies_let_only_clients_reach_the_apis_and_only_loraflow_reach_redis_and_the_store(kustomization):
    docs = render(kustomization)
    policies = list(by_kind(docs, "NetworkPolicy").values())
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "a default-deny ingress policy"
    pods = _templates(docs)
    client = {"loraflow.io/client": "true"}
    scraper = {"loraflow.io/metrics-scraper": "true"}
    stranger = {"app": "something-else"}
    for name, port in (("trainer-api", 50051), ("compiler-api", 50052), ("inference", 50053)):
        target = pods[name]
        assert _admits(policies, target, port, client, ELSEWHERE) and _admits(policies, target, port, client, HERE)
        for labels, namespace in ((stranger, HERE), (stranger, ELSEWHERE), (scraper, ELSEWHERE),
                                  (pods["trainer-worker"]["metadata"]["labels"], HERE)):
            assert not _admits(policies, target, port, labels, namespace), (name, labels)
    for name, port in (("redis", 6379), ("minio", 9000)):
        target = pods[name]
        for source, template in pods.items():
            if template["metadata"]["labels"].get("app.kubernetes.io/part-of") == "loraflow":
                assert _admits(policies, target, port, template["metadata"]["labels"], HERE), (source, name)
        for labels, namespace in ((stranger, HERE), (client, HERE), (client, ELSEWHERE),
                                  ({"app.kubernetes.io/part-of": "loraflow"}, ELSEWHERE)):
            assert not _admits(policies, target, port, labels, namespace), (name, labels, namespace)
    # Metrics (unauthenticated) only to scrapers; the workers expose nothing else.
    for name in ("trainer-api", "trainer-worker", "compiler-api", "compiler-worker", "inference"):
        assert _admits(policies, pods[name], 9100, scraper, ELSEWHERE), name
        assert not _admits(policies, pods[name], 9100, client, ELSEWHERE), name
        assert not _admits(policies, pods[name], 9100, stranger, HERE), name
    for name in ("trainer-worker", "compiler-worker"):
        assert not _admits(policies, pods[name], 50051, client, HERE)
    keda = {"app.kubernetes.io/name": "keda-operator"}
    keda_ns = {"kubernetes.io/metadata.name": "keda"}
    assert _admits(policies, pods["redis"], 6379, keda, keda_ns) == (kustomization == "overlays/production")
    assert not _admits(policies, pods["minio"], 9000, keda, keda_ns)


def test_network_policies_of_the_gateway_example_open_http_to_clients_and_metrics_to_the_picker():
    docs = render("gateway")
    policies = list(by_kind(docs, "NetworkPolicy").values())
    pods = _templates(docs)
    client = {"loraflow.io/client": "true"}
    epp = pods["loraflow-epp"]["metadata"]["labels"]
    pool = by_kind(docs, "InferencePool")["loraflow"]
    http = pool["spec"]["targetPorts"][0]["number"]
    assert _admits(policies, pods["inference"], http, client, ELSEWHERE)
    assert _admits(policies, pods["inference"], 9100, epp, HERE)
    assert _admits(policies, pods["loraflow-epp"], 9002, client, ELSEWHERE)
    assert not _admits(policies, pods["inference"], http, {"app": "x"}, HERE)
    assert not _admits(policies, pods["loraflow-epp"], 9002, {"app": "x"}, HERE)


# ------------------------------------------------------------------------------------------------ redis

def test_redis_keeps_an_append_only_file_on_a_persistent_volume_and_requires_a_password():
    (statefulset,) = by_kind(render("base"), "StatefulSet").values()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    flags = {args[i].lstrip("-"): args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert args[0] == "redis-server"
    assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec"
    assert flags["requirepass"] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": "loraflow-redis", "key": "REDIS_PASSWORD"}
    (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == flags["dir"]]
    claims = {c["metadata"]["name"]: c for c in statefulset["spec"]["volumeClaimTemplates"]}
    assert data["name"] in claims and claims[data["name"]]["spec"]["resources"]["requests"]["storage"]
    # The URL (with its password) reaches the pods from the Secret, never from the ConfigMap.
    for configmap in by_kind(render("base"), "ConfigMap").values():
        assert "LORAFLOW_REDIS_URL" not in configmap["data"] and "REDIS_PASSWORD" not in configmap["data"]


def test_store_has_a_volume_and_a_job_that_creates_the_services_bucket():
    docs = render("base")
    settings = by_kind(docs, "ConfigMap")["loraflow-settings"]["data"]
    endpoint = urlsplit(settings["AWS_ENDPOINT_URL"])
    service = by_kind(docs, "Service")[endpoint.hostname]
    assert service["spec"]["ports"][0]["port"] == endpoint.port
    minio = by_kind(docs, "Deployment")["minio"]
    assert selects({"matchLabels": service["spec"]["selector"]}, minio["spec"]["template"]["metadata"]["labels"])
    volumes = {v["name"]: v for v in minio["spec"]["template"]["spec"]["volumes"]}
    (container,) = minio["spec"]["template"]["spec"]["containers"]
    data_dir = container["args"][container["args"].index("server") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(docs, "PersistentVolumeClaim")
    assert minio["spec"]["strategy"]["type"] == "Recreate"  # one pod at a time on a ReadWriteOnce volume
    # The bucket Job: the bucket of LORAFLOW_STORE_URL, on the endpoint the services use, idempotently.
    (job,) = by_kind(docs, "Job").values()
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    script = mc["args"][0]
    assert "mc mb --ignore-existing" in script and "${LORAFLOW_STORE_URL#s3://}" in script
    env = {e["name"]: e for e in mc["env"]}
    assert env["LORAFLOW_STORE_URL"]["valueFrom"]["configMapKeyRef"] == {"name": "loraflow-settings",
                                                                          "key": "LORAFLOW_STORE_URL"}
    host = urlsplit(env["MC_HOST_store"]["value"])
    assert (host.scheme, host.hostname, host.port) == (endpoint.scheme, endpoint.hostname, endpoint.port)
    # What the script derives from the store URL is the bucket the services open.
    from loraflow.storage.store import open_store

    bucket = subprocess.run(["sh", "-c", script.splitlines()[0] + '; printf %s "$bucket"'],
                            env={"LORAFLOW_STORE_URL": settings["LORAFLOW_STORE_URL"]}, capture_output=True,
                            text=True, check=True).stdout
    store = open_store(settings["LORAFLOW_STORE_URL"])
    assert bucket == store.bucket == "loraflow"


# ------------------------------------------------------------------------------------------------ KEDA

KEDA_SPEC_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
# KEDA's redis-streams scaler parameters (keda.sh/docs/latest/scalers/redis-streams).
REDIS_STREAMS_FIELDS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "username",
                        "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
                        "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
                        "databaseIndex"}


def test_keda_scales_each_worker_on_its_own_queue_stream_and_group():
    from services.compiler.__main__ import SPEC as COMPILER
    from services.trainer.__main__ import SPEC as TRAINER

    docs = render("overlays/production")
    scaled = by_kind(docs, "ScaledObject")
    auths = by_kind(docs, "TriggerAuthentication")
    deployments = by_kind(docs, "Deployment")
    redis_service = by_kind(docs, "Service")["redis"]
    assert set(scaled) == {"trainer-worker", "compiler-worker"}
    for spec in (TRAINER, COMPILER):
        (obj,) = [o for o in scaled.values() if o["spec"]["scaleTargetRef"]["name"] == f"{spec.name}-worker"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1" and set(obj["spec"]) <= KEDA_SPEC_FIELDS
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        assert _parse_service_args(spec.name, container["args"]).mode == "worker"
        assert 1 <= obj["spec"]["minReplicaCount"] < obj["spec"]["maxReplicaCount"]
        stream = JobQueue(redis.Redis(), spec.kind).stream_key  # the real key, computed by loraflow.jobs.queue
        thresholds = set()
        for trigger in obj["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-streams" and set(meta) <= REDIS_STREAMS_FIELDS, meta
            assert all(isinstance(v, str) for v in meta.values())  # KEDA metadata is a map of strings
            assert meta["stream"] == stream and meta["consumerGroup"] == GROUP
            host, port = meta["address"].rsplit(":", 1)
            assert host == f"{redis_service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
            assert int(port) == redis_service["spec"]["ports"][0]["port"]
            assert meta.get("databaseIndex", "0") == "0"
            (threshold,) = set(meta) & {"pendingEntriesCount", "streamLength", "lagCount"}
            assert int(meta[threshold]) >= 1
            thresholds.add(threshold)
            auth = auths[trigger["authenticationRef"]["name"]]
            assert {"parameter": "password", "name": "loraflow-redis", "key": "REDIS_PASSWORD"} in \
                auth["spec"]["secretTargetRef"]
        assert thresholds == {"pendingEntriesCount", "lagCount"}
    # base needs no KEDA CRDs.
    assert not by_kind(render("base"), "ScaledObject")


# ------------------------------------------------------------------------------------------------ distributed

def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values and args (unknown references stay as written)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_distributed_training_is_an_indexed_job_whose_pods_find_each_other_by_dns():
    from services.trainer.__main__ import SPEC

    docs = render("training-distributed")
    (job,) = by_kind(docs, "Job").values()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    nodes = spec["completions"]
    assert spec["parallelism"] == nodes >= 2
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    assert spec["podReplacementPolicy"] == "Failed"  # a replacement takes the name only once the old pod is gone
    # The headless Service named by the pods' subdomain selects them and publishes them before readiness.
    service = by_kind(docs, "Service")[pod["subdomain"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects({"matchLabels": service["spec"]["selector"]}, spec["template"]["metadata"]["labels"])
    (container,) = pod["containers"]
    # The index comes from the Job controller's annotation, defined before the value that uses it.
    names = [e["name"] for e in container["env"]]
    index_var = container["env"][names.index("JOB_COMPLETION_INDEX")]
    assert index_var["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert names.index("JOB_COMPLETION_INDEX") < names.index("LORAFLOW_RDZV_HOST")
    raw = {e["name"]: e.get("value") for e in container["env"]}
    from services.trainer.node_flags import NodeMode

    for index in range(nodes):
        env = {"JOB_COMPLETION_INDEX": str(index)}
        env["LORAFLOW_RDZV_HOST"] = _expand(raw["LORAFLOW_RDZV_HOST"], env)
        # Every pod dials node 0: Kubernetes names index 0's host "<job>-0", resolvable as "<host>.<subdomain>".
        assert env["LORAFLOW_RDZV_HOST"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
        args = _parse_service_args("trainer", [_expand(a, env) for a in container["args"]])
        assert args.rdzv_host == env["LORAFLOW_RDZV_HOST"] and args.rdzv_port == 29400
        assert args.role == "auto" and args.one_job and args.join_timeout >= 300
        # Index 0 takes the job from the queue and is node 0; every other index follows as its node rank.
        mode = NodeMode.from_args(args, env=env)
        assert (mode.role, mode.node_rank, mode.one_job) == ("worker" if index == 0 else "follower", index, True)
    assert args.mode == "worker" and not args.join_distributed and args.allow_distributed_training
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer-worker", "operator": "In",
                                                "values": [4]}} in rules

    assert SPEC.kind == "train" and args.max_ranks >= 1
    assert _quantity(container["resources"]["requests"]["cpu"]) >= args.max_ranks
    assert pod["terminationGracePeriodSeconds"] >= 120
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_distributed_pool_is_reachable_by_its_own_pods_on_any_port_and_otherwise_by_scrapers_only():
    docs = list(render("base")) + list(render("training-distributed"))
    policies = list(by_kind(docs, "NetworkPolicy").values())
    pods = _templates(docs)
    pool = pods["trainer-distributed"]
    peer = pool["metadata"]["labels"]
    for port in (29500, 41234, 9100):  # c10d store, a gloo pair socket, metrics
        assert _admits(policies, pool, port, peer, HERE), port
        for labels, namespace in ((pods["trainer-worker"]["metadata"]["labels"], HERE),
                                  ({"loraflow.io/client": "true"}, ELSEWHERE), (peer, ELSEWHERE)):
            assert not _admits(policies, pool, port, labels, namespace), (port, labels, namespace)
    assert _admits(policies, pool, 9100, {"loraflow.io/metrics-scraper": "true"}, ELSEWHERE)
    # The pool's pods are loraflow pods: they reach Redis and the store.
    assert _admits(policies, pods["redis"], 6379, peer, HERE) and _admits(policies, pods["minio"], 9000, peer, HERE)
    # And the plain workers are not part of the pool.
    policy = by_kind(render("training-distributed"), "NetworkPolicy")["trainer-distributed"]
    assert not selects(policy["spec"]["podSelector"], pods["trainer-worker"]["metadata"]["labels"])
