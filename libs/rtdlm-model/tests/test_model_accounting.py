import jax
import jax.numpy as jnp
import pytest

from rtdlm.model import (
    PRESETS,
    ModelConfig,
    build,
    flops_per_token,
    memory_estimate,
    non_embedding_params,
    param_count,
    preset,
)

TARGETS = {"tiny": 3e6, "small": 85e6, "medium": 300e6, "large": 1.2e9}


def real_param_count(cfg: ModelConfig) -> int:
    shapes = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", list(PRESETS))
def test_counted_params_match_the_real_tree_and_the_targets(name: str, scan: bool) -> None:
    cfg = preset(name, vocab_size=256, scan_layers=scan)
    assert param_count(cfg) == real_param_count(cfg)
    assert 0.8 < non_embedding_params(cfg) / TARGETS[name] < 1.2


@pytest.mark.parametrize("scan", [False, True])
def test_counted_moe_params_match_the_real_tree_in_both_layouts(scan: bool) -> None:
    cfg = preset("tiny", vocab_size=256, moe_every=2, num_experts=4, scan_layers=scan)
    assert param_count(cfg) == real_param_count(cfg)
    assert non_embedding_params(cfg, active_only=True) < non_embedding_params(cfg)


def test_flops_agree_with_xla_cost_analysis() -> None:
    cfg = ModelConfig(
        d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=32, vocab_size=97
    )
    model = build(cfg)
    tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)
    cost = jax.jit(lambda p: model.apply(p, None, tokens)).lower(params).compile().cost_analysis()
    assert cost is not None
    xla_forward = cost["flops"] / cfg.seq_len
    # XLA computes the whole T x T score matrix; our count halves it for causality.
    full_attention = 2 * cfg.num_layers * cfg.seq_len * cfg.num_heads * cfg.head_dim
    ours = flops_per_token(cfg) / 3 + full_attention
    assert ours == pytest.approx(xla_forward, rel=0.05)


def test_memory_estimate_orders_remat_policies() -> None:
    estimates = {
        remat: memory_estimate(preset("small", vocab_size=256, remat=remat), batch_size=8)
        for remat in ("none", "dots_saveable", "full")
    }
    none, dots, full = (estimates[k].activations for k in ("none", "dots_saveable", "full"))
    assert none > dots > full
    n = param_count(preset("small", vocab_size=256))
    assert estimates["none"].params == 4 * n and estimates["none"].optimizer_state == 8 * n
    bf16 = memory_estimate(preset("small", vocab_size=256, compute_dtype="bfloat16"), batch_size=8)
    assert bf16.activations < none and bf16.params == estimates["none"].params
