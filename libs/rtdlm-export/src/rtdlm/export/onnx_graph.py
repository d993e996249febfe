"""The model's inference graphs in ONNX, built op by op from its parameters.

Two graphs share every weight: `prefill` (input_ids [batch, sequence] -> logits and the cache of
every layer) and `decode` (one token per row and the cache -> logits and the cache one longer).
The cache is per layer, `past_key.{i}` / `past_value.{i}` [batch, kv_heads, past_sequence,
head_dim], the layout ONNX Runtime GenAI and Optimum use; the new position is the cache's
length. Batch and sequence axes are dynamic. Each block reads as the Haiku model does
(rtdlm.model.transformer): RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP.
Matrix weights are MatMul initializers named as the parameters are, so ONNX Runtime's
quantizer and a reader both find them; the model config is in the graph's metadata.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rtdlm.export.quantize import Params
from rtdlm.model import ModelConfig, unstack_layers

OPSET = 17  # ONNX Runtime, TensorRT 8.6+ and onnx.checker all accept it
IR_VERSION = 8  # the oldest that carries opset 17, for the widest range of runtimes


class UnsupportedModel(ValueError):
    """The model has a part with no ONNX graph here."""


class Graph:
    """Nodes and initializers in the making; each op returns its output's name."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.count = 0

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        self.count += 1
        output = name or f"{op_type.lower()}_{self.count}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=f"n{self.count}", **attrs)
        )
        return output

    def const(self, value: Any, name: str | None = None) -> str:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = name or f"const_{len(self.initializers)}"
        self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def param(self, module: str, name: str) -> str:
        key = f"{module}/{name}"
        if key not in self.initializers:
            self.const(np.asarray(self.params[module][name], np.float32), key)
        return key


def rms_norm(g: Graph, x: str, module: str, cfg: ModelConfig) -> str:
    # x / sqrt(mean(x^2) + eps) * scale: the shape ONNX Runtime fuses into one kernel.
    mean_square = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), axes=[-1], keepdims=1)
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_square, g.const(cfg.norm_eps))))
    return g.op("Mul", normed, g.param(module, "scale"))


def heads(g: Graph, x: str, count: int, cfg: ModelConfig) -> str:
    """[batch, time, count * head_dim] -> [batch, count, time, head_dim]."""
    split = g.op("Reshape", x, g.const([0, 0, count, cfg.head_dim]))
    return g.op("Transpose", split, perm=[0, 2, 1, 3])


def rotary(g: Graph, x: str, cos: str, sin: str, cfg: ModelConfig) -> str:
    half = cfg.head_dim // 2
    x1 = g.op("Slice", x, g.const([0]), g.const([half]), g.const([3]))
    x2 = g.op("Slice", x, g.const([half]), g.const([cfg.head_dim]), g.const([3]))
    first = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    second = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    return g.op("Concat", first, second, axis=3)


def attention(
    g: Graph, x: str, layer: int, cfg: ModelConfig, rope: tuple[str, str], bias: str, past: bool
) -> str:
    module = f"block_{layer}/attn"
    q = heads(g, g.op("MatMul", x, g.param(f"{module}/query", "w")), cfg.num_heads, cfg)
    k = heads(g, g.op("MatMul", x, g.param(f"{module}/key", "w")), cfg.num_kv_heads, cfg)
    v = heads(g, g.op("MatMul", x, g.param(f"{module}/value", "w")), cfg.num_kv_heads, cfg)
    q, k = rotary(g, q, *rope, cfg), rotary(g, k, *rope, cfg)
    if past:
        k = g.op("Concat", f"past_key.{layer}", k, axis=2)
        v = g.op("Concat", f"past_value.{layer}", v, axis=2)
    k = g.op("Identity", k, name=f"present_key.{layer}")
    v = g.op("Identity", v, name=f"present_value.{layer}")
    # Grouped-query attention: query head h reads kv head h // group, as in jax.nn's.
    group = cfg.num_heads // cfg.num_kv_heads
    q = g.op("Reshape", q, g.const([0, cfg.num_kv_heads, group, -1, cfg.head_dim]))
    k_t = g.op("Unsqueeze", g.op("Transpose", k, perm=[0, 1, 3, 2]), g.const([2]))
    scores = g.op("Mul", g.op("MatMul", q, k_t), g.const(1.0 / np.sqrt(cfg.head_dim)))
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    y = g.op("MatMul", probs, g.op("Unsqueeze", v, g.const([2])))
    y = g.op("Reshape", y, g.const([0, cfg.num_heads, -1, cfg.head_dim]))
    y = g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.const([0, 0, cfg.d_model]))
    return g.op("MatMul", y, g.param(f"{module}/out", "w"))


