"""Subprocess side of the kill, resume and resharding tests: it must run in its own process
so it can be SIGKILLed mid-save, or start JAX with a different number of devices."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from rtdlm.ckpt import CheckpointManager, CheckpointSaveError, Retention, integrity


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# -- a small training loop whose every input comes from the checkpointed state ---------------

optimizer = optax.adamw(3e-2, weight_decay=0.1)


def init(seed: int) -> tuple[dict, optax.OptState, jax.Array]:
    k1, k2, rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "hidden": {"w": jax.random.normal(k1, (8, 32)) * 0.3, "b": jnp.zeros(32)},
        "out": {"w": jax.random.normal(k2, (32, 1)) * 0.3},
    }
    return params, optimizer.init(params), rng


def batch(seed: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `position` of an endless stream, like a resumable data iterator."""
    g = np.random.default_rng([seed, position])
    x = g.standard_normal((16, 8)).astype(np.float32)
    return x, np.sin(x.sum(axis=1, keepdims=True))


@partial(jax.jit, donate_argnums=(0, 1))
def train_step(
    params: dict, opt_state: optax.OptState, rng: jax.Array, x: np.ndarray, y: np.ndarray
) -> tuple[dict, optax.OptState, jax.Array, jax.Array]:
    rng, noise_key = jax.random.split(rng)

    def loss_fn(p: dict) -> jax.Array:
        h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
        keep = jax.random.bernoulli(noise_key, 0.9, h.shape)  # dropout: uses the RNG state
        return jnp.mean((jnp.where(keep, h / 0.9, 0.0) @ p["out"]["w"] - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rng, loss


def train(args: argparse.Namespace) -> None:
    params, opt_state, rng = init(args.seed)
    position = 0
    with CheckpointManager(args.dir, Retention(keep_last=2)) as manager:
        if manager.latest_step() is not None:
            ckpt = manager.restore_latest(params=params, opt_state=opt_state)
            assert ckpt.rng is not None
            params, opt_state, rng = ckpt.params, ckpt.opt_state, ckpt.rng
            position = ckpt.data_state["position"]
            print(f"resumed at step {ckpt.step}", flush=True)
        for step in range(position + 1, args.steps + 1):
            x, y = batch(args.seed, position)
            params, opt_state, rng, _ = train_step(params, opt_state, rng, x, y)
            position += 1
            manager.save(
                step, params=params, opt_state=opt_state, rng=rng, data_state={"position": position}
            )
            if step == args.die_after:
                die()  # the save of this step is in flight
    leaves = jax.tree_util.tree_leaves_with_path((params, opt_state, rng))
    arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
    np.savez(args.out, allow_pickle=False, **arrays)


# -- saving forever, to be killed at any moment ------------------------------------------------


def content(step: int) -> dict:
    """What checkpoint `step` must hold, recomputable by the test from the step alone."""
    g = np.random.default_rng(step)
    return {
        "w": g.standard_normal((1024, 2048), dtype=np.float32),
        "v": np.full((512, 1024), step, np.float32),
        "step": np.asarray(step, np.int64),
    }


def spin(args: argparse.Namespace) -> None:
    """Saves steps 1, 2, 3, ... until killed; prints "ready" once step 2 is committed."""
    armed = False
    write_manifest = integrity.write_manifest

    def sealing(
        step_dir: epath.Path,
    ) -> None:  # deterministic kill points inside orbax's commit window
        if armed and args.die_in == "manifest":
            (step_dir / integrity.MANIFEST).write_text('{"format": 1, "fil')
            die()
        write_manifest(step_dir)
        if armed and args.die_in == "after-manifest":
            die()

    integrity.write_manifest = sealing
    with CheckpointManager(args.dir, Retention(keep_last=2)) as manager:
        step = manager.latest_step() or 0
        while True:
            step += 1
            manager.save(step, params=jax.tree.map(jnp.asarray, content(step)))
            if step == 2:
                manager.wait()
                print("ready", flush=True)
                armed = True


# -- resharding: save on 8 devices, restore on 1 and on 4 --------------------------------------


def reshard_tree() -> dict:
    g = np.random.default_rng(7)
    return {
        "w": g.standard_normal((16, 8), dtype=np.float32),
        "b": np.arange(8, dtype=np.float32),
        "nested": {"emb": g.standard_normal((32, 4), dtype=np.float32)},
    }


def reshard_specs() -> dict:
    from jax.sharding import PartitionSpec as P

    return {"w": P("data", "model"), "b": P("model"), "nested": {"emb": P("data", None)}}


def mesh_for(shape: tuple[int, int]) -> jax.sharding.Mesh:
    devices = np.asarray(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    return jax.sharding.Mesh(devices, ("data", "model"))


def reshard(args: argparse.Namespace) -> None:
    mesh = mesh_for((4, 2) if args.action == "save" else (2, 2))
    shardings = jax.tree.map(
        lambda spec: jax.sharding.NamedSharding(mesh, spec),
        reshard_specs(),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    expected = reshard_tree()
    if args.action == "save":
        tree = jax.tree.map(jax.device_put, expected, shardings)
        assert len(tree["w"].sharding.device_set) == 8
        with CheckpointManager(args.dir) as manager:
            manager.save(1, params=tree, opt_state={"mu": tree})
        print("saved on 8 devices", flush=True)
        return
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), expected, shardings
    )
    with CheckpointManager(args.dir, read_only=True) as manager:
        ckpt = manager.restore(params=target, opt_state={"mu": target})
    assert ckpt.opt_state is not None
    for got in (ckpt.params, ckpt.opt_state["mu"]):
        for x, want, sharding in zip(
            jax.tree.leaves(got), jax.tree.leaves(expected), jax.tree.leaves(shardings), strict=True
        ):
            assert x.sharding == sharding, (x.sharding, sharding)
            np.testing.assert_array_equal(np.asarray(x), want)
    print(f"restored onto {len(jax.devices())} devices", flush=True)


# -- a full disk: one save fits, the next does not, then space comes back ---------------------

FITS = (256, 1024)  # 1 MiB of float32
DOES_NOT_FIT = (1024, 1024)  # 4 MiB


def disk_params(step: int, shape: tuple[int, int]) -> dict:
    """Random, so tensorstore's compression cannot make it fit."""
    return {"w": np.random.default_rng(step).standard_normal(shape, dtype=np.float32)}


def fill(directory: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on `directory`'s filesystem."""
    filler = directory / "filler"
    usage = os.statvfs(directory)
    with filler.open("wb") as f:
        f.write(b"\1" * max(usage.f_bavail * usage.f_frsize - leave, 0))
    return filler


def poll_until_failed(manager: CheckpointManager, step: int) -> CheckpointSaveError:
    """What a training loop does: ask committed() every step until the save resolves."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if manager.committed() == step:
                raise AssertionError(f"step {step} was saved on a full disk")
        except CheckpointSaveError as error:
            return error
        time.sleep(0.01)
    raise AssertionError(f"step {step} neither failed nor committed in 120 s")


def full_disk(args: argparse.Namespace) -> None:
    """Saves step 10, fills the disk (or lowers RLIMIT_FSIZE), saves step 20, which fails,
    frees the space and saves step 30; prints the error as a trainer would, then a JSON
    report. The test reads this process's whole stderr."""
    directory = Path(args.dir) / "checkpoints"
    if args.fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    report: dict = {}
    with CheckpointManager(directory, Retention(keep_last=1)) as manager:
        manager.save(10, params=disk_params(10, FITS), opt_state={"mu": disk_params(11, FITS)})
        manager.wait()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if args.fsize_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, hard))
        else:
            filler = fill(Path(args.dir), leave=2 * 2**20)
        big = disk_params(20, DOES_NOT_FIT)
        manager.save(20, params=big, opt_state={"mu": big, "nu": big})
        error = poll_until_failed(manager, 20)
        print(f"trainer: checkpoint error: {error}", flush=True)
        report["error"] = {
            "step": error.step,
            "path": str(error.path),
            "free_bytes": error.free_bytes,
            "last_good": error.last_good,
            "errno": error.errno,
        }
        report["left_after_failure"] = sorted(p.name for p in directory.iterdir())
        report["restored"] = manager.restore(10).step
        if args.fsize_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        else:
            filler.unlink()
        manager.save(30, params=big, opt_state={"mu": big, "nu": big})
        manager.wait()
        report["steps"] = manager.steps()
    print(json.dumps(report), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--dir", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--die-after", type=int)
    t.add_argument("--out")
    s = sub.add_parser("spin")
    s.add_argument("--dir", required=True)
    s.add_argument("--die-in", choices=["manifest", "after-manifest"])
    r = sub.add_parser("reshard")
    r.add_argument("action", choices=["save", "restore"])
    r.add_argument("--dir", required=True)
    f = sub.add_parser("full-disk")
    f.add_argument("--dir", required=True)
    f.add_argument("--fsize-limit", type=int, help="RLIMIT_FSIZE instead of filling the disk")
    args = parser.parse_args()
    commands = {"train": train, "spin": spin, "reshard": reshard, "full-disk": full_disk}
    commands[args.command](args)


if __name__ == "__main__":
    main()
