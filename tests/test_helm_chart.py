"""The Helm chart (infra/helm/rtdlm): lint, render each variant, validate every manifest against
Kubernetes' own schemas, check the objects that make training work (trainer args, multi-host
env, network policy, security), and feed what the chart renders to the real trainer's parser.

helm comes from RTDLM_HELM, PATH or build-support/install-helm.sh's install location; without
it these tests skip (or fail, under RTDLM_REQUIRE_INFRA_TOOLS=1, as in CI).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import find_tool, missing_tool

# From the repo root (Pants' sandbox root, with the chart as a `files` dependency), else beside
# this file's directory; no resolve(), since a sandbox may hold links into a store.
CHART = next(
    (
        root / "infra" / "helm" / "rtdlm"
        for root in (Path.cwd(), Path(__file__).absolute().parent.parent)
        if (root / "infra" / "helm" / "rtdlm" / "Chart.yaml").exists()
    ),
    Path("infra/helm/rtdlm"),
)
RELEASE = "exp1"
NAMESPACE = "ml"
K8S_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"]
# CRDs: kubernetes-validate carries only the built-in kinds' schemas.
NOT_BUILT_IN = {"ServiceMonitor"}
CONFIG_PATH = "/etc/rtdlm/config.yaml"

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "distributed": ["distributed_training.enabled=true"],
    "cpu": ["training.gpu.enabled=false"],
    "cpu-count-0": ["training.gpu.count=0"],
    "existing-claims": [
        "persistence.checkpoints.existingClaim=shared-runs",
        "persistence.data.enabled=true",
        "persistence.data.existingClaim=token-shards",
        "persistence.data.shardDir=/corpus/v1/",
    ],
    "storage-class": [
        "persistence.checkpoints.storageClassName=nfs-rwx",
        "persistence.checkpoints.size=2Ti",
        "persistence.checkpoints.accessModes={ReadWriteMany}",
        "persistence.data.enabled=true",
        "persistence.data.storageClassName=fast-ssd",
    ],
    "tiny": ["training.model.preset=tiny"],
    "small": ["training.model.preset=small"],
    "distributed-tiny-cpu": [
        "distributed_training.enabled=true",
        "distributed_training.workers=2",
        "training.model.preset=tiny",
        "training.gpu.enabled=false",
    ],
    "no-metrics-no-resume": ["metrics.enabled=false", "training.resume=false"],
    "object-storage": [
        "objectStorage.url=s3://team-runs/rtdlm/",
        "objectStorage.leaseSeconds=90",
        "secrets.create=true",
        "secrets.data.AWS_ACCESS_KEY_ID=AKIAEXAMPLE",
        "secrets.data.AWS_SECRET_ACCESS_KEY=example",
        "secrets.data.AWS_REGION=eu-west-1",
    ],
    "everything": [
        "distributed_training.enabled=true",
        "metrics.serviceMonitor.enabled=true",
        "ingress.enabled=true",
        "secrets.create=true",
        "secrets.data.HF_TOKEN=hf_example",
        "persistence.data.enabled=true",
        "persistence.data.accessModes={ReadOnlyMany}",
        "training.activeDeadlineSeconds=86400",
        "training.ttlSecondsAfterFinished=3600",
        "tracking.tensorboard=false",
        "tracking.mlflow.uri=http://mlflow.ml:5000",
    ],
}
# Trainer config from a values file, as users pass it: these must reach the resolved config.
TRAINER_CONFIG = {
    "train": {"max_steps": 1234, "checkpoint_every": 250},
    "optimizer": {"learning_rate": 3.0e-4},
    "data": {"batch_size": 16},
}


def _installed_helm() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tools = Path(os.environ.get("RTDLM_TOOLS_DIR") or cache / "rtdlm-tools")
    return tools / "helm-3.18.0" / "helm"


@pytest.fixture(scope="module")
def helm() -> str:
    found = os.environ.get("RTDLM_HELM") or find_tool("helm")
    if not found and _installed_helm().exists():
        found = str(_installed_helm())
    if not found or not Path(found).exists():
        missing_tool(
            "helm is not installed, so the chart cannot be rendered: run "
            "build-support/install-helm.sh (or set RTDLM_HELM to a helm v3 binary)",
            "RTDLM_REQUIRE_INFRA_TOOLS",
        )
    return str(found)


@pytest.fixture(scope="module")
def run_helm(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    # helm's caches and config in a scratch dir: the sandbox may have no usable HOME.
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [helm, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )

    return run


@pytest.fixture(scope="module")
def values_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "config.yaml"
    path.write_text(yaml.safe_dump({"training": {"config": TRAINER_CONFIG}}))
    return path


def _set_args(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


@pytest.fixture(scope="module")
def render(run_helm: Callable[..., Any], values_file: Path) -> Callable[..., list[dict[str, Any]]]:
    """Renders a list of --set items (memoized: every test shares each render)."""
    cache: dict[tuple[tuple[str, ...], bool], list[dict[str, Any]]] = {}

    def rendered(sets: list[str], with_config: bool = False) -> list[dict[str, Any]]:
        key = (tuple(sets), with_config)
        if key not in cache:
            extra = ["-f", str(values_file)] if with_config else []
            result = run_helm(
                "template", RELEASE, str(CHART), "-n", NAMESPACE, *extra, *_set_args(sets)
            )
            assert result.returncode == 0, result.stderr
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[key]

    return rendered


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "trainer")


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- lint and schema validation ------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(run_helm: Callable[..., Any], variant: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), *_set_args(VARIANTS[variant]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly(
    render: Callable[..., list[dict[str, Any]]], version: str
) -> None:
    checked: set[str] = set()
    seen: set[str] = set()  # variants share most objects: validate each distinct one once
    for variant, sets in VARIANTS.items():
        for doc in render(sets):
            text = json.dumps(doc, sort_keys=True)
            if doc["kind"] in NOT_BUILT_IN or text in seen:
                continue
            seen.add(text)
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(
                    f"{variant}: {doc['kind']} {doc['metadata']['name']} is invalid for "
                    f"Kubernetes {version}: {error.message} at {list(error.path)}"
                )
            checked.add(doc["kind"])
    # Every kind the chart can render was validated somewhere (a variant renders each).
    assert checked == {
        "ConfigMap",
        "Ingress",
        "Job",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    }


# -- values --------------------------------------------------------------------------------------


def test_seed_defaults_are_kept() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    training = values["training"]
    assert training["enabled"] is True
    assert training["model"]["preset"] == "medium"
    assert training["gpu"]["count"] == 4
    assert training["gpu"]["type"] == "nvidia-a100"
    assert training["resources"]["limits"]["memory"] == "64Gi"
    assert training["resources"]["requests"]["memory"] == "64Gi"
    assert values["distributed_training"] == {**values["distributed_training"], "enabled": False}
    assert values["distributed_training"]["workers"] == 4
    assert values["metrics"]["port"] == 8000


def documented_keys(lines: list[str]) -> set[tuple[str, ...]]:
    """Paths of the keys whose comment block above holds a `# --` line (helm-docs style)."""
    documented: set[tuple[str, ...]] = set()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            if lines[above].strip().startswith("# --"):
                documented.add(tuple(k for _, k in stack))
                break
            above -= 1
    return documented


def leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    else:
        yield path


def test_every_value_is_documented() -> None:
    # A leaf counts as documented when it, or a value object holding it, has a `# --` comment.
    text = (CHART / "values.yaml").read_text()
    documented = documented_keys(text.splitlines())
    missing = [
        ".".join(leaf)
        for leaf in leaves(yaml.safe_load(text))
        if not any(leaf[:n] in documented for n in range(1, len(leaf) + 1))
    ]
    assert not missing, f"values without a `# --` comment: {missing}"
    assert ("training", "gpu", "count") in documented


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("training.model.preset=huge", "training.model.preset must be one of the following"),
        ("training.gpu.count=four", "training.gpu.count: Invalid type. Expected: integer"),
        ("training.gpu.countt=4", "Additional property countt is not allowed"),
        ("training.config.optimiser.learning_rate=1", "Additional property optimiser"),
        ("distributed_training.workers=0", "distributed_training.workers: Must be greater"),
        ("persistence.checkpoints.accessModes={ReadWriteSometimes}", "accessModes"),
        ("objectStorage.url=hdfs://cluster/runs", "objectStorage.url"),
        ("objectStorage.url=s3://bucket-only", "objectStorage.url"),
    ],
)
def test_schema_rejects_bad_values(run_helm: Callable[..., Any], bad: str, problem: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), "--set", bad)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert problem in result.stderr, result.stderr


# -- the single-node Job -------------------------------------------------------------------------


def test_default_renders_one_plain_job(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render([])
    job = one(docs, "Job")
    spec = job["spec"]
    assert job["metadata"]["name"] == f"{RELEASE}-rtdlm-train"
    assert "completionMode" not in spec
    assert spec["completions"] == spec["parallelism"] == 1
    assert spec["backoffLimit"] >= 1
    pod = spec["template"]["spec"]
    # Never + podFailurePolicy: bad input (exit 2) fails the Job, disruptions don't count.
    assert pod["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "exit": [2]} in [
        {"action": r["action"], "exit": r["onExitCodes"]["values"]}
        for r in rules
        if "onExitCodes" in r
    ]
    assert any(
        r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget"
        for r in rules
    )
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert not by_kind(docs, "PodDisruptionBudget")
    assert not [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "large"])
def test_args_are_the_trainer_cli(render: Callable[..., list[dict[str, Any]]], preset: str) -> None:
    sets = [] if preset == "medium" else [f"training.model.preset={preset}"]
    docs = render(sets)
    container = trainer(one(docs, "Job"))
    args = container["args"]
    assert "command" not in container  # the image's entrypoint is the trainer
    assert flag(args, "--preset") == preset
    assert flag(args, "--config") == CONFIG_PATH
    assert flag(args, "--run-dir") == f"/runs/{RELEASE}"
    assert flag(args, "--metrics-host") == "0.0.0.0"
    assert flag(args, "--metrics-port") == "8000"
    assert "--resume" in args
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["preset"] == preset
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/rtdlm"]["readOnly"] is True
    assert "/runs" in mounts


def test_gpu_by_default(render: Callable[..., list[dict[str, Any]]]) -> None:
    job = one(render([]), "Job")
    pod = job["spec"]["template"]["spec"]
    container = trainer(job)
    assert container["image"] == "ghcr.io/auralithai/rt-dlm:train-0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["resources"]["limits"]["memory"] == "64Gi"
    assert pod["nodeSelector"] == {"accelerator": "nvidia-a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (check,) = pod["initContainers"]
    assert check["command"] == ["nvidia-smi"]
    assert check["resources"]["limits"]["nvidia.com/gpu"] == 4  # it must see the same GPUs


@pytest.mark.parametrize("variant", ["cpu", "cpu-count-0", "distributed-tiny-cpu"])
def test_cpu_only_has_no_gpu_anything(
    render: Callable[..., list[dict[str, Any]]], variant: str
) -> None:
    job = one(render(VARIANTS[variant]), "Job")
    pod = job["spec"]["template"]["spec"]
    assert trainer(job)["image"] == "ghcr.io/auralithai/rt-dlm:train-cpu-0.1.0"
    assert "initContainers" not in pod
    assert "accelerator" not in pod.get("nodeSelector", {})
    assert not [t for t in pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
    for container in all_containers(pod):
        for kind in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container["resources"].get(kind, {})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_are_locked_down(render: Callable[..., list[dict[str, Any]]], variant: str) -> None:
    docs = render(VARIANTS[variant])
    account = one(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    pod = one(docs, "Job")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == 10001
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers(pod):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["runAsUser"] == 10001
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs somewhere to write: /tmp (HOME too) on an emptyDir.
    container = trainer(one(docs, "Job"))
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume


# -- storage -------------------------------------------------------------------------------------


def claims(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in by_kind(docs, "PersistentVolumeClaim")}


def volume_claims(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Mount path -> claim name of the training pod."""
    pod = one(docs, "Job")["spec"]["template"]["spec"]
    by_volume = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = trainer(one(docs, "Job"))["volumeMounts"]
    return {m["mountPath"]: by_volume[m["name"]] for m in mounts if m["name"] in by_volume}


