"""A step's ceiling on the CPU: the time its own matrix products take when each runs alone.

Every dot_general in the step's jaxpr (the backward pass included, loops multiplied out) is
compiled on its own with the same operand shapes, dtypes, dimensions and accumulation type,
and timed; the ceiling is the sum over the step. A step can only approach it, never beat it,
by keeping everything between the dots (norms, softmax, casts, the optimizer) short: the
ceiling over the step time is how much of the step the dots are.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from rtdlm.metrics import best_seconds


class Dot(NamedTuple):
    lhs: jax.ShapeDtypeStruct
    rhs: jax.ShapeDtypeStruct
    dimensions: Any  # lax.dot_general's dimension_numbers
    accumulate: Any  # preferred_element_type, or None

    @property
    def flops(self) -> int:
        (contract, _), (batch, _) = self.dimensions
        size = np.prod([self.lhs.shape[d] for d in contract], dtype=np.int64)
        out = np.prod(self.lhs.shape, dtype=np.int64) // size
        free_rhs = np.prod(self.rhs.shape, dtype=np.int64) // size
        free_rhs //= np.prod([self.lhs.shape[d] for d in batch], dtype=np.int64)
        return int(2 * out * free_rhs * size)


def _jaxprs(params: dict[str, Any]) -> Iterator[core.Jaxpr]:
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def dots(jaxpr: core.Jaxpr, times: int = 1) -> collections.Counter[Dot]:
    """Every dot_general in the jaxpr and the jaxprs inside it, counted with how often it runs
    (a scan's body `length` times; a loop of unknown trip count once)."""
    found: collections.Counter[Dot] = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            avals: list[Any] = [v.aval for v in eqn.invars]
            lhs, rhs = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals)
            params = eqn.params
            found[Dot(lhs, rhs, params["dimension_numbers"], params["preferred_element_type"])] += (
                times
            )
            continue
        repeat = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
        for inner in _jaxprs(eqn.params):
            found.update(dots(inner, repeat))
    return found


def _product(dot: Dot) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a, b, dot.dimensions, preferred_element_type=dot.accumulate)

    return jax.jit(product)


def _operand(spec: jax.ShapeDtypeStruct, seed: int) -> jax.Array:
    values = np.random.default_rng(seed).standard_normal(spec.shape, np.float32)
    return jnp.asarray(values, spec.dtype)


class Ceiling:
    """The dots of step(*args), each compiled alone and timed once per `sample`; the ceiling
    is the sum of each one's best time so far, times how often the step runs it. Sampling
    between the steps it is compared with spreads its samples over the machine's swings."""

    def __init__(self, step: Callable[..., Any], *args: Any) -> None:
        found = dots(jax.make_jaxpr(step)(*args).jaxpr)
        self.entries = []
        for i, (dot, count) in enumerate(found.items()):
            product, a, b = _product(dot), _operand(dot.lhs, 2 * i), _operand(dot.rhs, 2 * i + 1)
            jax.block_until_ready(product(a, b))  # compiled here, not in a sample
            self.entries.append((dot, count, product, a, b))
        self.best = [float("inf")] * len(self.entries)
        self.flops = sum(count * dot.flops for dot, count, *_ in self.entries)

    def sample(self, repeats: int = 2) -> None:
        for i, (_, _, product, a, b) in enumerate(self.entries):
            seconds = best_seconds(product, a, b, repeats=repeats, warm=False)
            self.best[i] = min(self.best[i], seconds)

    @property
    def seconds(self) -> float:
        return sum(e[1] * s for e, s in zip(self.entries, self.best, strict=True))
