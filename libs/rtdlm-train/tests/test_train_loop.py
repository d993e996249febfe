"""The pure pieces of a step: token-weighted losses, accumulation, the non-finite guard."""

import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from small_run import small_config

from rtdlm.data import split_documents
from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.pipeline import packed_batches
from rtdlm.model import build_with_stats
from rtdlm.train import Batch, RunConfig
from rtdlm.train.config import for_first_start
from rtdlm.train.loop import (
    TrainState,
    init_state,
    make_evaluate,
    make_loss_and_grads,
    make_optimizer,
    make_train_step,
    target_mask,
)

FLOAT32 = "model.compute_dtype=float32"  # equalities at float32 tolerances (tiny runs bf16)
DATA = split_documents(stdlib_documents())


def batches(size: int, seq_len: int, count: int) -> list[Batch]:
    stream = packed_batches(DATA.train, size, seq_len, seed=0)
    return [Batch(tokens, segments) for tokens, segments, _ in itertools.islice(stream, count)]


def config(*sets: str) -> RunConfig:
    return for_first_start(small_config(FLOAT32, *sets))


def initial_state(
    model: hk.Transformed, optimizer: optax.GradientTransformation, cfg: RunConfig
) -> TrainState:
    """init_state jitted, as the Trainer runs it: one compile, not one per operation."""
    return jax.jit(lambda: init_state(model, optimizer, cfg))()


def padded(batch: Batch, keep: list[int]) -> Batch:
    """Row i keeps its first keep[i] tokens as one document; the rest is padding (segment 0)."""
    segments = np.zeros_like(batch.segment_ids)
    for row, n in enumerate(keep):
        segments[row, :n] = 1
    return Batch(batch.tokens, segments)


def test_accumulated_gradients_equal_the_one_big_batch_whatever_the_padding() -> None:
    """Micro-batches with very different numbers of counted targets (3 vs 33 per row) still
    give the gradient of one big batch: each token weighs the same, not each micro-batch."""
    [batch] = batches(8, 32, 1)
    batch = padded(batch, [4, 4, 33, 33, 2, 33, 33, 33])
    results = {}
    for micro in (1, 4):
        cfg = config("data.batch_size=8", f"data.micro_batches={micro}")
        model = build_with_stats(cfg.model)
        params = initial_state(model, make_optimizer(cfg.optimizer), cfg).params
        results[micro] = jax.jit(make_loss_and_grads(model, cfg))(params, batch)
    (loss_one, grads_one), (loss_acc, grads_acc) = results[1], results[4]
    assert float(loss_acc) == pytest.approx(float(loss_one), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads_one), jax.tree.leaves(grads_acc), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_held_out_loss_is_the_token_weighted_mean() -> None:
    cfg = config("data.batch_size=4")
    model = build_with_stats(cfg.model)
    params = initial_state(model, make_optimizer(cfg.optimizer), cfg).params
    full, sparse = batches(4, 32, 2)
    sparse = padded(sparse, [2, 3, 2, 5])  # few targets: must weigh little
    counts = [int(target_mask(jnp.asarray(b.segment_ids)).sum()) for b in (full, sparse)]
    alone = [make_evaluate(model, [b])(params) for b in (full, sparse)]
    together = make_evaluate(model, [full, sparse])(params)
    weighted = (alone[0] * counts[0] + alone[1] * counts[1]) / sum(counts)
    assert counts[0] > 10 * counts[1]
    assert together == pytest.approx(weighted, rel=1e-6)
    assert together != pytest.approx((alone[0] + alone[1]) / 2, rel=1e-3)


