"""Which checkpoints survive a save: the last N, every K-th step and the best B by a metric.

The rules are a union, so no rule evicts what another keeps, and applying them after every
save keeps exactly what applying them once to the whole history would (the property test
checks this): a checkpoint that falls out of the best B never re-enters it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Metrics = Mapping[str, Any] | None


@dataclass(frozen=True)
class Retention:
    keep_last: int = 3
    keep_every: int | None = None
    keep_best: int = 0
    best_metric: str = "eval_loss"
    best_mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"keep_last={self.keep_last}: keep at least the newest checkpoint")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every={self.keep_every}: use a positive step interval or None")
        if self.keep_best < 0:
            raise ValueError(f"keep_best={self.keep_best}: use 0 (off) or a positive count")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={self.best_mode!r}: use 'min' or 'max'")


def _score(metrics: Metrics, retention: Retention) -> float | None:
    value = (metrics or {}).get(retention.best_metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if retention.best_mode == "min" else -float(value)


def _ranked(history: Sequence[tuple[int, Metrics]], retention: Retention) -> list[int]:
    """Steps with a finite metric, best first; ties favour later steps."""
    scored = [
        (score, -step, step)
        for step, metrics in history
        if (score := _score(metrics, retention)) is not None
    ]
    return [step for _, _, step in sorted(scored)]


def best_of(history: Sequence[tuple[int, Metrics]], retention: Retention) -> int | None:
    """The step of `history` that keep_best ranks first, or None if none has the metric."""
    ranked = _ranked(history, retention)
    return ranked[0] if ranked else None


def retained_steps(history: Sequence[tuple[int, Metrics]], retention: Retention) -> frozenset[int]:
    """Steps to keep of `history`, (step, metrics) pairs; metric ties favour later steps."""
    steps = sorted(step for step, _ in history)
    keep = set(steps[-retention.keep_last :])
    if retention.keep_every is not None:
        keep.update(step for step in steps if step % retention.keep_every == 0)
    if retention.keep_best:
        keep.update(_ranked(history, retention)[: retention.keep_best])
    return frozenset(keep)


@dataclass(frozen=True)
class PreservationPolicy:
    """`retained_steps` in the shape of orbax's preservation-policy protocol."""

    retention: Retention

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        keep = retained_steps([(c.step, c.metrics) for c in checkpoints], self.retention)
        return [c.step in keep for c in checkpoints]
