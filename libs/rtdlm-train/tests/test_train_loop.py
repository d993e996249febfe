import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.model import build_with_stats
from rtdlm.train import EvalLog, RunConfig, StepLog, resolve, split_documents, train
from rtdlm.train.data import stdlib_documents
from rtdlm.train.loop import Batch, init_state, make_optimizer, make_train_step
from rtdlm.train.pipeline import packed_batches

SMALL = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2"]
SMALL += ["model.seq_len=32", "model.d_ff=64"]
DATA = split_documents(stdlib_documents())


def batches(size: int, seq_len: int, count: int) -> list[Batch]:
    stream = packed_batches(DATA.train, size, seq_len, seed=0)
    return [Batch(tokens, segments) for tokens, segments, _ in itertools.islice(stream, count)]


def config(*sets: str) -> RunConfig:
    return resolve("tiny", sets=[*SMALL, *sets], vocab_size=256)


CONFIG = config(
    "data.batch_size=8",
    "optimizer.learning_rate=3e-3",
    "optimizer.warmup_steps=5",
    "train.max_steps=40",
    "train.eval_every=20",
)


def run(cfg: RunConfig, **kwargs: object) -> tuple[list[StepLog], list[EvalLog]]:
    logs = list(train(cfg, DATA, **kwargs))  # type: ignore[arg-type]
    return [x for x in logs if isinstance(x, StepLog)], [x for x in logs if isinstance(x, EvalLog)]


def test_held_out_loss_falls_and_logs_are_complete() -> None:
    steps, evals = run(CONFIG)
    assert [s.step for s in steps] == list(range(1, 41))
    assert [e.step for e in evals] == [0, 20, 40]
    assert evals[-1].loss < evals[0].loss - 1.0  # from ~ln(256) = 5.5 towards byte statistics
    assert all(s.tokens_per_second > 0 and np.isfinite(s.loss) and not s.skipped for s in steps)
    assert steps[0].learning_rate == 0.0 and steps[5].learning_rate == pytest.approx(3e-3)
    assert steps[-1].data_state == {"epoch": 0, "row": 40 * 8}


def test_same_seed_same_numbers_bit_for_bit() -> None:
    cfg = config("data.batch_size=4", "train.max_steps=3", "train.eval_every=3")
    first, _ = run(cfg)
    second, _ = run(cfg)
    assert [s.loss for s in first] == [s.loss for s in second]


def test_resuming_from_a_state_continues_bit_for_bit() -> None:
    cfg = config("data.batch_size=4", "train.max_steps=6", "train.eval_every=3")
    straight, _ = run(cfg)
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3))
    first, _ = run(half)
    # the schedule must be that of the 6-step run, so resume with the full config
    resumed, _ = run(cfg, state=first[-1].state, data_state=first[-1].data_state)
    assert [s.step for s in resumed] == [4, 5, 6]
    assert [s.loss for s in resumed] == [s.loss for s in straight[3:]]
    for a, b in zip(
        jax.tree.leaves(straight[-1].state), jax.tree.leaves(resumed[-1].state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_equals_one_large_batch() -> None:
    """k micro-batches of b sequences give the update of one batch of k*b: equal up to float32
    summation order (relative 1e-5 on parameters after two steps)."""
    results = []
    for micro in (1, 4):
        cfg = config("data.batch_size=8", f"data.micro_batches={micro}", "train.max_steps=2")
        model = build_with_stats(cfg.model)
        optimizer = make_optimizer(cfg.optimizer, cfg.train.max_steps)
        state = init_state(model, optimizer, cfg)
        step = make_train_step(model, optimizer, cfg)
        for batch in batches(8, cfg.model.seq_len, 2):
            state, metrics = step(state, batch)
        results.append((state, float(metrics.loss)))
    (one, loss_one), (accumulated, loss_acc) = results
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(accumulated.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_nonfinite_step_is_skipped_and_counted() -> None:
    cfg = config("data.batch_size=2", "train.max_steps=3", "optimizer.warmup_steps=0")
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.max_steps)
    step = make_train_step(model, optimizer, cfg)
    state = init_state(model, optimizer, cfg)
    [batch] = batches(2, cfg.model.seq_len, 1)
    before = jax.tree.map(np.asarray, state.params)
    poisoned = state._replace(
        params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params)
    )
    nan_params = jax.tree.map(np.asarray, poisoned.params)
    after, metrics = step(poisoned, batch)
    assert not bool(metrics.finite) and int(after.nonfinite_in_row) == 1 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(nan_params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # untouched, not updated with NaN
    clean = init_state(model, optimizer, cfg)._replace(nonfinite_in_row=jnp.asarray(3))
    fixed, metrics = step(clean, batch)
    assert bool(metrics.finite) and int(fixed.nonfinite_in_row) == 0
    assert any(
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(fixed.params), strict=True)
    )


def test_padding_and_cross_document_targets_do_not_count() -> None:
    from rtdlm.train.loop import target_mask

    segments = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
    assert target_mask(segments).tolist() == [[True, True, False, True, False, False]]


def test_a_mixture_of_experts_model_trains_with_its_auxiliary_losses() -> None:
    cfg = config(
        "model.num_layers=2",
        "model.moe_every=2",
        "model.num_experts=4",
        "data.batch_size=4",
        "optimizer.learning_rate=3e-3",
        "optimizer.warmup_steps=2",
        "train.max_steps=12",
        "train.eval_every=12",
        "train.z_loss_weight=1e-4",
    )
    steps, evals = run(cfg)
    assert all(np.isfinite(s.loss) for s in steps)
    assert evals[-1].loss < evals[0].loss
    assert "block_1/moe/router" in steps[-1].state.params