def test_a_nonfinite_step_is_skipped_and_counted() -> None:
    cfg = config("data.batch_size=2", "train.max_steps=3", "optimizer.warmup_steps=0")
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer)
    step = make_train_step(model, optimizer, cfg)
    state = initial_state(model, optimizer, cfg)
    [batch] = batches(2, cfg.model.seq_len, 1)
    before = jax.tree.map(np.asarray, state.params)
    poisoned = state._replace(
        params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params)
    )
    nan_params = jax.tree.map(np.asarray, poisoned.params)
    after, metrics = step(poisoned, batch)
    assert not bool(metrics.finite) and int(after.nonfinite_in_row) == 1 and int(after.step) == 1
    assert int(metrics.nonfinite_in_row) == 1
    for a, b in zip(jax.tree.leaves(nan_params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # untouched, not updated with NaN
    clean = initial_state(model, optimizer, cfg)._replace(nonfinite_in_row=jnp.asarray(3))
    fixed, metrics = step(clean, batch)
    assert bool(metrics.finite) and int(fixed.nonfinite_in_row) == 0
    assert any(
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(fixed.params), strict=True)
    )


def test_the_step_reports_the_learning_rate_it_used() -> None:
    cfg = config("data.batch_size=2", "optimizer.warmup_steps=4", "optimizer.learning_rate=1e-2")
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer)
    step, state = make_train_step(model, optimizer, cfg), initial_state(model, optimizer, cfg)
    rates = []
    for batch in batches(2, cfg.model.seq_len, 3):
        state, metrics = step(state, batch)
        rates.append(float(metrics.learning_rate))
    assert rates == pytest.approx([0.0, 2.5e-3, 5e-3])


def test_after_a_skipped_step_the_reported_rate_is_the_one_optax_applies() -> None:
    """A skipped step counts in TrainState.step but not in optax's schedule: the step after it
    reports (and applies) the rate of the step before, as a run without the bad batch would."""
    cfg = config("data.batch_size=2", "optimizer.warmup_steps=4", "optimizer.learning_rate=1e-2")
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer)
    step = make_train_step(model, optimizer, cfg)
    first, bad, third, fourth = batches(2, cfg.model.seq_len, 4)
    state, metrics = step(initial_state(model, optimizer, cfg), first)
    rates = [float(metrics.learning_rate)]
    good = jax.tree.map(np.array, state.params)
    nan = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params)
    state, metrics = step(state._replace(params=nan), bad)
    assert not bool(metrics.finite) and int(state.step) == 2
    rates.append(float(metrics.learning_rate))
    state = state._replace(params=jax.tree.map(jnp.asarray, good))
    for batch in (third, fourth):
        state, metrics = step(state, batch)
        rates.append(float(metrics.learning_rate))
    assert rates == pytest.approx([0.0, 2.5e-3, 2.5e-3, 5e-3])  # schedule(state.step): 7.5e-3

    # the oracle: the same run without the bad batch applies those rates to the same params
    clean = initial_state(model, optimizer, cfg)
    clean_rates = []
    for batch in (first, third, fourth):
        clean, metrics = step(clean, batch)
        clean_rates.append(float(metrics.learning_rate))
    assert clean_rates == [rates[0], *rates[2:]]
    for a, b in zip(jax.tree.leaves(clean.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scale", [10.0, 0.5])  # a gradient norm 10x the limit, and half of it
def test_gradients_are_clipped_to_the_global_norm_before_adam(scale: float) -> None:
    """Adam's first moment after one update is (1 - b1) times the gradient it was given: that
    gradient has global norm clip_norm when the raw one was larger, and is the raw one when not."""
    cfg = config("optimizer.clip_norm=0.25")
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer)
    params = initial_state(model, optimizer, cfg).params
    raw = jax.tree.map(lambda p: jnp.ones_like(p) * np.arange(p.size).reshape(p.shape), params)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(raw))))
    raw = jax.tree.map(lambda g: g * (scale * 0.25 / norm), raw)  # global norm: scale * 0.25
    _, state = optimizer.update(raw, optimizer.init(params), params)
    [adam] = [
        s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")
    ]
    given = jax.tree.map(lambda m: m / (1 - cfg.optimizer.b1), adam.mu)
    given_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(given))))
    assert given_norm == pytest.approx(min(scale, 1.0) * 0.25, rel=1e-5)
    if scale < 1:
        for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(given), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-9)


def test_padding_and_cross_document_targets_do_not_count() -> None:
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
    assert target_mask(segments).tolist() == [[True, True, False, True, False, False]]


def test_weight_decay_skips_norm_scales_even_when_stacked_over_layers() -> None:
    from rtdlm.train.loop import _decay_mask

    cfg = config("model.scan_layers=true", "model.num_layers=2")
    model = build_with_stats(cfg.model)
    params = jax.eval_shape(lambda: init_state(model, make_optimizer(cfg.optimizer), cfg).params)
    mask = _decay_mask(params)
    assert params["layers/block/attn_norm"]["scale"].shape == (2, 32)
    assert mask["layers/block/attn_norm"]["scale"] is False
    assert mask["final_norm"]["scale"] is False
    assert mask["layers/block/attn/query"]["w"] is True and mask["embed"]["embeddings"] is True
