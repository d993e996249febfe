"""The training step and evaluation as pure, jit-compiled functions of a TrainState pytree.

Everything a step depends on is in TrainState or derived from the step number, so a run
restored from a checkpoint continues bit for bit on CPU. Losses are token-weighted means:
sums of per-token losses and counts of counted targets, divided once per step or evaluation,
so micro-batches and held-out batches with different numbers of targets weigh what they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtdlm.data.corpus import Splits
from rtdlm.data.pipeline import evaluation_rows
from rtdlm.model import axis_rules, constrain
from rtdlm.train.config import OptimizerConfig, RunConfig
from rtdlm.train.sharding import batch_sharding, state_shardings, to_sharding


class Batch(NamedTuple):
    tokens: Any  # [batch, seq_len + 1] int32: inputs are [:, :-1], targets [:, 1:]
    segment_ids: Any  # same shape: packed documents 1, 2, ...; 0 is padding


class TrainState(NamedTuple):
    step: jax.Array
    params: hk.Params
    opt_state: optax.OptState
    nonfinite_in_row: jax.Array


class StepMetrics(NamedTuple):
    loss: jax.Array
    grad_norm: jax.Array
    learning_rate: jax.Array  # what optax applied (would have, on a skipped step)
    finite: jax.Array  # False: the update was skipped
    nonfinite_in_row: jax.Array


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to learning_rate * min_lr_ratio at decay_steps,
    and that floor after it."""
    if cfg.decay_steps is None:
        raise ValueError("optimizer.decay_steps is unset: resolve it with config.for_first_start")
    return optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        cfg.warmup_steps,
        max(cfg.decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def applied_learning_rate(schedule: optax.Schedule, opt_state: optax.OptState) -> jax.Array:
    """The rate optax applies in the update from `opt_state`: its schedule at optax's own
    count, which a skipped (non-finite) step leaves behind TrainState.step."""
    [count] = {
        id(s): s.count
        for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state)
        if _is_schedule_state(s)
    }.values()
    return schedule(count)


def _is_schedule_state(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )


NO_DECAY = ("scale", "offset", "b")  # norm parameters and biases, stacked over layers or not


def _decay_mask(params: hk.Params) -> Any:
    """Weight decay on weight matrices only: never on norm scales or biases (by name, since
    with scanned layers a norm scale is [layers, d], as two-dimensional as a matrix)."""
    return {
        module: {name: value.ndim >= 2 and name not in NO_DECAY for name, value in leaves.items()}
        for module, leaves in params.items()
    }


def target_mask(segment_ids: jax.Array) -> jax.Array:
    """Which next-token targets count: same document as the input token, and not padding."""
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)


def cross_entropy_sum(
    logits: jax.Array, batch: Batch, z_loss_weight: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (plus the optional z-loss) over the counted targets, and
    how many targets counted."""
    mask = target_mask(batch.segment_ids).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.tokens[:, 1:])
    if z_loss_weight:
        losses = losses + z_loss_weight * jax.nn.logsumexp(logits, axis=-1) ** 2
    return jnp.sum(losses * mask), jnp.sum(mask)


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[batch, T] -> [micro_batches, batch / micro_batches, T] for the accumulation scan.

    Micro-batch m takes rows m, m + M, m + 2M, ...: with the batch split over devices, every
    device then holds an equal part of every micro-batch (the sum over them is the same)."""
    return Batch(*(x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1) for x in batch))


def make_loss_and_grads(
    model: hk.Transformed, cfg: RunConfig
) -> Callable[[hk.Params, Batch], tuple[jax.Array, hk.Params]]:
    """(params, batch) -> (loss, gradients) of the whole batch, accumulated over
    cfg.data.micro_batches micro-batches: each adds its summed token losses over the batch's
    total target count, so the result is the one-big-batch gradient whatever the padding. The
    MoE auxiliary losses are per micro-batch statistics and are averaged over them."""
    micro_batches = cfg.data.micro_batches
    moe_weights = (cfg.train.moe_load_balance_weight, cfg.train.moe_router_z_weight)

    def objective(params: hk.Params, one: Batch, total: jax.Array) -> jax.Array:
        logits, moe = model.apply(params, None, one.tokens[:, :-1], one.segment_ids[:, :-1])
        loss_sum, _ = cross_entropy_sum(logits, one, cfg.train.z_loss_weight)
        auxiliary = moe_weights[0] * moe.load_balance_loss + moe_weights[1] * moe.router_z_loss
        return loss_sum / total + auxiliary / micro_batches

    grad_fn = jax.value_and_grad(objective)

    def loss_and_grads(params: hk.Params, batch: Batch) -> tuple[jax.Array, hk.Params]:
        total = jnp.maximum(jnp.sum(target_mask(batch.segment_ids)), 1).astype(jnp.float32)

        def accumulate(carry: Any, one: Batch) -> tuple[Any, None]:
            loss_sum, grad_sum = carry
            one = Batch(*(constrain(x, "batch", None) for x in one))
            loss, grads = grad_fn(params, one, total)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        micro = split_micro_batches(batch, micro_batches)
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        return loss, grads

    return loss_and_grads


