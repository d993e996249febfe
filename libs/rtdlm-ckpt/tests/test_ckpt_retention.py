import tempfile

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtdlm.ckpt import CheckpointManager, Retention, retained_steps

retentions = st.builds(
    Retention,
    keep_last=st.integers(1, 4),
    keep_every=st.none() | st.integers(1, 6),
    keep_best=st.integers(0, 3),
    best_mode=st.sampled_from(["min", "max"]),
)
metrics = st.none() | st.fixed_dictionaries(
    {"eval_loss": st.floats(0, 10) | st.integers(0, 3) | st.just(float("nan"))}
)


@st.composite
def histories(draw: st.DrawFn, max_size: int = 25) -> list:
    gaps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=max_size))
    steps = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    return [(step, draw(metrics)) for step in steps]


def after_each_save(history: list, retention: Retention) -> set[int]:
    """What survives when retention runs after every save, as the manager runs it."""
    alive: list = []
    for entry in history:
        alive.append(entry)
        keep = retained_steps(alive, retention)
        alive = [e for e in alive if e[0] in keep]
    return {step for step, _ in alive}


def score(entry: tuple, retention: Retention) -> float | None:
    value = (entry[1] or {}).get("eval_loss")
    if value is None or value != value:
        return None
    return value if retention.best_mode == "min" else -value


@given(histories(), retentions)
def test_each_rule_keeps_what_it_promises_and_nothing_else_survives(
    history: list, retention: Retention
) -> None:
    """The rules as stated, step by step: a step is kept when fewer than keep_last steps came
    after it, or keep_every divides it, or it has the metric and fewer than keep_best steps beat
    it (a better score, or the same score and later)."""
    by_step = dict(history)

    def beats(other: int, step: int) -> bool:
        mine = score((step, by_step[step]), retention)
        theirs = score((other, by_step[other]), retention)
        if mine is None or theirs is None:
            return False
        return theirs < mine or (theirs == mine and other > step)

    def kept_by_the_rules(step: int) -> bool:
        later = sum(other > step for other in by_step)
        periodic = retention.keep_every is not None and step % retention.keep_every == 0
        scored = score((step, by_step[step]), retention) is not None
        beaten = sum(beats(other, step) for other in by_step if other != step)
        return later < retention.keep_last or periodic or (scored and beaten < retention.keep_best)

    assert retained_steps(history, retention) == {s for s in by_step if kept_by_the_rules(s)}
    assert max(by_step) in retained_steps(history, retention)


@given(histories(), retentions)
def test_running_after_every_save_equals_running_once_on_the_whole_history(
    history: list, retention: Retention
) -> None:
    assert after_each_save(history, retention) == retained_steps(history, retention)


@given(histories(), retentions)
def test_a_better_metric_never_evicts_a_better_checkpoint(
    history: list, retention: Retention
) -> None:
    kept = retained_steps(history, retention)
    by_step = dict(history)
    for step, m in history:
        if step in kept or score((step, m), retention) is None:
            continue
        better = [
            s
            for s in kept
            if (sc := score((s, by_step[s]), retention)) is not None
            and (sc, -s) < (score((step, m), retention), -step)
        ]
        assert len(better) >= retention.keep_best


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(max_size=8), retentions)
def test_the_manager_keeps_exactly_what_the_policy_says(
    history: list, retention: Retention
) -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        CheckpointManager(directory, retention, async_save=False) as manager,
    ):
        for step, m in history:
            manager.save(step, params={"x": jnp.full(2, step)}, metrics=m)
        assert set(manager.steps()) == retained_steps(history, retention)


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_last": 0}, {"keep_every": 0}, {"keep_best": -1}, {"best_mode": "lowest"}],
)
def test_nonsense_retention_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Retention(**kwargs)
