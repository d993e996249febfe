"""infra/docker-compose.yml: valid against the Compose Specification's JSON schema, resolved by a
real Compose implementation, and wired as the monitoring config and the trainer expect it.

The schema and the parser are Debian's docker-compose (compose/config/compose_spec.json and
`docker-compose config`); without it these tests skip, or fail under RTDLM_REQUIRE_INFRA_TOOLS=1
(CI). `build-support/test-compose.sh --install-only` installs it; the same script runs the
`training-cpu` service for real.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import find_tool, missing_tool
from prometheus_client import CollectorRegistry

from rtdlm.metrics import start_server
from rtdlm_trainer.main import parse_args, resolve_config

# From the repo root (Pants' sandbox root, with the files as dependencies), else beside this
# file's directory; no resolve(), since a sandbox may hold links into a store.
ROOT = next(
    (
        root
        for root in (Path.cwd(), Path(__file__).absolute().parent.parent)
        if (root / "infra" / "docker-compose.yml").exists()
    ),
    Path.cwd(),
)
COMPOSE = ROOT / "infra" / "docker-compose.yml"
MONITORING = ROOT / "infra" / "monitoring"
TRAINERS = ["training", "training-cpu"]
MONITORS = ["prometheus", "alertmanager", "grafana"]
SCHEMA_PATHS = [Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")]
INSTALL = "build-support/test-compose.sh --install-only (Debian's docker-compose)"


# Compose interpolation, the forms the file uses: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|(?P<named>\w+))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        found = env.get(match["braced"] or match["named"])
        if match["op"] == ":-" and not found or match["op"] == "-" and found is None:
            return str(match["default"])
        return found or ""

    result = _VARIABLE.sub(substitute, value)
    assert "${" not in result, f"interpolation this test does not know: {value!r}"
    return result


def raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def resolved(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The file as Compose sees it with `env` (default: nothing set, so every default applies)."""
    return dict(interpolate(raw(), env or {}))