def init_state(
    model: hk.Transformed, optimizer: optax.GradientTransformation, cfg: RunConfig
) -> TrainState:
    params = model.init(
        jax.random.PRNGKey(cfg.train.seed), jnp.zeros((1, cfg.model.seq_len), jnp.int32)
    )
    return state_from(params, optimizer)


def state_from(params: hk.Params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 of training `params` (random or loaded), with a fresh optimizer state."""
    step, nonfinite_in_row = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers:
    return TrainState(step, params, optimizer.init(params), nonfinite_in_row)  # both donated


def make_train_step(
    model: hk.Transformed,
    optimizer: optax.GradientTransformation,
    cfg: RunConfig,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, StepMetrics]]:
    """One optimizer step, jit-compiled with the state donated; on `mesh`, with the state and
    batch laid out by rtdlm.train.sharding's rules (metrics come back replicated).

    A non-finite loss or gradient leaves params and optimizer state untouched (the step still
    counts) and increments nonfinite_in_row; a finite step resets it. The metrics stay on the
    device: the caller reads them when it likes, so it never waits on a step it need not.
    """
    loss_and_grads = make_loss_and_grads(model, cfg)
    schedule = learning_rate_schedule(cfg.optimizer)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, StepMetrics]:
        loss, grads = loss_and_grads(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        nonfinite_in_row = jnp.where(finite, 0, state.nonfinite_in_row + 1)
        new_state = TrainState(
            state.step + 1,
            keep(params, state.params),
            keep(opt_state, state.opt_state),
            nonfinite_in_row,
        )
        learning_rate = applied_learning_rate(schedule, state.opt_state)
        metrics = StepMetrics(loss, grad_norm, learning_rate, finite, nonfinite_in_row)
        return new_state, metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    shapes = jax.eval_shape(lambda: init_state(model, optimizer, cfg))
    state_sharding = state_shardings(mesh, optimizer, shapes)
    replicated = NamedSharding(mesh, PartitionSpec())

    def on_mesh(state: TrainState, batch: Batch) -> tuple[TrainState, StepMetrics]:
        with axis_rules(to_sharding(mesh)):  # tracing happens here: activations get placed
            return train_step(state, batch)

    return jax.jit(
        on_mesh,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def make_evaluate(
    model: hk.Transformed, held_out: list[Batch], mesh: Mesh | None = None
) -> Callable[[hk.Params], float]:
    """params -> held-out loss over a fixed set of batches: every counted target of every
    batch weighs the same (summed, then divided once). On `mesh`, batches and parameters stay
    where they are (the caller places them) and activations follow the rules."""

    @jax.jit
    def sums(params: hk.Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        with axis_rules(to_sharding(mesh)) if mesh is not None else contextlib.nullcontext():
            logits, _ = model.apply(params, None, batch.tokens[:, :-1], batch.segment_ids[:, :-1])
            return cross_entropy_sum(logits, batch)

    def evaluate(params: hk.Params) -> float:
        parts = jax.device_get([sums(params, batch) for batch in held_out])  # one wait
        loss = sum(float(s) for s, _ in parts)
        count = sum(float(c) for _, c in parts)
        return loss / max(count, 1.0)

    return evaluate


def evaluation_batches(data: Splits, cfg: RunConfig) -> list[Batch]:
    rows = evaluation_rows(
        data.validation, cfg.data.batch_size, cfg.model.seq_len, cfg.data.eval_batches
    )
    return [Batch(tokens, segments) for tokens, segments in rows]
