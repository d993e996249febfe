"""The training loop as pure pieces: state, step, evaluation, and a generator of step logs.

Everything a step depends on is in TrainState or derived from the step number, so a run
restored from a checkpoint continues bit for bit on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtdlm.model import build_with_stats
from rtdlm.train.config import OptimizerConfig, RunConfig
from rtdlm.train.data import Splits
from rtdlm.train.pipeline import Prefetch, evaluation_rows, packed_batches


class Batch(NamedTuple):
    tokens: Any  # [batch, seq_len + 1] int32: inputs are [:, :-1], targets [:, 1:]
    segment_ids: Any  # same shape: packed documents 1, 2, ...; 0 is padding


class TrainState(NamedTuple):
    step: jax.Array
    params: hk.Params
    opt_state: optax.OptState
    rng: jax.Array  # split every step, for anything stochastic the model grows
    nonfinite_in_row: jax.Array


class StepMetrics(NamedTuple):
    loss: jax.Array
    grad_norm: jax.Array
    finite: jax.Array  # False: the update was skipped


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    step_seconds: float
    grad_norm: float
    data_wait_seconds: float
    tokens: int
    skipped: bool  # non-finite loss or gradients: parameters were left unchanged
    nonfinite_in_row: int
    state: TrainState
    data_state: dict[str, Any]  # the data position after this step's batch, for checkpoints


@dataclass(frozen=True)
class EvalLog:
    step: int
    loss: float


def learning_rate_schedule(cfg: OptimizerConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to learning_rate * min_lr_ratio at max_steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        cfg.warmup_steps,
        max(max_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, max_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg, max_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )


def _decay_mask(params: hk.Params) -> Any:
    """Weight decay on matrices only: never on norm scales or biases."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def target_mask(segment_ids: jax.Array) -> jax.Array:
    """Which next-token targets count: same document as the input token, and not padding."""
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)


def cross_entropy(logits: jax.Array, batch: Batch, z_loss_weight: float = 0.0) -> jax.Array:
    """Mean next-token cross-entropy over the counted targets, plus the optional z-loss."""
    targets = batch.tokens[:, 1:]
    mask = target_mask(batch.segment_ids).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if z_loss_weight:
        losses = losses + z_loss_weight * jax.nn.logsumexp(logits, axis=-1) ** 2
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(model: hk.Transformed, params: hk.Params, batch: Batch) -> jax.Array:
    logits, _ = model.apply(params, None, batch.tokens[:, :-1], batch.segment_ids[:, :-1])
    return cross_entropy(logits, batch)


def training_loss(
    model: hk.Transformed, cfg: RunConfig, params: hk.Params, batch: Batch
) -> jax.Array:
    """Cross-entropy (+ z-loss) plus the MoE load-balancing and router z-losses."""
    logits, moe = model.apply(params, None, batch.tokens[:, :-1], batch.segment_ids[:, :-1])
    auxiliary = (
        cfg.train.moe_load_balance_weight * moe.load_balance_loss
        + cfg.train.moe_router_z_weight * moe.router_z_loss
    )
    return cross_entropy(logits, batch, cfg.train.z_loss_weight) + auxiliary


def init_state(
    model: hk.Transformed, optimizer: optax.GradientTransformation, cfg: RunConfig
) -> TrainState:
    init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
    params = model.init(init_key, jnp.zeros((1, cfg.model.seq_len), jnp.int32))
    step, nonfinite_in_row = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers:
    return TrainState(step, params, optimizer.init(params), rng, nonfinite_in_row)  # both donated


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[batch, T] -> [micro_batches, batch / micro_batches, T] for the accumulation scan."""
    return Batch(*(x.reshape(micro_batches, -1, *x.shape[1:]) for x in batch))


def make_train_step(
    model: hk.Transformed, optimizer: optax.GradientTransformation, cfg: RunConfig
) -> Any:
    """One optimizer step over cfg.data.micro_batches micro-batches, accumulated inside jit.

    A non-finite loss or gradient leaves params and optimizer state untouched (the step still
    counts) and increments nonfinite_in_row; a finite step resets it.
    """
    grad_fn = jax.value_and_grad(partial(training_loss, model, cfg))
    micro_batches = cfg.data.micro_batches

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, StepMetrics]:
        micro = split_micro_batches(batch, micro_batches)

        def accumulate(carry: Any, one: Batch) -> tuple[Any, None]:
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, one)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros(()), zeros), micro)
        loss = loss_sum / micro_batches
        grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        rng, _ = jax.random.split(state.rng)
        new_state = TrainState(
            state.step + 1,
            keep(params, state.params),
            keep(opt_state, state.opt_state),
            rng,
            jnp.where(finite, 0, state.nonfinite_in_row + 1),
        )
        return new_state, StepMetrics(loss, grad_norm, finite)

    return jax.jit(train_step, donate_argnums=0)


def make_evaluate(model: hk.Transformed, held_out: list[Batch]) -> Any:
    """params -> mean held-out loss over a fixed set of batches (the same at every evaluation)."""
    loss = jax.jit(partial(next_token_loss, model))
    return lambda params: float(np.mean([loss(params, batch) for batch in held_out]))


def evaluation_batches(data: Splits, cfg: RunConfig) -> list[Batch]:
    rows = evaluation_rows(
        data.validation, cfg.data.batch_size, cfg.model.seq_len, cfg.data.eval_batches
    )
    return [Batch(tokens, segments) for tokens, segments in rows]


def train(
    cfg: RunConfig,
    data: Splits,
    state: TrainState | None = None,
    data_state: dict[str, Any] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[StepLog | EvalLog]:
    """Runs to cfg.train.max_steps from `state` (default: fresh), yielding a StepLog after each
    step and an EvalLog on the held-out split at the start of a fresh run, every eval_every
    steps and after the last. `data_state` is a StepLog's data_state: the stream resumes with
    exactly the batch that followed it."""
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.max_steps)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.max_steps)
    fresh = state is None
    state = init_state(model, optimizer, cfg) if state is None else state
    train_step = make_train_step(model, optimizer, cfg)
    evaluate = make_evaluate(model, evaluation_batches(data, cfg))
    batches = packed_batches(
        data.train,
        cfg.data.batch_size,
        cfg.model.seq_len,
        cfg.data.shuffle_seed,
        data_state,
        process_index,
        process_count,
    )
    stream = Prefetch(batches, cfg.data.prefetch)
    try:
        if fresh:
            yield EvalLog(0, evaluate(state.params))
        for step in range(int(state.step) + 1, cfg.train.max_steps + 1):
            start = time.perf_counter()
            tokens, segments, position = next(stream)
            data_wait = time.perf_counter() - start
            state, metrics = train_step(state, Batch(tokens, segments))
            loss = float(metrics.loss)  # waits for the step to finish, so the timing is honest
            seconds = time.perf_counter() - start
            count = int(tokens[:, 1:].size)
            yield StepLog(
                step=step,
                loss=loss,
                learning_rate=float(schedule(step - 1)),
                tokens_per_second=count / seconds,
                step_seconds=seconds,
                grad_norm=float(metrics.grad_norm),
                data_wait_seconds=data_wait,
                tokens=count,
                skipped=not bool(metrics.finite),
                nonfinite_in_row=int(state.nonfinite_in_row),
                state=state,
                data_state=position,
            )
            if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                yield EvalLog(step, evaluate(state.params))
    finally:
        stream.close()