def mlp(g: Graph, x: str, layer: int) -> str:
    module = f"block_{layer}/mlp"
    gate = g.op("MatMul", x, g.param(f"{module}/gate", "w"))
    up = g.op("MatMul", x, g.param(f"{module}/up", "w"))
    hidden = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SiLU(gate) * up
    return g.op("MatMul", hidden, g.param(f"{module}/down", "w"))


def positions_and_mask(g: Graph, past: bool, cfg: ModelConfig) -> tuple[str, str, str]:
    """cos and sin [time, head_dim / 2] of the new positions, and the additive attention bias
    [time, past + time]: 0 where a query may see a key (not after itself), else float32 min."""
    length = g.op("Gather", g.op("Shape", "input_ids"), g.const(1))
    start = g.op("Gather", g.op("Shape", "past_key.0"), g.const(2)) if past else g.const(0)
    end = g.op("Add", start, length)
    query = g.op("Range", start, end, g.const(1))
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-np.arange(half, dtype=np.float32) / half)
    angles = g.op(
        "Mul",
        g.op("Unsqueeze", g.op("Cast", query, to=TensorProto.FLOAT), g.const([1])),
        g.const(inv_freq.astype(np.float32)),
    )
    keys = g.op("Range", g.const(0), end, g.const(1))
    visible = g.op(
        "LessOrEqual", g.op("Unsqueeze", keys, g.const([0])), g.op("Unsqueeze", query, g.const([1]))
    )
    bias = g.op(
        "Where", visible, g.const(np.float32(0.0)), g.const(np.float32(np.finfo(np.float32).min))
    )
    return g.op("Cos", angles), g.op("Sin", angles), bias


def decoder_graph(cfg: ModelConfig, params: Params, *, past: bool) -> onnx.ModelProto:
    """The prefill graph (past=False) or the decode-step graph (past=True) of a dense model
    with float32 parameters, in either layer layout."""
    if cfg.moe_every:
        raise UnsupportedModel(
            f"ONNX export of mixture-of-experts models (model.moe_every={cfg.moe_every}) is not "
            "supported: their capacity-limited routing has no graph here; export the JAX INT8 "
            "artifact (exporter quantize) instead"
        )
    if cfg.scan_layers:
        params = unstack_layers(params, cfg)
    g = Graph(params)
    cos, sin, bias = positions_and_mask(g, past, cfg)
    x = g.op("Gather", g.param("embed", "embeddings"), "input_ids", axis=0)
    for layer in range(cfg.num_layers):
        h = rms_norm(g, x, f"block_{layer}/attn_norm", cfg)
        x = g.op("Add", x, attention(g, h, layer, cfg, (cos, sin), bias, past))
        x = g.op("Add", x, mlp(g, rms_norm(g, x, f"block_{layer}/mlp_norm", cfg), layer))
    x = rms_norm(g, x, "final_norm", cfg)
    if cfg.tie_embeddings:
        unembed = g.op("Transpose", g.param("embed", "embeddings"), perm=[1, 0])
    else:
        unembed = g.param("unembed", "w")
    g.op("MatMul", x, unembed, name="logits")

    time: str | int = 1 if past else "sequence"
    cache_axes: list[str | int] = ["batch", cfg.num_kv_heads, "past_sequence", cfg.head_dim]
    present_axes: list[str | int] = [
        "batch",
        cfg.num_kv_heads,
        "total_sequence" if past else "sequence",
        cfg.head_dim,
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", time])]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", time, cfg.vocab_size])
    ]
    for layer in range(cfg.num_layers):
        for kind in ("key", "value"):
            if past:
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_{kind}.{layer}", TensorProto.FLOAT, cache_axes
                    )
                )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present_{kind}.{layer}", TensorProto.FLOAT, present_axes
                )
            )
    graph = helper.make_graph(
        g.nodes, "decode" if past else "prefill", inputs, outputs, list(g.initializers.values())
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rtdlm-export"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"rtdlm.model_config": json.dumps(dataclasses.asdict(cfg))})
    return model
