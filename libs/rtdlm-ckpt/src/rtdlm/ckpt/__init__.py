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
from rtdlm.ckpt.paths import (
    NotALocalPathError,
    StoragePathError,
    download,
    is_remote,
    kvstore,
    local_path,
    storage_path,
    upload,
)
from rtdlm.ckpt.quiet import one_line
from rtdlm.ckpt.quiet import unreachable as storage_unreachable
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
    "StoragePathError",
    "committed_steps",
    "download",
    "git_revision",
    "is_remote",
    "kvstore",
    "local_path",
    "one_line",
    "package_versions",
    "restore_params",
    "retained_steps",
    "set_aside_steps",
    "storage_path",
    "storage_unreachable",
    "upload",
]
