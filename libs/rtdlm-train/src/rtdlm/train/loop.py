"""The training loop as pure pieces: state, step, evaluation, and a generator of step logs."""

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

from rtdlm.model import ModelConfig, build_with_stats
from rtdlm.train.data import Splits, evaluation_windows, random_windows


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    max_steps: int = 200
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 25
    eval_batches: int = 4
    seed: int = 0
    moe_load_balance_weight: float = 0.01  # used only by models with MoE layers
    moe_router_z_weight: float = 0.001

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}")


class TrainState(NamedTuple):
    step: jax.Array
    params: hk.Params
    opt_state: optax.OptState


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
    state: TrainState


@dataclass(frozen=True)
class EvalLog:
    step: int
    loss: float


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.max_steps, cfg.warmup_steps + 1)
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay, mask=_decay_mask),
    )


def _decay_mask(params: hk.Params) -> Any:
    """Weight decay on matrices only: never on norm scales or biases."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def cross_entropy(logits: jax.Array, windows: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits (for windows[:, :-1]) against the next tokens windows[:, 1:]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def next_token_loss(model: hk.Transformed, params: hk.Params, windows: jax.Array) -> jax.Array:
    logits, _ = model.apply(params, None, windows[:, :-1])
    return cross_entropy(logits, windows)


def training_loss(
    model: hk.Transformed, cfg: TrainConfig, params: hk.Params, windows: jax.Array
) -> jax.Array:
    """Cross-entropy plus the MoE load-balancing and router z-losses (zero for dense models)."""
    logits, moe = model.apply(params, None, windows[:, :-1])
    auxiliary = (
        cfg.moe_load_balance_weight * moe.load_balance_loss
        + cfg.moe_router_z_weight * moe.router_z_loss
    )
    return cross_entropy(logits, windows) + auxiliary


def init_state(
    model: hk.Transformed,
    optimizer: optax.GradientTransformation,
    model_cfg: ModelConfig,
    seed: int,
) -> TrainState:
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, model_cfg.seq_len), jnp.int32))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_step(
    model: hk.Transformed, optimizer: optax.GradientTransformation, cfg: TrainConfig
) -> Any:
    def train_step(
        state: TrainState, windows: jax.Array
    ) -> tuple[TrainState, jax.Array, jax.Array]:
        loss, grads = jax.value_and_grad(partial(training_loss, model, cfg))(state.params, windows)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), loss, optax.global_norm(grads)

    return jax.jit(train_step, donate_argnums=0)


def train(model_cfg: ModelConfig, cfg: TrainConfig, data: Splits) -> Iterator[StepLog | EvalLog]:
    """Runs cfg.max_steps steps, yielding a StepLog after each and an EvalLog on the held-out
    split before the first step, every cfg.eval_every steps and after the last."""
    model = build_with_stats(model_cfg)
    optimizer = make_optimizer(cfg)
    schedule = learning_rate_schedule(cfg)
    state = init_state(model, optimizer, model_cfg, cfg.seed)
    train_step = make_train_step(model, optimizer, cfg)
    eval_loss = jax.jit(lambda params, windows: next_token_loss(model, params, windows))
    held_out = evaluation_windows(
        data.validation, cfg.batch_size, model_cfg.seq_len, cfg.eval_batches
    )

    def evaluate(step: int, params: hk.Params) -> EvalLog:
        return EvalLog(step, float(np.mean([eval_loss(params, w) for w in held_out])))

    batches = random_windows(data.train, cfg.batch_size, model_cfg.seq_len, cfg.seed)
    yield evaluate(0, state.params)
    for step in range(1, cfg.max_steps + 1):
        start = time.perf_counter()
        windows = next(batches)
        data_wait = time.perf_counter() - start
        state, loss, grad_norm = train_step(state, windows)
        loss_value = float(loss)  # waits for the step to finish, so the timing is honest
        seconds = time.perf_counter() - start
        yield StepLog(
            step=step,
            loss=loss_value,
            learning_rate=float(schedule(step - 1)),
            tokens_per_second=windows[:, 1:].size / seconds,
            step_seconds=seconds,
            grad_norm=float(grad_norm),
            data_wait_seconds=data_wait,
            tokens=int(windows[:, 1:].size),
            state=state,
        )
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            yield evaluate(step, state.params)
