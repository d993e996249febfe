"""The run rtdlm-train's tests train unless a test needs another: the tiny preset at one layer
of d_model 32 on 32-token rows, so a step compiles and runs in a moment, and every test file
compiles the same shapes (which a test run's shared compilation cache then serves)."""

from rtdlm.train import RunConfig, resolve

SMALL = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2"]
SMALL += ["model.seq_len=32", "model.d_ff=64", "metrics.enabled=false"]


def small_config(*sets: str) -> RunConfig:
    """SMALL with `sets` on top (later ones win), over a byte vocabulary."""
    return resolve("tiny", sets=[*SMALL, *sets], vocab_size=256)
