"""Pants' docker backend and its hadolint linter, without the `run` goal for images.

With `docker_image` runnable, `./pants run apps/trainer` would name three runnable targets (the
trainer PEX and its images) and refuse to pick. Images are run with docker or podman instead.
"""

from pants.backend.docker.goals import package_image, publish
from pants.backend.docker.goals.tailor import rules as tailor_rules
from pants.backend.docker.lint.hadolint import skip_field
from pants.backend.docker.lint.hadolint.rules import rules as hadolint_rules
from pants.backend.docker.subsystems import dockerfile_parser
from pants.backend.docker.target_types import DockerImageTarget
from pants.backend.docker.target_types import rules as target_types_rules
from pants.backend.docker.util_rules import (
    dependencies,
    docker_binary,
    docker_build_args,
    docker_build_context,
    docker_build_env,
    dockerfile,
)


def target_types():
    return [DockerImageTarget]


def rules():
    return [
        *dependencies.rules(),
        *docker_binary.rules(),
        *docker_build_args.rules(),
        *docker_build_context.rules(),
        *docker_build_env.rules(),
        *dockerfile.rules(),
        *dockerfile_parser.rules(),
        *package_image.rules(),
        *publish.rules(),
        *tailor_rules(),
        *target_types_rules(),
        *hadolint_rules(),
        *skip_field.rules(),
    ]
