"""Logical axis names for every parameter and the activations between layers.

The model names dimensions (embed, heads, mlp, ...); whoever owns a device mesh maps the names
to mesh axes (rtdlm.train.sharding holds that table). Without an active mapping, `constrain`
does nothing, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax

Axes = tuple[str | None, ...]
# a mapping from logical names to what jax.lax.with_sharding_constraint takes, for one mesh
ToSharding = Callable[[Axes], Any]

_active: contextvars.ContextVar[ToSharding | None] = contextvars.ContextVar(
    "rtdlm_axis_rules", default=None
)

# (module's last name, parameter name) -> logical axes, without the leading stacked layer axis
PARAM_AXES: dict[tuple[str, str], Axes] = {
    ("embed", "embeddings"): ("vocab", "embed"),
    ("unembed", "w"): ("embed", "vocab"),
    ("query", "w"): ("embed", "heads"),
    ("key", "w"): ("embed", "kv_heads"),
    ("value", "w"): ("embed", "kv_heads"),
    ("out", "w"): ("heads", "embed"),
    ("gate", "w"): ("embed", "mlp"),
    ("up", "w"): ("embed", "mlp"),
    ("down", "w"): ("mlp", "embed"),
    ("router", "w"): ("embed", None),
    ("moe", "w_gate"): ("expert", "embed", "mlp"),
    ("moe", "w_up"): ("expert", "embed", "mlp"),
    ("moe", "w_down"): ("expert", "mlp", "embed"),
}


def param_axes(module: str, name: str, ndim: int) -> Axes:
    """Logical axes of one parameter; a leading axis beyond the table's is the layer stack."""
    base: Axes = (None,) if name == "scale" else PARAM_AXES.get((module.split("/")[-1], name), ())
    if not base or ndim < len(base) or ndim > len(base) + 1:
        raise ValueError(f"no logical axes for parameter {module}/{name} of rank {ndim}")
    return ("layers", *base) if ndim > len(base) else base


def params_axes(params: Any) -> Any:
    """The logical axes of every parameter, as a tree shaped like `params` (shapes suffice)."""
    return {
        module: {name: param_axes(module, name, len(value.shape)) for name, value in leaves.items()}
        for module, leaves in params.items()
    }


@contextlib.contextmanager
def axis_rules(to_sharding: ToSharding) -> Iterator[None]:
    """While tracing inside this context, `constrain` places activations by `to_sharding`."""
    token = _active.set(to_sharding)
    try:
        yield
    finally:
        _active.reset(token)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Pins activation `x`'s layout by the logical names of its dimensions, if a mesh is set."""
    to_sharding = _active.get()
    if to_sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, to_sharding(axes))
