"""rtdlm.ckpt: training checkpoints on orbax and tensorstore that never lose work."""

from rtdlm.ckpt.manager import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointSaveError,
    CorruptCheckpointError,
    NoIntactCheckpointError,
    SaveInfo,
    committed_steps,
    git_revision,
    package_versions,
    restore_params,
    set_aside_steps,
)
from rtdlm.ckpt.paths import NotALocalPathError, local_path
from rtdlm.ckpt.retention import Retention, retained_steps

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "NoIntactCheckpointError",
    "NotALocalPathError",
    "Retention",
    "SaveInfo",
    "committed_steps",
    "git_revision",
    "local_path",
    "package_versions",
    "restore_params",
    "retained_steps",
    "set_aside_steps",
]
