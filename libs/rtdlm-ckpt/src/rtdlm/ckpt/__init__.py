"""rtdlm.ckpt: checkpoints of training state on orbax and tensorstore."""

from rtdlm.ckpt.checkpoints import CheckpointError, latest_step, restore, save

__all__ = ["CheckpointError", "latest_step", "restore", "save"]