def service(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return dict(resolved(env)["services"][name])


def split_volume(spec: str) -> tuple[str, str, str]:
    source, target, *mode = spec.split(":")
    return source, target, mode[0] if mode else "rw"


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def mounts(svc: dict[str, Any]) -> dict[str, Path | str]:
    """Target -> bind source (a path beside the compose file) or named volume."""
    found: dict[str, Path | str] = {}
    for spec in svc.get("volumes", []):
        source, target, _ = split_volume(spec)
        found[target] = COMPOSE.parent / source if is_bind(source) else source
    return found


def trainer_config(name: str, env: dict[str, str] | None = None) -> tuple[Any, Any]:
    command = service(name, env)["command"]
    args = parse_args(shlex.split(command) if isinstance(command, str) else list(command))
    return args, resolve_config(args)


def flag(command: list[str], name: str) -> str | None:
    return next((arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")), None)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def prometheus_config() -> dict[str, Any]:
    return dict(yaml.safe_load((MONITORING / "prometheus/prometheus-compose.yml").read_text()))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    path = next((p for p in SCHEMA_PATHS if p.exists()), None)
    if path is None:
        missing_tool(
            f"no Compose Specification schema at {SCHEMA_PATHS[0]}: run {INSTALL}",
            "RTDLM_REQUIRE_INFRA_TOOLS",
        )
    return dict(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def docker_compose() -> str:
    found = find_tool("docker-compose")
    if found is None:
        missing_tool(f"docker-compose is not installed: run {INSTALL}", "RTDLM_REQUIRE_INFRA_TOOLS")
    return found


def compose_config(docker_compose: str, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """`docker-compose config` with only `env` among the variables the file reads."""
    variables = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in variables and not key.startswith(("COMPOSE_", "DOCKER_"))
    }
    done = subprocess.run(
        [docker_compose, "-f", str(COMPOSE), "--profile", "monitoring", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "HOME": str(tmp_path), **env},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(yaml.safe_load(done.stdout))


def test_the_file_is_valid_compose_specification(schema: dict[str, Any]) -> None:
    # jsonschema (no type stubs) is kubernetes-validate's, a declared dependency of this test
    jsonschema: Any = importlib.import_module("jsonschema")
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    for document in (raw(), resolved(), resolved({"RTDLM_GPUS": "2", "RTDLM_RUNS": "/srv/runs"})):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, errors
    assert "version" not in raw(), "the Compose Specification has no version key"
    # the schema catches what a typo would be, so the check above is not vacuous
    broken = resolved()
    broken["services"]["training"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert not validator.is_valid(broken)


def test_docker_compose_resolves_the_same_services(docker_compose: str, tmp_path: Path) -> None:
    config = compose_config(docker_compose, tmp_path, {})
    ours = resolved()["services"]
    assert set(config["services"]) == set(TRAINERS + MONITORS) == set(ours)
    for name, svc in config["services"].items():
        assert svc["image"] == ours[name]["image"]
        command = svc.get("command")
        mine = ours[name].get("command")
        assert (shlex.split(command) if isinstance(command, str) else command) == (
            shlex.split(mine) if isinstance(mine, str) else mine
        )
        for spec in svc.get("volumes", []):
            source, _, _ = split_volume(spec)
            if is_bind(source):  # resolved to absolute paths: they must exist in the repo
                assert Path(source).exists() and "/infra/monitoring/" in source, source
    assert config["services"]["training"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert set(config["volumes"]) >= {"runs", "data"}

    # the environment reaches the image, the command and the mounts
    env = {
        "RTDLM_TAG": "0.1.0",
        "RTDLM_PRESET": "medium",
        "RTDLM_RUN": "exp7",
        "RTDLM_ARGS": "--max-steps 5000 --set optimizer.learning_rate=3e-4",
        "RTDLM_RUNS": str(tmp_path),
    }
    training = compose_config(docker_compose, tmp_path, env)["services"]["training"]
    assert training["image"] == "ghcr.io/auralithai/rt-dlm:train-0.1.0"
    assert f"{tmp_path}:/runs:rw" in training["volumes"]
    assert shlex.split(training["command"]) == shlex.split(service("training", env)["command"])


def test_services_and_profiles() -> None:
    services = resolved()["services"]
    assert set(services) == set(TRAINERS + MONITORS)
    assert "profiles" not in services["training"]  # a plain `up` trains on the GPU
    assert services["training-cpu"]["profiles"] == ["cpu"]  # never beside it on one run dir
    for name in MONITORS:
        assert services[name]["profiles"] == ["monitoring"]
        image, _, tag = services[name]["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a version"
    assert services["training"]["image"] == "ghcr.io/auralithai/rt-dlm:train-latest"
    assert services["training-cpu"]["image"] == "ghcr.io/auralithai/rt-dlm:train-cpu-latest"
    env = {"RTDLM_IMAGE": "registry.example/rtdlm", "RTDLM_TAG": "abc123"}
    assert service("training-cpu", env)["image"] == "registry.example/rtdlm:train-cpu-abc123"


def test_only_the_gpu_trainer_reserves_gpus() -> None:
    devices = service("training")["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    two = service("training", {"RTDLM_GPUS": "2"})["deploy"]["resources"]["reservations"]
    assert two["devices"][0]["count"] == "2"
    assert "deploy" not in service("training-cpu") and "gpus" not in service("training-cpu")


@pytest.mark.parametrize("name", TRAINERS)
def test_trainers_are_locked_down_and_keep_their_runs(name: str) -> None:
    svc = service(name)
    assert svc["user"] == "10001:10001"
    assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"]
    assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc
    assert "no-new-privileges:true" in svc["security_opt"]
    assert "privileged" not in svc
    # runs in a named volume by default, a host folder with RTDLM_RUNS; data read-only
    assert mounts(svc)["/runs"] == "runs" and "runs" in resolved()["volumes"]
    assert split_volume(next(v for v in svc["volumes"] if ":/data" in v))[2] == "ro"
    runs = service(name, {"RTDLM_RUNS": "/srv/rtdlm-runs"})
    assert "/srv/rtdlm-runs:/runs" in runs["volumes"]
    # a crash resumes; SIGTERM gets time to finish the step and checkpoint
    assert svc["restart"].startswith("on-failure")
    assert seconds(svc["stop_grace_period"]) >= 300
    assert "stop_signal" not in svc or svc["stop_signal"] == "SIGTERM"
    assert svc["shm_size"]


@pytest.mark.parametrize(("name", "preset", "run_dir"), [
    ("training", "small", "/runs/compose"),
    ("training-cpu", "tiny", "/runs/compose-cpu"),
])  # fmt: skip
def test_trainer_commands_parse_with_the_real_trainer(name: str, preset: str, run_dir: str) -> None:
    args, cfg = trainer_config(name)
    assert cfg.preset == preset and str(args.run_dir) == run_dir and args.resume
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == 8000
    env = {
        "RTDLM_PRESET": "medium",
        "RTDLM_RUN": "exp7",
        "RTDLM_ARGS": "--max-steps 1234 --set optimizer.learning_rate=3e-4",
    }
    args, cfg = trainer_config(name, env)
    assert cfg.preset == "medium" and str(args.run_dir) == "/runs/exp7"
    assert cfg.train.max_steps == 1234 and cfg.optimizer.learning_rate == pytest.approx(3e-4)


@pytest.mark.parametrize("name", TRAINERS)
def test_prometheus_reaches_each_trainer_as_its_scrape_target(name: str) -> None:
    svc = service(name)
    _, cfg = trainer_config(name)
    targets = [
        target
        for job in prometheus_config()["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets, "prometheus-compose.yml scrapes nothing"
    for target in targets:
        host, port = host_port(target)
        assert host in svc["networks"]["default"]["aliases"], f"{name} is not {host} on the network"
        assert port == cfg.metrics.port
    assert any(p.endswith(f":{cfg.metrics.port}") for p in svc["ports"])


def test_the_healthcheck_fetches_the_metrics_endpoint(tmp_path: Path) -> None:
    test = service("training")["healthcheck"]["test"]
    assert service("training-cpu")["healthcheck"] == service("training")["healthcheck"]
    assert test[0] == "CMD-SHELL" and len(test) == 2
    command = test[1]
    assert command.startswith("/opt/rtdlm/venv/bin/python ")  # the image has no curl
    url = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", command)
    assert url is not None and int(url[1]) == trainer_config("training")[1].metrics.port
    # Run it against a real exporter: this Python for the image's, the live port for 8000.
    server = start_server(CollectorRegistry(), "127.0.0.1", 0)
    local = command.replace("/opt/rtdlm/venv/bin/python", shlex.quote(sys.executable), 1)
    local = local.replace(url[0], f"http://127.0.0.1:{server.port}/metrics")
    try:
        up = subprocess.run(["/bin/sh", "-c", local], capture_output=True, timeout=30, check=False)
    finally:
        server.close()
    down = subprocess.run(["/bin/sh", "-c", local], capture_output=True, timeout=30, check=False)
    assert up.returncode == 0, up.stderr
    assert down.returncode != 0, "the healthcheck passes with no exporter"


def test_every_bind_mount_exists_and_ports_stay_on_localhost() -> None:
    services = resolved()["services"]
    declared = set(resolved()["volumes"])
    binds = 0
    for name, svc in services.items():
        for target, source in mounts(svc).items():
            if isinstance(source, Path):
                binds += 1
                assert source.exists(), f"{name}: {source} (for {target}) is not in the repo"
                assert split_volume(next(v for v in svc["volumes"] if f":{target}" in v))[2] == "ro"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
    assert binds == 5


def test_prometheus_gets_its_rules_and_alertmanager() -> None:
    svc = service("prometheus")
    config_file = flag(svc["command"], "--config.file")
    assert config_file is not None
    found = mounts(svc)
    assert found[config_file] == MONITORING / "prometheus/prometheus-compose.yml"
    config = prometheus_config()
    # rule files are relative to the config file: each must be mounted beside it
    for rule_file in config["rule_files"]:
        target = str(Path(config_file).parent / rule_file)
        assert target in found, f"{rule_file} is not mounted beside {config_file}"
        source = found[target]
        assert isinstance(source, Path) and source.name == rule_file
        assert yaml.safe_load(source.read_text())["groups"]
    assert found[str(flag(svc["command"], "--storage.tsdb.path"))] == "prometheus-data"
    # the alerting target is the alertmanager service on its port, with its config mounted
    alertmanager = service("alertmanager")
    managers = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert [host_port(t) for t in managers] == [("alertmanager", 9093)]
    assert "--web.listen-address" not in " ".join(alertmanager["command"])  # 9093: its default
    am_config = flag(alertmanager["command"], "--config.file")
    assert mounts(alertmanager)[str(am_config)] == MONITORING / "alertmanager/alertmanager.yml"
    assert "alertmanager" in svc["depends_on"]


def test_grafana_gets_its_datasource_and_dashboards() -> None:
    svc = service("grafana")
    found = mounts(svc)
    provisioning = found["/etc/grafana/provisioning"]
    assert isinstance(provisioning, Path) and provisioning == MONITORING / "grafana/provisioning"
    datasource_file = provisioning / "datasources/prometheus.yml"
    datasource = yaml.safe_load(datasource_file.read_text())["datasources"][0]
    url = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert url is not None, datasource["url"]
    assert url[1] == "prometheus" and url[1] in resolved()["services"]
    assert "--web.listen-address" not in " ".join(service("prometheus")["command"])
    assert int(url[2]) == 9090  # Prometheus' default listen port
    assert "prometheus" in svc["depends_on"]
    provider_file = provisioning / "dashboards/rtdlm.yml"
    provider = yaml.safe_load(provider_file.read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboards = found[provider["options"]["path"]]
    assert isinstance(dashboards, Path) and (dashboards / "rtdlm-training.json").exists()
    assert found["/var/lib/grafana"] == "grafana-data"