def test_default_storage(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render([])
    assert volume_claims(docs) == {"/runs": f"{RELEASE}-rtdlm-checkpoints"}
    pvc = claims(docs)[f"{RELEASE}-rtdlm-checkpoints"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert "data" not in config  # the built-in corpus


def test_existing_claims(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render(VARIANTS["existing-claims"])
    assert not claims(docs)
    assert volume_claims(docs) == {"/runs": "shared-runs", "/data": "token-shards"}
    data = next(m for m in trainer(one(docs, "Job"))["volumeMounts"] if m["mountPath"] == "/data")
    assert data["readOnly"] is True
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["data"]["path"] == "/data/corpus/v1"


def test_storage_class(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render(VARIANTS["storage-class"])
    found = claims(docs)
    runs, data = found[f"{RELEASE}-rtdlm-checkpoints"], found[f"{RELEASE}-rtdlm-data"]
    assert runs["spec"]["storageClassName"] == "nfs-rwx"
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]
    assert runs["spec"]["resources"]["requests"]["storage"] == "2Ti"
    assert data["spec"]["storageClassName"] == "fast-ssd"
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["data"]["path"] == "/data"


def test_a_run_dir_on_object_storage_mounts_no_claim_for_it(
    render: Callable[..., list[dict[str, Any]]],
) -> None:
    docs = render(VARIANTS["object-storage"])
    assert not claims(docs) and not volume_claims(docs)
    container = trainer(one(docs, "Job"))
    assert flag(container["args"], "--run-dir") == f"s3://team-runs/rtdlm/{RELEASE}"
    assert flag(container["args"], "--lease-seconds") == "90"
    (secret,) = by_kind(docs, "Secret")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]


# -- distributed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["distributed", "distributed-tiny-cpu", "everything"])
def test_distributed_job(render: Callable[..., list[dict[str, Any]]], variant: str) -> None:
    docs = render(VARIANTS[variant])
    workers = 2 if variant == "distributed-tiny-cpu" else 4
    job = one(docs, "Job")  # the single-node Job does not render beside it
    spec, name = job["spec"], job["metadata"]["name"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == workers
    assert spec["backoffLimit"] == 3 * workers  # maxRestarts whole-job restarts
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert "podFailurePolicy" in spec
    labels = spec["template"]["metadata"]["labels"]

    (headless,) = (s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None")
    assert selects(headless["spec"]["selector"], labels)
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert spec["template"]["spec"]["subdomain"] == headless["metadata"]["name"]
    (port,) = headless["spec"]["ports"]

    env = {e["name"]: e for e in trainer(job)["env"]}
    host, _, coordinator_port = env["RTDLM_COORDINATOR_ADDRESS"]["value"].rpartition(":")
    # Pod 0's hostname is JOB-0 and its DNS name JOB-0.SUBDOMAIN (in the same namespace).
    assert host == f"{name}-0.{headless['metadata']['name']}"
    assert int(coordinator_port) == port["port"] == 8476
    container_ports = {p["name"]: p["containerPort"] for p in trainer(job)["ports"]}
    assert container_ports["coordinator"] == port["port"]
    assert env["RTDLM_NUM_PROCESSES"]["value"] == str(workers)
    assert env["RTDLM_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == workers
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)

    # The hosts share one run dir: a ReadWriteMany claim.
    runs = claims(docs)[f"{RELEASE}-rtdlm-checkpoints"]
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]
    args = trainer(job)["args"]
    assert flag(args, "--join-timeout") == "300"
    assert flag(args, "--heartbeat-timeout") == "100"


@pytest.mark.parametrize("variant", ["default", "distributed", "cpu", "everything"])
def test_network_policy(render: Callable[..., list[dict[str, Any]]], variant: str) -> None:
    docs = render(VARIANTS[variant])
    distributed = variant in ("distributed", "everything")
    labels = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in by_kind(docs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]
    assert len(policies) == len(by_kind(docs, "NetworkPolicy")) == 2
    (deny,) = (p for p in policies if "ingress" not in p["spec"] and "egress" not in p["spec"])
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (allow,) = (p for p in policies if p is not deny)
    ingress, egress = allow["spec"]["ingress"], allow["spec"]["egress"]

    metrics_rules = [r for r in ingress if r.get("ports") == [{"port": 8000, "protocol": "TCP"}]]
    assert len(metrics_rules) == 1
    assert metrics_rules[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    dns = [r for r in egress if "to" not in r]
    assert dns == [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]

    # Among the job's own pods, every port: the coordinator's and the collectives' (run-time).
    peers_in = [r for r in ingress if any("podSelector" in f and len(f) == 1 for f in r["from"])]
    peers_out = [r for r in egress if "to" in r]
    if not distributed:
        assert not peers_in and not peers_out
        return
    assert len(peers_in) == len(peers_out) == 1
    for rule, side in ((peers_in[0], "from"), (peers_out[0], "to")):
        assert "ports" not in rule  # no restriction: the coordinator port included
        assert selects(rule[side][0]["podSelector"]["matchLabels"], labels)


def test_metrics_discovery(render: Callable[..., list[dict[str, Any]]]) -> None:
    for sets in (VARIANTS["default"], VARIANTS["everything"]):
        docs = render(sets)
        template = one(docs, "Job")["spec"]["template"]
        annotations, labels = template["metadata"]["annotations"], template["metadata"]["labels"]
        # What infra/monitoring/prometheus/prometheus-kubernetes.yml keeps.
        assert labels["app.kubernetes.io/name"] == "rtdlm"
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "8000"
        assert annotations["prometheus.io/path"] == "/metrics"
        (service,) = (s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}
        ]
        assert selects(service["spec"]["selector"], labels)
    docs = render(VARIANTS["everything"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"]["name"] == service["metadata"]["name"]
    secret = one(docs, "Secret")
    assert trainer(one(docs, "Job"))["envFrom"] == [
        {"secretRef": {"name": secret["metadata"]["name"]}}
    ]
    assert not by_kind(render([]), "ServiceMonitor") and not by_kind(render([]), "Ingress")


def test_metrics_off(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render(VARIANTS["no-metrics-no-resume"])
    template = one(docs, "Job")["spec"]["template"]
    args = trainer(one(docs, "Job"))["args"]
    assert "--no-metrics" in args and "--metrics-port" not in args
    assert "--no-resume" in args and "--resume" not in args
    assert not [k for k in template["metadata"]["annotations"] if k.startswith("prometheus.io/")]
    assert not by_kind(docs, "Service")
    (allow,) = (p for p in by_kind(docs, "NetworkPolicy") if "egress" in p["spec"])
    assert not allow["spec"].get("ingress")  # nothing may connect to the pod at all


def test_tracking(render: Callable[..., list[dict[str, Any]]]) -> None:
    container = trainer(one(render(VARIANTS["default"]), "Job"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "--no-tensorboard" not in container["args"] and "MLFLOW_TRACKING_URI" not in env
    assert env["MLFLOW_EXPERIMENT_NAME"] == "rtdlm"
    sets = ["tracking.tensorboard=false", "tracking.mlflow.uri=http://mlflow.ml:5000"]
    container = trainer(one(render([*sets, "tracking.mlflow.experiment=pretrain"]), "Job"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "--no-tensorboard" in container["args"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml:5000"
    assert env["MLFLOW_EXPERIMENT_NAME"] == "pretrain"


# -- the trainer accepts what the chart renders --------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "with_config"),
    [
        ("default", False),
        ("tiny", False),
        ("default", True),
        ("distributed", False),
        ("distributed-tiny-cpu", True),
        ("no-metrics-no-resume", False),
        ("object-storage", False),
    ],
)
def test_trainer_accepts_rendered_args(
    render: Callable[..., list[dict[str, Any]]],
    tmp_path: Path,
    variant: str,
    with_config: bool,
) -> None:
    from rtdlm_trainer.main import job_cluster, parse_args, resolve_config

    docs = render(VARIANTS[variant], with_config=with_config)
    job = one(docs, "Job")
    container = trainer(job)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    args = parse_args([str(config_file) if a == CONFIG_PATH else a for a in container["args"]])
    cfg = resolve_config(args)
    preset = flag(container["args"], "--preset")
    assert cfg.preset == preset
    if variant == "object-storage":
        assert str(args.run_dir) == f"s3://team-runs/rtdlm/{RELEASE}"
        assert args.lease_seconds == 90
    else:
        assert str(args.run_dir) == f"/runs/{RELEASE}"
    if variant == "no-metrics-no-resume":
        assert args.resume is False
        assert cfg.metrics.enabled is False
    else:
        assert args.resume is True
        assert cfg.metrics.enabled and cfg.metrics.port == 8000 and cfg.metrics.host == "0.0.0.0"
    if with_config:
        assert cfg.train.max_steps == 1234
        assert cfg.train.checkpoint_every == 250
        assert cfg.optimizer.learning_rate == pytest.approx(3.0e-4)
        assert cfg.data.batch_size == 16

    env = {e["name"]: e for e in container["env"]}
    if "RTDLM_NUM_PROCESSES" not in env:
        assert not job_cluster(args, {}).multi_process
        return
    workers = job["spec"]["completions"]
    for index in range(workers):  # what the fieldRef gives pod `index`
        environ = {
            "RTDLM_COORDINATOR_ADDRESS": env["RTDLM_COORDINATOR_ADDRESS"]["value"],
            "RTDLM_NUM_PROCESSES": env["RTDLM_NUM_PROCESSES"]["value"],
            "RTDLM_PROCESS_ID": str(index),
        }
        cluster = job_cluster(args, environ)
        assert cluster.multi_process
        assert cluster.num_processes == workers
        assert cluster.process_id == index
        assert cluster.coordinator_address == environ["RTDLM_COORDINATOR_ADDRESS"]
        assert (cluster.timeout_seconds, cluster.heartbeat_seconds) == (300, 100)
