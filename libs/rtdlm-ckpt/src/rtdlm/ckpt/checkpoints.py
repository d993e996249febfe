"""Checkpoints of arbitrary pytrees through orbax's CheckpointManager (tensorstore storage).

Nothing is pickled: restoring reads arrays and JSON, never code.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used, with the reason and the fix."""


def save(directory: str | os.PathLike[str], step: int, tree: PyTree) -> None:
    """Writes `tree` as checkpoint `step` under `directory` and waits until it is complete."""
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    if not os.path.isdir(directory):
        return None
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        return manager.latest_step()


def restore(
    directory: str | os.PathLike[str], step: int | None = None, target: PyTree = None
) -> tuple[int, PyTree]:
    """(step, tree) of checkpoint `step` (default: the newest), shaped like `target` if given."""
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"no checkpoint directory at {directory}: pass the run's checkpoints/"
        )
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(
                f"no complete checkpoint {'' if step is None else step} in {directory}: "
                f"available steps are {sorted(manager.all_steps()) or 'none'}"
            )
        args = (
            ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        )
        return step, manager.restore(step, args=args)
