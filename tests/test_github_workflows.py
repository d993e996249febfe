"""The GitHub workflows parse and keep the promises the README makes about them."""

from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOWS = Path(".github/workflows")


def load(name: str) -> dict[Any, Any]:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(workflow, dict)
    return workflow


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert isinstance(on, dict)
    return on


def commands(workflow: dict[Any, Any]) -> list[str]:
    return [
        step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step
    ]


@pytest.mark.parametrize("name", ["test.yml", "lint.yml"])  # publish.yml: build-support/publish.sh
def test_workflows_call_pants_like_a_developer(name: str) -> None:
    pants_calls = [c for c in commands(load(name)) if "pants " in c]
    assert pants_calls
    assert all("./pants " in c for c in pants_calls)


def test_test_workflow_runs_every_branch_and_pr_on_both_pythons_with_coverage() -> None:
    workflow = load("test.yml")
    assert triggers(workflow)["push"]["branches"] == ["**"] and "pull_request" in triggers(workflow)
    assert workflow["jobs"]["test"]["strategy"]["matrix"]["python"] == ["3.11", "3.12"]
    assert any(c.startswith("./pants test --use-coverage '::'") for c in commands(workflow))
    # the monitoring tests need the real tools and must not skip in CI
    assert "build-support/install-monitoring-tools.sh" in commands(workflow)
    [test_step] = [s for s in workflow["jobs"]["test"]["steps"] if "pants test" in s.get("run", "")]
    assert test_step["env"]["RTDLM_REQUIRE_MONITORING_TOOLS"] == "1"
    assert test_step["env"]["RTDLM_REQUIRE_MOUNTS"] == "1"  # mounts through sudo, never skipped


def test_lint_workflow_runs_every_gate() -> None:
    joined = "\n".join(commands(load("lint.yml")))
    for gate in ("tailor --check", "lint '::'", "check '::'", "check-dependency-rules.sh"):
        assert gate in joined


def test_publish_workflow_publishes_only_what_changed() -> None:
    workflow = load("publish.yml")
    assert triggers(workflow)["push"]["branches"] == ["main"]
    assert triggers(workflow)["push"]["tags"]
    calls = [c for c in commands(workflow) if "build-support/publish.sh" in c]
    assert any("--plan" in c for c in calls) and any("--plan" not in c for c in calls)
    # the selection itself (checked on a scripted history by build-support/test-publish.sh)
    script = Path("build-support/publish.sh").read_text()
    assert "--changed-since=" in script and "--changed-dependents=transitive" in script
