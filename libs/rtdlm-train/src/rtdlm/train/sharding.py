"""The device mesh, and the one table that maps logical axes to it.

Parameters and activations name their dimensions (rtdlm.model.partitioning); RULES says which
mesh axes split each name. Data parallel, FSDP, tensor and expert parallelism, and any mix of
them, are mesh shapes over this one table: the model code never changes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rtdlm.model import ModelConfig, build_with_stats, memory_estimate, params_axes
from rtdlm.train.config import ConfigError, MeshConfig, RunConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH = ("data", "fsdp", "expert")  # every axis that does not split the model splits the batch

RULES: dict[str, tuple[str, ...]] = {
    # parameters, and the optimizer state shaped like them
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "layers": (),
    # activations
    "batch": BATCH,
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_expert": ("expert",),
}


def mesh_shape(cfg: MeshConfig, devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved, or one ConfigError line saying what fits `devices`."""
    sizes = {name: getattr(cfg, name) for name in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    for name, size in sizes.items():
        if size == -1:
            sizes[name] = devices // fixed if devices % fixed == 0 else 0
    if math.prod(sizes.values()) != devices:
        asked = ", ".join(f"{k}={getattr(cfg, k)}" for k in MESH_AXES)
        raise ConfigError(
            f"mesh {asked} does not fit the {devices} device(s) of this job: make the product "
            f"of mesh.data, mesh.fsdp, mesh.tensor and mesh.expert {devices}, or set one to -1"
        )
    return sizes


def make_mesh(cfg: RunConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """The job's mesh (every device of every process), checked against the model and batch."""
    devices = jax.devices() if devices is None else devices
    shape = checked_shape(cfg, len(devices))
    grid = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def checked_shape(cfg: RunConfig, devices: int) -> dict[str, int]:
    """The mesh shape for `devices`, once the batch and every parameter split evenly over it:
    one ConfigError line naming the first thing that does not, instead of an XLA error."""
    shape = mesh_shape(cfg.mesh, devices)
    batch_shards = math.prod(shape[axis] for axis in BATCH)
    rows = cfg.data.batch_size // cfg.data.micro_batches
    if rows % batch_shards:
        raise ConfigError(
            f"a micro-batch of {rows} sequences (data.batch_size / data.micro_batches) does not "
            f"split over the {batch_shards} batch shards of mesh data*fsdp*expert: use a "
            f"multiple of {batch_shards}"
        )
    check_divisible(cfg, shape)
    return shape


def spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """Logical names -> a PartitionSpec by RULES (names RULES lacks are an error)."""
    parts = [RULES[name] if name is not None else () for name in axes]
    used = [axis for part in parts for axis in part]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {axes} use a mesh axis twice under RULES")
    return PartitionSpec(*(part if part else None for part in parts))


def to_sharding(mesh: Mesh) -> Any:
    """For rtdlm.model.axis_rules: activation names -> their NamedSharding on `mesh`."""
    return lambda axes: NamedSharding(mesh, spec(axes))


def param_shardings(mesh: Mesh, params: Any) -> Any:
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, spec(axes)),
        params_axes(params),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def state_shardings(mesh: Mesh, optimizer: optax.GradientTransformation, state: Any) -> Any:
    """Shardings for a TrainState (of arrays or shapes): the optimizer's moments follow their
    parameters, its counters and the scalars are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(mesh, state.params)
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return type(state)(replicated, params, opt_state, replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH, None))


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds to train `cfg` on a mesh: what --dry-run prints."""

    params: int  # this device's shards of the float32 parameters
    optimizer: int  # AdamW's two moments, sharded like the parameters
    gradients: int  # likewise, while the step runs
    gathered: int  # FSDP: parameters gathered whole (all at once; per scan step if scanned)
    activations: int  # this device's rows of a micro-batch, kept for the backward pass

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.gathered + self.activations


def device_memory(cfg: RunConfig, shape: dict[str, int]) -> DeviceMemory:
    """Per-device memory from the config and the mesh shape alone (no devices needed), by the
    same RULES the step is compiled with. Conservative: activations split by `tensor` are not
    credited (tests hold it to the compiled program's memory_analysis)."""
    shapes = _param_shapes(cfg.model)
    params = gathered = 0
    for module, leaves in params_axes(shapes).items():
        for name, axes in leaves.items():
            size = 4 * math.prod(shapes[module][name].shape)
            split = [a for name_ in axes if name_ is not None for a in RULES[name_]]
            params += size // math.prod(shape[a] for a in split)
            whole = size // math.prod(shape[a] for a in split if a != "fsdp")
            # scanned layers are gathered one scan step at a time
            gathered += whole // shapes[module][name].shape[0] if axes[0] == "layers" else whole
    batch_shards = math.prod(shape[axis] for axis in BATCH)
    rows = cfg.data.batch_size // cfg.data.micro_batches
    activations = memory_estimate(cfg.model, rows).activations // batch_shards
    return DeviceMemory(
        params=params,
        optimizer=2 * params,
        gradients=params,
        gathered=gathered if shape["fsdp"] > 1 else 0,
        activations=activations,
    )


@functools.lru_cache(maxsize=16)
def _param_shapes(model: ModelConfig) -> Any:
    """Traced once per model config: the planner asks for every batch size it tries."""
    return jax.eval_shape(
        lambda: build_with_stats(model).init(
            jax.random.PRNGKey(0), jax.numpy.zeros((1, 1), jax.numpy.int32)
        )
    )


def check_divisible(cfg: RunConfig, shape: dict[str, int]) -> None:
    """Every sharded parameter dimension must split evenly over its mesh axes."""
    shapes = _param_shapes(cfg.model)
    for module, leaves in params_axes(shapes).items():
        for name, axes in leaves.items():
            for size, logical in zip(shapes[module][name].shape, axes, strict=True):
                parts = RULES[logical] if logical is not None else ()
                shards = math.prod(shape[axis] for axis in parts)
                if size % shards:
                    raise ConfigError(
                        f"parameter {module}/{name} has a {logical} dimension of {size}, which "
                        f"does not split over mesh {'*'.join(parts)} = {shards}: choose mesh "
                        "sizes that divide the model's dimensions"
                    )
