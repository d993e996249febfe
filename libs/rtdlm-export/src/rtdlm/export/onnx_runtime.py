"""Running an exported ONNX model in ONNX Runtime: prefill, decode steps, generation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort

from rtdlm.export.artifact import ExportError, model_config, read_artifact
from rtdlm.model import ModelConfig, sample

KIND = "onnx"
GRAPHS = {"prefill": "prefill.onnx", "decode": "decode.onnx"}


def check_context(seq_len: int, prompt_len: int, new_tokens: int) -> None:
    if prompt_len < 1:
        raise ExportError("the prompt is empty: give at least one token of text")
    if prompt_len + new_tokens > seq_len:
        raise ExportError(
            f"the prompt ({prompt_len} tokens) plus {new_tokens} new tokens exceeds the model's "
            f"context of {seq_len} tokens: shorten the prompt or ask for fewer tokens"
        )


class OnnxModel:
    """The prefill and decode graphs in `directory`, in ONNX Runtime sessions."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        cfg: ModelConfig,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,  # 0: ONNX Runtime's default (all cores)
    ) -> None:
        self.directory, self.cfg = Path(directory), cfg
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = threads
        self.sessions = {
            graph: ort.InferenceSession(
                str(self.directory / file), options, providers=list(providers)
            )
            for graph, file in GRAPHS.items()
        }
        layers = range(cfg.num_layers)
        self.past = [f"past_{kind}.{i}" for i in layers for kind in ("key", "value")]

    @classmethod
    def open(cls, path: str | os.PathLike[str], **options: Any) -> tuple[OnnxModel, dict]:
        """The model of an ONNX artifact, verified, and its artifact.json."""
        manifest = read_artifact(path, (KIND,))
        return cls(path, model_config(manifest.get("model"), str(path)), **options), manifest

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """logits [batch, time, vocab] of tokens [batch, time], and the cache they leave."""
        logits, *cache = self.sessions["prefill"].run(
            None, {"input_ids": np.asarray(tokens, np.int64)}
        )
        return logits, cache

    def step(
        self, tokens: np.ndarray, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """logits [batch, 1, vocab] of one more token per row [batch, 1], and the longer cache."""
        feed = {
            "input_ids": np.asarray(tokens, np.int64),
            **dict(zip(self.past, cache, strict=True)),
        }
        logits, *cache = self.sessions["decode"].run(None, feed)
        return logits, cache

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self.prefill(tokens)[0]

    def generate(
        self,
        prompt: np.ndarray,
        new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> np.ndarray:
        """Continues each row of prompt [batch, prompt_len] by new_tokens tokens: prefill once,
        then one decode step per token with the cache. Tokens are chosen by rtdlm.model.sample,
        the JAX model's own sampling, with its key split the same way each step."""
        check_context(self.cfg.seq_len, prompt.shape[1], new_tokens)
        key = jax.random.PRNGKey(seed)
        logits, cache = self.prefill(prompt)
        tokens = []
        for _ in range(new_tokens):
            key, step_key = jax.random.split(key)
            chosen = sample(jnp.asarray(logits[:, -1]), step_key, temperature, top_k, top_p)
            token = np.asarray(chosen).astype(np.int64)
            tokens.append(token)
            if len(tokens) < new_tokens:
                logits, cache = self.step(token[:, None], cache)
        return np.stack(tokens, axis=1) if tokens else np.zeros((len(prompt), 0), np.int64)
