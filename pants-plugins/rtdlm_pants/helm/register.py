"""Pants' helm backend without its helm-unittest plugin.

`pants.backend.experimental.helm` installs the helm-unittest plugin from GitHub before it runs
any helm command, lint and package included. Our chart is tested by pytest (tests/
test_helm_chart.py renders it and checks the objects against Kubernetes' schemas), so nothing
needs the plugin, and leaving it out keeps `package`, `lint` and `publish` of the chart working
where only PyPI, npm and Debian are reachable.
"""

from pants.backend.helm.dependency_inference import deployment
from pants.backend.helm.goals import deploy, lint, package, publish, tailor
from pants.backend.helm.target_types import (
    HelmArtifactTarget,
    HelmChartTarget,
    HelmDeploymentTarget,
)
from pants.backend.helm.target_types import rules as target_types_rules


def target_types():
    return [HelmArtifactTarget, HelmChartTarget, HelmDeploymentTarget]


def rules():
    return [
        *lint.rules(),
        *deploy.rules(),
        *deployment.rules(),
        *package.rules(),
        *publish.rules(),
        *tailor.rules(),
        *target_types_rules(),
    ]
