"""scan_layers: the same model as one lax.scan over stacked blocks.

Both layouts compute the same function of the same numbers: stack_layers / unstack_layers move
parameters between them, and logits, MoE stats, gradients and greedy generations agree to
float32 round-off (TOL: XLA may fuse and order the sums differently in a loop body).
"""

import dataclasses
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.model import (
    ModelConfig,
    build_decoder,
    build_with_stats,
    generate,
    init_cache,
    preset,
    stack_layers,
    unstack_layers,
)

TOL = 1e-5  # absolute and relative; all float32
DENSE = ModelConfig(
    d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=24, vocab_size=50
)
MOE = ModelConfig(
    d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, seq_len=24, vocab_size=50, d_ff=48,
    moe_every=2, num_experts=4, experts_per_token=2, capacity_factor=1.0,
)  # fmt: skip  # two groups of (dense, MoE); capacity 1.0 so that some assignments drop
CONFIGS = {"dense": DENSE, "moe": MOE}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 16)), jnp.int32)
SEGMENTS = jnp.asarray([[1] * 5 + [2] * 11, [1] * 16])


def scanned(cfg: ModelConfig, **changes: object) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=True, **changes)  # type: ignore[arg-type]


PARAMS = {  # looped layout; remat leaves the parameters alone
    name: jax.jit(build_with_stats(cfg).init)(jax.random.PRNGKey(0), TOKENS)
    for name, cfg in CONFIGS.items()
}


def shapes(tree: hk.Params) -> hk.Params:
    """The tree with each array replaced by its shape: == compares structure and shapes."""
    return jax.tree.map(jnp.shape, tree)


def assert_trees_close(a: hk.Params, b: hk.Params, atol: float = TOL) -> None:
    assert shapes(a) == shapes(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=TOL)


def test_scanned_parameters_are_stacked_under_layers() -> None:
    shapes = jax.eval_shape(build_with_stats(scanned(DENSE)).init, jax.random.PRNGKey(0), TOKENS)
    assert not any(name.startswith("block_") for name in shapes)
    assert shapes["layers/block/attn/query"]["w"].shape == (2, 32, 32)
    assert shapes["layers/block/attn_norm"]["scale"].shape == (2, 32)
    moe = jax.eval_shape(build_with_stats(scanned(MOE)).init, jax.random.PRNGKey(0), TOKENS)
    assert moe["layers/block_0/mlp/gate"]["w"].shape == (2, 32, 48)  # layers 0 and 2
    assert moe["layers/block_1/moe"]["w_gate"].shape == (2, 4, 32, 48)  # layers 1 and 3
    assert "layers/block_1/mlp/gate" not in moe and "layers/block_0/moe" not in moe


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stack_and_unstack_convert_between_the_layouts_exactly(name: str) -> None:
    cfg, params = CONFIGS[name], PARAMS[name]
    stacked = stack_layers(params, scanned(cfg))
    real = jax.eval_shape(build_with_stats(scanned(cfg)).init, jax.random.PRNGKey(0), TOKENS)
    assert shapes(stacked) == shapes(real)
    back = unstack_layers(stacked, cfg)
    assert shapes(back) == shapes(params)
    for a, b in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="not the looped layout"):
        stack_layers(stacked, cfg)
    with pytest.raises(ValueError, match="not the scanned layout"):
        unstack_layers(params, cfg)


def loss(model: hk.Transformed, p: hk.Params) -> tuple[jax.Array, tuple]:
    logits, stats = model.apply(p, None, TOKENS, SEGMENTS)
    value = (logits**2).mean() + 0.01 * stats.load_balance_loss + 0.001 * stats.router_z_loss
    return value, (logits, stats)


grad = jax.jit(jax.grad(loss, argnums=1, has_aux=True), static_argnums=0)


@functools.cache
def looped_grad(name: str) -> tuple[hk.Params, tuple]:
    """The loop's gradient, logits and stats without remat: remat changes memory, not results
    (test_model_transformer holds the loop to that), so every policy's scan is held to these."""
    return grad(build_with_stats(CONFIGS[name]), PARAMS[name])


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_scanned_logits_stats_and_gradients_match_the_loop(name: str, remat: str) -> None:
    cfg, params = dataclasses.replace(CONFIGS[name], remat=remat), PARAMS[name]
    looped_grads, (looped_logits, looped_stats) = looped_grad(name)
    scan_grads, (scan_logits, scan_stats) = grad(
        build_with_stats(scanned(cfg)), stack_layers(params, scanned(cfg))
    )
    np.testing.assert_allclose(scan_logits, looped_logits, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(scan_stats, looped_stats, atol=TOL, rtol=TOL)
    if cfg.moe_every:  # summed over both MoE layers, with drops
        assert float(scan_stats.assignments) == 2 * TOKENS.size * cfg.experts_per_token
        assert float(scan_stats.dropped) > 0
    assert_trees_close(unstack_layers(scan_grads, cfg), looped_grads)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scanned_decoding_and_greedy_generation_match_the_loop(name: str) -> None:
    cfg, params = CONFIGS[name], PARAMS[name]
    stacked = stack_layers(params, scanned(cfg))

    def prefill_then_step(c: ModelConfig, p: hk.Params) -> tuple[jax.Array, jax.Array]:
        step = jax.jit(build_decoder(c).apply)
        first, cache = step(p, None, TOKENS[:, :5], init_cache(c, 2, 16))
        second, cache = step(p, None, TOKENS[:, 5:6], cache)
        assert cache.k.shape == (c.num_layers, 2, 16, c.num_kv_heads, c.head_dim)
        return jnp.concatenate([first, second], axis=1), cache.k

    looped_logits, looped_k = prefill_then_step(cfg, params)
    scan_logits, scan_k = prefill_then_step(scanned(cfg), stacked)
    np.testing.assert_allclose(scan_logits, looped_logits, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(scan_k, looped_k, atol=TOL, rtol=TOL)  # same layer order

    def greedy(c: ModelConfig, p: hk.Params) -> jax.Array:
        key = jax.random.PRNGKey(0)
        return generate(p, TOKENS[:, :4], key, cfg=c, max_new_tokens=8, temperature=0.0).tokens

    np.testing.assert_array_equal(greedy(scanned(cfg), stacked), greedy(cfg, params))


def test_scanned_parameters_stay_float32_under_bfloat16_compute() -> None:
    cfg = scanned(MOE, compute_dtype="bfloat16")
    model = build_with_stats(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
    logits, stats = jax.jit(model.apply)(stack_layers(PARAMS["moe"], cfg), None, TOKENS)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert float(stats.assignments) == 2 * TOKENS.size * cfg.experts_per_token


def test_scan_needs_whole_groups_of_moe_blocks() -> None:
    with pytest.raises(
        ValueError, match=r"model.scan_layers needs model.num_layers \(3\) divisible by "
    ):
        preset("tiny", num_layers=3, moe_every=2, scan_layers=True)
    assert preset("tiny", num_layers=3, moe_every=2).scan_group == 2  # fine without scan
    assert preset("tiny", scan_layers=True).scan_group == 1
    with pytest.raises(ValueError, match="model.scan_layers must be true or false"):
        preset("tiny", scan_layers="yes")
