"""Learning sanity: a tiny model memorises one fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtdlm.model import ModelConfig, build


def test_tiny_model_overfits_a_fixed_batch() -> None:
    cfg = ModelConfig(
        d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=32, vocab_size=64
    )
    model = build(cfg)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 33)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), batch[:, :-1])
    optimizer = optax.adam(3e-3)

    def loss_fn(p: dict) -> jax.Array:
        logits = model.apply(p, None, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(p: dict, state: optax.OptState) -> tuple[dict, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    first = float(loss_fn(params))
    for _ in range(300):
        params, state, loss = step(params, state)
    assert first > 4.0  # about ln(64) = 4.16 at initialisation
    assert float(loss) < 0.1 * first
