"""The PyTorch reference the suite races: RT-DLM's architecture and AdamW step, written the way
a PyTorch user would (nn.Module, F.scaled_dot_product_attention, torch.optim.AdamW, autocast).

It runs under a Python that has torch (build-support/hf-venv.sh makes one), never in the
project's resolves, and imports nothing of RT-DLM. As a worker it reads one JSON command a
line on stdin and answers one JSON line on stdout, so the suite can alternate its steps with
RT-DLM's in one run:

    {"build": {"d_model": ..., "batch": ..., "seq_len": ..., "dtype": "bfloat16", ...}}
    {"steps": 3}   ->   {"seconds": [...], "loss": ...}

Same model as rtdlm.model.transformer: pre-norm RMSNorm blocks (float32 norm), rotary
positions on each head's two halves, grouped-query causal attention, a SwiGLU MLP, embeddings
tied to the output, float32 logits. Same step as rtdlm.train.loop: cross-entropy, global-norm
clipping, AdamW with decay on matrices only and warmup + cosine. Where PyTorch offers a
faster equivalent it takes it: causal attention without a document mask (RT-DLM's masks
packed documents apart, which costs it more), AdamW's fused CPU kernel, bfloat16 through
autocast with float32 parameters.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import numpy as np  # pants: no-infer-dep
import torch  # pants: no-infer-dep
import torch.nn.functional as F  # pants: no-infer-dep
from torch import nn  # pants: no-infer-dep


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.scale).type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
        self.head_dim = cfg["d_model"] // self.heads
        kv = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg["d_model"], cfg["d_model"] + 2 * kv, bias=False)
        self.out = nn.Linear(cfg["d_model"], cfg["d_model"], bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, time, d = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([d, kv, kv], dim=-1)
        q = q.view(batch, time, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, time, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, time, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads
        )
        return self.out(y.transpose(1, 2).reshape(batch, time, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg["d_model"], cfg["norm_eps"])
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg["d_model"], cfg["norm_eps"])
        self.mlp = MLP(cfg["d_model"], cfg["d_ff"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["num_layers"]))
        self.final_norm = RMSNorm(cfg["d_model"], cfg["norm_eps"])
        half = cfg["d_model"] // cfg["num_heads"] // 2
        inv_freq = cfg["rope_base"] ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = torch.arange(cfg["seq_len"], dtype=torch.float32)[:, None] * inv_freq
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:  # RT-DLM's initialisation: truncated normals
                std = 0.02 if name == "embed.weight" else 1 / math.sqrt(p.shape[1])
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        time = tokens.shape[1]
        cos, sin = self.cos[:time], self.sin[:time]
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.final_norm(x)
        return F.linear(x, self.embed.weight).float()  # tied, float32 logits


def optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only, on PyTorch's fused CPU kernel."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": matrices, "weight_decay": cfg["weight_decay"]},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg["learning_rate"], betas=(cfg["b1"], cfg["b2"]), eps=cfg["eps"], fused=True
    )


def schedule(cfg: dict[str, Any]) -> Any:
    warmup, decay, floor = cfg["warmup_steps"], cfg["decay_steps"], cfg["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, decay - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Run:
    """A model, its optimizer and a batch of the same bytes RT-DLM trains on."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        torch.manual_seed(cfg.get("seed", 0))
        self.cfg = cfg
        self.model = GPT(cfg)
        self.optimizer = optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(cfg))
        rows = np.load(cfg["tokens"])  # [batch, seq_len + 1]
        self.tokens = torch.from_numpy(rows.astype(np.int64))
        self.bf16 = cfg["dtype"] == "bfloat16"

    def step(self) -> float:
        inputs, targets = self.tokens[:, :-1], self.tokens[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())


def serve() -> None:
    run: Run | None = None
    for line in sys.stdin:
        command = json.loads(line)
        if "build" in command:
            run = Run(command["build"])
            answer: dict[str, Any] = {
                "params": sum(p.numel() for p in run.model.parameters()),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        else:
            assert run is not None  # nosec B101 # the suite builds before it steps
            seconds, loss = [], 0.0
            for _ in range(command["steps"]):
                start = time.perf_counter()
                loss = run.step()
                seconds.append(time.perf_counter() - start)
            answer = {"seconds": seconds, "loss": loss}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
