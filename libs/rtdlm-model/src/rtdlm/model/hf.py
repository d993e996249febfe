"""The Hugging Face Llama layout: our parameters under `LlamaForCausalLM`'s names, and back;
a mixture of experts in every block under `MixtralForCausalLM`'s.

Our block is Llama's (pre-norm RMSNorm, rotary positions, grouped-query attention, SwiGLU,
optionally tied embeddings), so the two differ in names and layout only:

- Haiku's dense weights are [in, out]; torch's Linear keeps [out, in]: each matrix is
  transposed, nothing else.
- Both rotate the two halves of each head (`rotate_half`, not interleaved pairs) with
  frequencies base^(-2i / head_dim): q and k need no permutation.
- Norm scales, embeddings and, untied, the output projection map one to one.
- Mixtral routes as we do (softmax over all experts, the top k renormalized to sum to 1, no
  router bias) but never drops a token, so a mixture exports only where ours cannot drop one
  either: every block a mixture, and each expert's capacity the whole batch. Each expert's
  gate, down and up matrices are Mixtral's w1, w2 and w3.

`config.json` says everything our config implies; reading one back refuses what our model does
not compute (biases, scaled or windowed attention, another activation) rather than guess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from rtdlm.model.config import ModelConfig
from rtdlm.model.transformer import stack_layers, unstack_layers

Params = Mapping[str, Mapping[str, Any]]

ARCHITECTURE = "LlamaForCausalLM"
MIXTURE = "MixtralForCausalLM"
CONFIG = "config.json"
GENERATION = "generation_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# (Hugging Face name per layer, our module, our parameter, transposed)
_LAYER = [
    ("input_layernorm.weight", "attn_norm", "scale", False),
    ("self_attn.q_proj.weight", "attn/query", "w", True),
    ("self_attn.k_proj.weight", "attn/key", "w", True),
    ("self_attn.v_proj.weight", "attn/value", "w", True),
    ("self_attn.o_proj.weight", "attn/out", "w", True),
    ("post_attention_layernorm.weight", "mlp_norm", "scale", False),
    ("mlp.gate_proj.weight", "mlp/gate", "w", True),
    ("mlp.up_proj.weight", "mlp/up", "w", True),
    ("mlp.down_proj.weight", "mlp/down", "w", True),
]


# (Mixtral name per layer, our module, our parameter, transposed); experts' names hold {e}
_MIXTURE = [
    *_LAYER[:6],
    ("block_sparse_moe.gate.weight", "moe/router", "w", True),
    ("block_sparse_moe.experts.{e}.w1.weight", "moe", "w_gate", True),
    ("block_sparse_moe.experts.{e}.w2.weight", "moe", "w_down", True),
    ("block_sparse_moe.experts.{e}.w3.weight", "moe", "w_up", True),
]


class HfError(ValueError):
    """A Hugging Face checkpoint (or a model headed for one) the other side cannot represent,
    as one line naming the field."""


def architecture(cfg: ModelConfig) -> str:
    return MIXTURE if cfg.moe_every else ARCHITECTURE


def _names(cfg: ModelConfig) -> list[tuple[str, str, str, int | None, bool]]:
    """Every (HF name, our module, our parameter, expert or None, transposed) of `cfg`."""
    names: list[tuple[str, str, str, int | None, bool]]
    names = [("model.embed_tokens.weight", "embed", "embeddings", None, False)]
    for i in range(cfg.num_layers):
        for hf, module, name, transposed in _MIXTURE if cfg.is_moe_layer(i) else _LAYER:
            hf, module = f"model.layers.{i}.{hf}", f"block_{i}/{module}"
            experts = range(cfg.num_experts) if "{e}" in hf else [None]
            names += [(hf.format(e=e), module, name, e, transposed) for e in experts]
    names.append(("model.norm.weight", "final_norm", "scale", None, False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "unembed", "w", None, True))
    return names


def check_exportable(cfg: ModelConfig) -> None:
    """HfError unless `cfg` computes what Llama or Mixtral does."""
    if cfg.moe_every > 1:
        raise HfError(
            f"a mixture-of-experts model exports as Mixtral, whose every block is a mixture, "
            f"where ours mixes dense blocks in (model.moe_every={cfg.moe_every}, not 1)"
        )
    no_drop = cfg.num_experts / cfg.experts_per_token
    if cfg.moe_every and cfg.capacity_factor < no_drop:
        raise HfError(
            f"a mixture-of-experts model exports as Mixtral, which never drops a token, where "
            f"ours drops those over an expert's capacity: only model.capacity_factor >= "
            f"num_experts / experts_per_token = {no_drop:g} (not {cfg.capacity_factor:g}) "
            "drops none"
        )


def hf_config(
    cfg: ModelConfig,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> dict[str, Any]:
    """config.json for `cfg`: every field transformers' LlamaConfig reads, stated."""
    check_exportable(cfg)
    config: dict[str, Any] = {
        "architectures": [architecture(cfg)],
        "model_type": "mixtral" if cfg.moe_every else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,  # nosec B105 # a token id, not a password
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if cfg.moe_every:
        return config | {
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }
    return config | {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def to_hf(params: Params, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Our float parameters (looped or scanned layout) as Hugging Face tensors in `dtype`."""
    check_exportable(cfg)
    if cfg.scan_layers:
        params = unstack_layers(params, cfg)
    tensors, arrays = {}, {}
    for hf, module, name, expert, transposed in _names(cfg):
        if (module, name) not in arrays:  # once per array, not once per expert
            arrays[module, name] = np.asarray(params[module][name], np.float32)
        value = arrays[module, name] if expert is None else arrays[module, name][expert]
        tensors[hf] = np.ascontiguousarray((value.T if transposed else value).astype(DTYPES[dtype]))
    return tensors


def from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Hugging Face tensors as our float32 parameters, in `cfg`'s layout (scanned or looped)."""
    names = _names(cfg)
    expected = {hf for hf, *_ in names}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected - {"lm_head.weight"})  # tied: HF may still save it
    if missing or extra:
        which = (
            f"lacks {missing[0]}"
            if missing
            else f"has {extra[0]}, which {architecture(cfg)} has not"
        )
        raise HfError(f"the checkpoint {which} ({len(missing)} missing, {len(extra)} unknown)")
    params: dict[str, dict[str, Any]] = {}
    experts: dict[tuple[str, str], list[np.ndarray]] = {}
    for hf, module, name, expert, transposed in names:
        value = np.asarray(tensors[hf]).astype(np.float32)
        value = np.ascontiguousarray(value.T if transposed else value)
        if expert is None:
            params.setdefault(module, {})[name] = value
        else:
            experts.setdefault((module, name), []).append(value)
    for (module, name), values in experts.items():
        params.setdefault(module, {})[name] = np.stack(values)
    shapes: dict[tuple[str, str], tuple[int, ...]] = {  # what the config says ours should be
        ("embed", "embeddings"): (cfg.vocab_size, cfg.d_model),
        ("block_0/attn/key", "w"): (cfg.d_model, cfg.num_kv_heads * cfg.head_dim),
    }
    if cfg.is_moe_layer(0):
        shapes[("block_0/moe", "w_gate")] = (cfg.num_experts, cfg.d_model, cfg.ffn_dim)
    else:
        shapes[("block_0/mlp/gate", "w")] = (cfg.d_model, cfg.ffn_dim)
    for (module, name), shape in shapes.items():
        if params[module][name].shape != shape:
            raise HfError(
                f"{module}/{name} is {params[module][name].shape} in the weights, but config.json "
                f"implies {shape}"
            )
    return stack_layers(params, cfg) if cfg.scan_layers else params


def _refuse(field: str, value: Any, why: str) -> HfError:
    return HfError(f"config.json: {field}={value!r} is not supported: {why}")


def model_config(config: Mapping[str, Any], seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig for a Llama-architecture config.json, or HfError naming the first
    field our model would compute differently. `seq_len` defaults to max_position_embeddings."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or [ARCHITECTURE]
    if model_type != "llama" or ARCHITECTURE not in architectures:
        raise _refuse("model_type", model_type, f"only {ARCHITECTURE} (model_type llama) loads")
    for field, ok, why in (
        ("attention_bias", False, "our attention has no biases"),
        ("mlp_bias", False, "our MLP has no biases"),
        ("hidden_act", "silu", "our MLP is SwiGLU (silu)"),
        ("rope_scaling", None, "our rotary positions are unscaled"),
        ("sliding_window", None, "our attention sees the whole context"),
    ):
        if config.get(field, ok) != ok:
            raise _refuse(field, config[field], why)
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _refuse("rope_parameters.rope_type", rope["rope_type"], "ours is the default")
    d_model, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d_model:
        raise _refuse("head_dim", head_dim, "ours is hidden_size / num_attention_heads")
    try:
        return ModelConfig(
            d_model=d_model,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            seq_len=int(seq_len or config.get("max_position_embeddings") or 2048),
            vocab_size=int(config["vocab_size"]),
            d_ff=int(config["intermediate_size"]),
            rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as error:
        raise HfError(f"config.json has no {error.args[0]}") from None
    except ValueError as error:
        raise HfError(f"config.json: {error}") from None


def save(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """config.json, generation_config.json and the weights into `directory`: one
    model.safetensors, or shards of at most `max_shard_bytes` with model.safetensors.index.json
    above that. The files written."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id")}
    generation |= {"do_sample": False, "max_length": config["max_position_embeddings"]}
    (directory / GENERATION).write_text(json.dumps(generation, indent=2) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    metadata = {"format": "pt"}  # what transformers checks for
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS), metadata=metadata)
        return [CONFIG, GENERATION, WEIGHTS]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards, strict=True):
        save_file(shard, str(directory / file), metadata=metadata)
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
        "weight_map": {
            name: file for file, shard in zip(files, shards, strict=False) for name in shard
        },
    }
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [CONFIG, GENERATION, *files, INDEX]


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint directory."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise HfError(
            f"{directory} has no {CONFIG}: is it a Hugging Face model directory?"
        ) from None
    except ValueError as error:
        raise HfError(f"{directory / CONFIG} is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise HfError(f"{directory / CONFIG} is not a JSON object")
    return config


def load(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json and every tensor of a Hugging Face checkpoint directory, sharded or not."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config, directory = read_config(directory), Path(directory)
    if (directory / INDEX).is_file():
        files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    elif (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise HfError(f"{directory} has neither {WEIGHTS} nor {INDEX} (only safetensors load)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            tensors.update(load_file(str(directory / file)))
        except (SafetensorError, OSError) as error:
            raise HfError(
                f"{directory / file} is not a readable safetensors file ({error})"
            ) from None
    return config, tensors
