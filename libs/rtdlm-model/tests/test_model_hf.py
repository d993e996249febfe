"""The Hugging Face Llama layout without transformers: names, transposes, config fields, shards
and refusals. (tests/test_hf_interop.py holds the layout to transformers itself.)"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from rtdlm.model import ModelConfig, build, hf
from rtdlm.model.transformer import unstack_layers

CFG = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16, vocab_size=40)


def init(cfg: ModelConfig) -> dict:
    params = build(cfg).init(jax.random.PRNGKey(1), np.zeros((1, 4), np.int32))
    return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize(
    "cfg",
    [CFG, dataclasses.replace(CFG, tie_embeddings=False, scan_layers=True)],
    ids=["tied", "untied-scanned"],
)
def test_export_then_import_is_bit_identical(cfg: ModelConfig) -> None:
    params = init(cfg)
    tensors = hf.to_hf(params, cfg)
    back = hf.from_hf(tensors, cfg)
    assert {m: set(p) for m, p in back.items()} == {m: set(p) for m, p in params.items()}
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert np.asarray(a).dtype == b.dtype and np.asarray(a).tobytes() == b.tobytes()
    assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)


def test_matrices_are_transposed_and_named_as_llama_does() -> None:
    params, tensors = init(CFG), hf.to_hf(init(CFG), CFG)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert q.shape == (32, 32) and q.flags.c_contiguous  # [out, in]
    np.testing.assert_array_equal(q, params["block_1/attn/query"]["w"].T)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, CFG.ffn_dim)
    np.testing.assert_array_equal(tensors["model.norm.weight"], params["final_norm"]["scale"])
    assert len(tensors) == 2 + 9 * CFG.num_layers


def test_bfloat16_rounds_each_weight_once() -> None:
    params = init(CFG)
    tensors = hf.to_hf(params, CFG, "bfloat16")
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    back = hf.from_hf(tensors, CFG)["embed"]["embeddings"]
    np.testing.assert_allclose(back, params["embed"]["embeddings"], rtol=2**-8)


def test_config_json_states_our_config_and_reads_back() -> None:
    cfg = dataclasses.replace(CFG, rope_base=5e5, norm_eps=1e-5, d_ff=72, tie_embeddings=False)
    config = hf.hf_config(cfg, "bfloat16", bos_id=1, eos_id=2)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["head_dim"] == 8
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (2, 72)
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 5e5
    assert (config["torch_dtype"], config["bos_token_id"], config["eos_token_id"]) == (
        "bfloat16",
        1,
        2,
    )
    assert hf.model_config(json.loads(json.dumps(config))) == cfg


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("attention_bias", True, "attention_bias=True is not supported: our attention has no"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported: our MLP is SwiGLU"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type='yarn'"),
        ("sliding_window", 4096, "sliding_window=4096"),
        ("head_dim", 16, "head_dim=16 is not supported"),
        ("model_type", "qwen2", "model_type='qwen2' is not supported: only LlamaForCausalLM"),
    ],
)
def test_what_our_model_does_not_compute_is_refused_by_name(
    field: str, value: object, message: str
) -> None:
    config = hf.hf_config(CFG) | {field: value}
    with pytest.raises(hf.HfError, match="^config.json: ") as error:
        hf.model_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


# Every block a mixture whose experts hold the whole batch: what Mixtral computes.
MIXTURE = dataclasses.replace(CFG, moe_every=1, num_experts=4, experts_per_token=2)
MIXTURE = dataclasses.replace(MIXTURE, capacity_factor=2.0, tie_embeddings=False)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["looped", "scanned"])
def test_a_mixture_exports_in_mixtral_layout_and_back_bit_identical(scan_layers: bool) -> None:
    cfg = dataclasses.replace(MIXTURE, scan_layers=scan_layers)
    params = init(cfg)
    tensors = hf.to_hf(params, cfg)
    assert len(tensors) == 3 + (6 + 1 + 3 * 4) * cfg.num_layers
    looped = unstack_layers(params, cfg) if scan_layers else params
    w_gate = np.asarray(looped["block_1/moe"]["w_gate"])
    np.testing.assert_array_equal(
        tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"], w_gate[3].T
    )
    assert tensors["model.layers.0.block_sparse_moe.experts.0.w2.weight"].shape == (32, 256)
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].shape == (4, 32)
    back = hf.from_hf(tensors, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert np.asarray(a).dtype == b.dtype and np.asarray(a).tobytes() == b.tobytes()
    config = hf.hf_config(cfg)
    assert (config["architectures"], config["model_type"]) == (["MixtralForCausalLM"], "mixtral")
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe_every": 2}, r"where ours mixes dense blocks in \(model.moe_every=2, not 1\)$"),
        ({"capacity_factor": 1.25}, r"only model.capacity_factor >= .* = 2 \(not 1.25\) drops"),
    ],
)
def test_a_mixture_mixtral_would_compute_otherwise_is_refused_saying_why(
    change: dict[str, Any], message: str
) -> None:
    moe = dataclasses.replace(MIXTURE, **change)
    with pytest.raises(hf.HfError, match=message):
        hf.to_hf(init(moe), moe)


def test_weights_that_disagree_with_the_config_are_one_line() -> None:
    tensors = hf.to_hf(init(CFG), CFG)
    with pytest.raises(hf.HfError, match="lacks model.layers.0.mlp.up_proj.weight"):
        hf.from_hf({k: v for k, v in tensors.items() if "0.mlp.up" not in k}, CFG)
    wider = dataclasses.replace(CFG, d_ff=96)
    implied = (
        r"block_0/mlp/gate/w is \(32, 256\) in the weights, but config.json implies \(32, 96\)"
    )
    with pytest.raises(hf.HfError, match=implied):
        hf.from_hf(tensors, wider)


def test_large_checkpoints_are_sharded_with_an_index(tmp_path: Path) -> None:
    tensors = hf.to_hf(init(CFG), CFG)
    files = hf.save(tmp_path, tensors, hf.hf_config(CFG), max_shard_bytes=8_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and hf.INDEX in files and not (tmp_path / hf.WEIGHTS).exists()
    index = json.loads((tmp_path / hf.INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    config, loaded = hf.load(tmp_path)
    assert config == hf.hf_config(CFG) and set(loaded) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_a_directory_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(hf.HfError, match="has no config.json: is it a Hugging Face model"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(hf.HfError, match="has neither model.safetensors nor"):
        hf.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(hf.HfError, match="is not a readable safetensors file"):
        hf.load(tmp_path)
