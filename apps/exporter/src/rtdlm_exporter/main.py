"""`exporter`: turn a training checkpoint into a deployable INT8 weight file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from rtdlm import ckpt
from rtdlm.export import QuantizedTensor, dequantize_params, nbytes, quantize_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exporter", description="Quantize a trained RT-DLM checkpoint's weights to INT8."
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoints/ dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--output", type=Path, required=True, help="the .npz file to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    return parser.parse_args(argv)


def flatten(tree: object) -> dict[str, np.ndarray]:
    """Named arrays for an .npz: a QuantizedTensor becomes NAME.int8 and NAME.scale."""
    arrays: dict[str, np.ndarray] = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )[0]
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if isinstance(leaf, QuantizedTensor):
            arrays[f"{name}.int8"], arrays[f"{name}.scale"] = leaf.values, leaf.scale
        else:
            arrays[name] = np.asarray(leaf)
    return arrays


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output.exists() and not args.force:
        print(f"exporter: error: {args.output} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        checkpoint = ckpt.restore_params(args.checkpoint, args.step)
    except ckpt.CheckpointError as error:
        print(f"exporter: error: {error}", file=sys.stderr)
        return 2
    step, params = checkpoint.step, checkpoint.params
    quantized = quantize_params(params)
    max_error = max(
        float(np.abs(np.asarray(a) - b).max())
        for a, b in zip(
            jax.tree_util.tree_leaves(params),
            jax.tree_util.tree_leaves(dequantize_params(quantized)),
            strict=False,
        )
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "wb") as f:
        np.savez(f, allow_pickle=False, **flatten(quantized))
    print(
        f"exported step {step}: {nbytes(params):,} -> {nbytes(quantized):,} bytes "
        f"({nbytes(params) / nbytes(quantized):.2f}x smaller), "
        f"max abs weight error {max_error:.2e}, written to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
