"""Checkpoint save/restore throughput as a fraction of this machine's raw file I/O speed.

Run: ./pants run libs/rtdlm-ckpt/benchmarks:bench -- [--params 124e6] [--rounds 3]

The tree is a GPT-2-small-shaped transformer (about 124M float32 parameters) with its Adam
moments, 1.5 GB in all. Disk and CPU speed drift between runs, so every round also writes and
reads the same bytes with plain fsync'ed file I/O right beside the checkpoint, alternating
the two, and reports ratios; the medians are the numbers to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from rtdlm.ckpt import CheckpointManager, Retention


def transformer_tree(target_params: float, seed: int = 0) -> dict:
    """Embedding plus 12 blocks at d_model 768 (GPT-2 small), scaled to `target_params`."""
    layers, vocab = 12, 50304
    d = 768
    while d > 64 and (vocab * d + layers * 12 * d * d) > target_params:
        d //= 2
    g = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return g.standard_normal(shape, dtype=np.float32) * 0.02

    blocks = {
        f"block_{i}": {
            "attn": {"qkv": weights(d, 3 * d), "out": weights(d, d)},
            "mlp": {"up": weights(d, 4 * d), "down": weights(4 * d, d)},
            "norm": {"attn": np.ones(d, np.float32), "mlp": np.ones(d, np.float32)},
        }
        for i in range(layers)
    }
    return {"embed": weights(vocab, d), **blocks}


def adam_state(params: dict) -> dict:
    """Adam's moments, random rather than zeros: zeros would compress to nothing."""
    g = np.random.default_rng(1)
    return {
        "mu": jax.tree.map(lambda p: g.standard_normal(p.shape, dtype=np.float32) * 1e-3, params),
        "nu": jax.tree.map(lambda p: np.abs(g.standard_normal(p.shape, dtype=np.float32)), params),
        "count": np.asarray(1000, np.int32),
    }


def raw_write(arrays: list[np.ndarray], directory: Path) -> float:
    """Seconds to write every array to its own file and fsync it, as tensorstore does."""
    directory.mkdir(parents=True)
    start = time.perf_counter()
    for i, array in enumerate(arrays):
        with open(directory / f"{i}.bin", "wb") as f:
            f.write(np.ascontiguousarray(array).data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(arrays: list[np.ndarray], directory: Path) -> float:
    """Seconds to read every array into new memory, all held to the end as a restore holds them
    (reading each into the pages the one before freed would time copies into warm memory)."""
    start = time.perf_counter()
    read = [np.empty_like(array) for array in arrays]
    for i, out in enumerate(read):
        with open(directory / f"{i}.bin", "rb") as f:
            f.readinto(out.data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=124e6, help="approximate parameter count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: temp)")
    args = parser.parse_args()

    params = jax.tree.map(jax.numpy.asarray, transformer_tree(args.params))
    opt_state = jax.tree.map(jax.numpy.asarray, adam_state(transformer_tree(args.params)))
    leaves = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_bytes = sum(x.nbytes for x in leaves)
    print(f"tree: {n_params / 1e6:.1f}M parameters + Adam moments = {n_bytes / 1e9:.2f} GB")

    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    rows = []
    try:
        for r in range(args.rounds):
            raw_dir, ckpt_dir = scratch / f"raw{r}", scratch / f"ckpt{r}"
            write_s = raw_write(leaves, raw_dir)
            with CheckpointManager(ckpt_dir, Retention(keep_last=1)) as manager:
                start = time.perf_counter()
                info = manager.save(1, params=params, opt_state=opt_state, data_state={"r": r})
                manager.wait()
                save_s = time.perf_counter() - start
                start = time.perf_counter()
                manager.restore(params=params, opt_state=opt_state)
                restore_s = time.perf_counter() - start
                start = time.perf_counter()
                manager.restore(params=params, opt_state=opt_state, verify=False)
                unverified_s = time.perf_counter() - start
            # The restores read what the save left in the page cache, while fsync'ed plain files
            # can come back from the disk, far slower than from cache: read them once first.
            raw_read(leaves, raw_dir)
            read_s = raw_read(leaves, raw_dir)
            stored = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
            shutil.rmtree(raw_dir)
            shutil.rmtree(ckpt_dir)
            row = {
                "raw write GB/s": n_bytes / write_s / 1e9,
                "save GB/s": n_bytes / save_s / 1e9,
                "save / raw write": write_s / save_s,
                "async blocking s": info.blocking_seconds,
                "blocking / save": info.blocking_seconds / save_s,
                "raw read GB/s": n_bytes / read_s / 1e9,
                "restore GB/s": n_bytes / restore_s / 1e9,
                "restore / raw read": read_s / restore_s,
                "restore unverified / raw read": read_s / unverified_s,
                "stored / array bytes": stored / n_bytes,
            }
            rows.append(row)
            print(f"round {r + 1}: " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("median over rounds:")
    for key in rows[0]:
        print(f"  {key:32s} {statistics.median(row[key] for row in rows):.3f}")


if __name__ == "__main__":
    main()
