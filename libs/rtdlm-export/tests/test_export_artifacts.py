"""INT8 and ONNX artifacts of small models saved as real checkpoints, through the lib's API."""

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import optax
import pytest

from rtdlm.ckpt import CheckpointManager
from rtdlm.data import BYTES
from rtdlm.export import int8, onnx_export, quality
from rtdlm.export.artifact import (
    CheckFailed,
    ExportError,
    Trained,
    load_checkpoint,
    params_sha256,
)
from rtdlm.export.onnx_runtime import OnnxModel
from rtdlm.export.quantize import quantize
from rtdlm.model import ModelConfig, build, build_decoder, generate, init_cache

CFG = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=64, vocab_size=96)


def held_out(cfg: ModelConfig, tokens: int = 1024) -> np.ndarray:
    """Rows of a pattern a model learns in a few steps: each token is the last one plus 1."""
    documents = [np.arange(i, i + 300) % cfg.vocab_size for i in range(8)]
    return quality.windows(documents, cfg.seq_len, tokens)


@functools.cache
def training(cfg: ModelConfig) -> tuple[Callable, Callable]:
    """`cfg`'s init and training step, jitted once per config: one compile each, not one per
    operation and checkpoint."""
    model = build(cfg)
    optimizer = optax.adam(1e-2)
    rows = jnp.asarray(held_out(cfg, 4096))

    @jax.jit
    def init(seed: int) -> tuple[hk.Params, optax.OptState]:
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
        return params, optimizer.init(params)

    @jax.jit
    def update(params: hk.Params, state: optax.OptState) -> tuple[hk.Params, optax.OptState]:
        def loss(params: hk.Params) -> jax.Array:
            logits = model.apply(params, None, rows[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    return init, update


def save_checkpoint(directory: Path, cfg: ModelConfig, step: int = 7, steps: int = 0) -> Path:
    """Checkpoint `step` of a model initialised from seed `step` and trained `steps` steps."""
    init, update = training(cfg)
    params, state = init(step)
    for _ in range(steps):
        params, state = update(params, state)
    with CheckpointManager(directory) as manager:
        manager.save(step, params=params, config={"model": dataclasses.asdict(cfg)})
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return load_checkpoint(save_checkpoint(tmp_path_factory.mktemp("run"), CFG, steps=40))


class Exported(NamedTuple):
    trained: Trained
    report: onnx_export.OnnxReport
    path: Path


def export(trained: Trained, directory: Path) -> Exported:
    path = directory / "onnx"
    report = onnx_export.export_onnx(trained, held_out(trained.cfg), path, BYTES)
    return Exported(trained, report, path)


@pytest.fixture(scope="module")
def tied_onnx(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The float32 ONNX artifact of `trained`, exported once: the tests that use it only read it."""
    return export(trained, tmp_path_factory.mktemp("tied"))


@pytest.fixture
def untied_scanned_onnx(tmp_path: Path) -> Exported:
    cfg = dataclasses.replace(CFG, tie_embeddings=False, num_layers=3, scan_layers=True)
    return export(load_checkpoint(save_checkpoint(tmp_path / "run", cfg, steps=20)), tmp_path)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_checkpoint_loads_with_its_config_and_a_digest_of_its_weights(trained: Trained) -> None:
    assert trained.cfg == CFG and trained.source["step"] == 7
    assert trained.source["params_sha256"] == params_sha256(trained.params)
    other = dict(trained.params, embed={"embeddings": trained.params["embed"]["embeddings"] + 1})
    assert params_sha256(other) != trained.source["params_sha256"]


def test_int8_round_trip(trained: Trained, tmp_path: Path) -> None:
    rows = held_out(CFG)
    report = int8.quantize_checkpoint(trained, rows, tmp_path / "int8", BYTES)
    assert abs(report.vs_float32.increase) < 0.02 and report.int8_bytes < report.float32_bytes / 3
    assert leftovers(tmp_path) == ["int8"]
    cfg, params, manifest = int8.load(tmp_path / "int8")
    assert cfg == CFG and manifest["kind"] == "jax-int8"
    assert manifest["source"] == dict(trained.source) and manifest["tokenizer"] == {"kind": "bytes"}
    measured = report.vs_float32.measured.perplexity
    assert manifest["quality"]["perplexity"] == pytest.approx(measured)
    expected = quantize(trained.params)
    for module in expected:
        for name, value in expected[module].items():
            np.testing.assert_array_equal(params[module][name], value)
    prompt = quality.jax_reference(cfg, trained.params, rows).prompt
    again = quality.jax_greedy(cfg, params, prompt, report.vs_float32.greedy_measured.shape[1])
    np.testing.assert_array_equal(again, report.vs_float32.greedy_measured)


def test_int8_that_hurts_perplexity_fails_and_writes_nothing(
    trained: Trained, tmp_path: Path
) -> None:
    """A weight row far larger than the rest that the model never reads (its input feature
    is scaled to 0 by the norm) costs float32 nothing, but sets every INT8 step in its matrix:
    the other weights round to 0, perplexity jumps, and the export is refused."""
    params = jax.tree_util.tree_map(np.copy, trained.params)
    for module, leaves in params.items():
        if module.endswith("_norm") and module != "final_norm":
            leaves["scale"][0] = 0.0
        if module.split("/")[-1] in ("query", "key", "value", "gate", "up"):
            leaves["w"][0] = 1000.0
    broken = dataclasses.replace(trained, params=params)
    rows = held_out(CFG)
    before = quality.perplexity(quality.jax_logits(CFG, trained.params), rows, 16)
    after = quality.perplexity(quality.jax_logits(CFG, params), rows, 16)
    assert before.perplexity < 2.0 and after.perplexity < 2.0  # a model that learned the rows
    with pytest.raises(CheckFailed, match=r"INT8 held-out perplexity .* above float32's .*limit"):
        int8.quantize_checkpoint(broken, rows, tmp_path / "int8", BYTES)
    assert leftovers(tmp_path) == []


def test_a_changed_byte_in_an_artifact_is_refused(trained: Trained, tmp_path: Path) -> None:
    int8.quantize_checkpoint(trained, held_out(CFG), tmp_path / "int8", BYTES)
    weights = tmp_path / "int8" / int8.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"int8 is corrupt: model.safetensors does not match"):
        int8.load(tmp_path / "int8")


def test_an_existing_output_is_kept_unless_forced(trained: Trained, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("keep")
    with pytest.raises(ExportError, match="out exists; pass --force to replace it"):
        int8.quantize_checkpoint(trained, held_out(CFG), tmp_path / "out", BYTES)
    assert (tmp_path / "out" / "mine").read_text() == "keep"
    int8.quantize_checkpoint(trained, held_out(CFG), tmp_path / "out", BYTES, force=True)
    assert "mine" not in leftovers(tmp_path / "out") and leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize(
    "exported", ["tied_onnx", "untied_scanned_onnx"], ids=["tied", "untied-scanned"]
)
def test_onnx_matches_the_model_and_generates_the_same_tokens(
    exported: str, request: pytest.FixtureRequest
) -> None:
    trained, report, path = request.getfixturevalue(exported)
    cfg = trained.cfg
    assert max(report.max_abs_diff.values()) <= 1e-4
    vs = report.vs_float32
    assert vs.greedy_agreement == vs.greedy_reference.size == 48  # seq 64: 16 + 48
    assert abs(vs.increase) < 1e-5
    assert len(report.checks) == 5
    model, manifest = OnnxModel.open(path)
    assert manifest["onnx"]["opset"] == onnx_export.OPSET and manifest["validation"]["checks"]

    # Dynamic axes: another batch and length than any the export checked, prefill then decode.
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (3, 9))
    decode = jax.jit(build_decoder(cfg).apply)  # a compile per shape, not per operation
    logits, cache = decode(trained.params, None, jnp.asarray(tokens), init_cache(cfg, 3, 11))
    onnx_logits, onnx_cache = model.prefill(tokens)
    np.testing.assert_allclose(onnx_logits, logits, atol=1e-4)
    for token in ([[1], [2], [3]], [[4], [5], [6]]):
        logits, cache = decode(trained.params, None, jnp.asarray(token), cache)
        onnx_logits, onnx_cache = model.step(np.asarray(token), onnx_cache)
        np.testing.assert_allclose(onnx_logits, logits, atol=1e-4)
    assert onnx_cache[0].shape == (3, cfg.num_kv_heads, 11, cfg.head_dim)

    # Sampling is rtdlm.model's own, keyed alike: the same seed gives the same tokens.
    prompt = tokens[:, :4]
    for temperature, top_k, top_p in ((0.8, 40, 1.0), (1.0, None, 0.9)):
        cut = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        key = jax.random.PRNGKey(3)
        ours = generate(trained.params, jnp.asarray(prompt), key, cfg=cfg, max_new_tokens=12, **cut)
        theirs = model.generate(prompt, 12, temperature, top_k, top_p, seed=3)
        np.testing.assert_array_equal(theirs, ours.tokens)

    # Each weight is stored once for both graphs, in the shared external data file.
    params_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(trained.params))
    data_bytes = (path / onnx_export.DATA).stat().st_size
    assert 0.95 * params_bytes < data_bytes < 1.1 * params_bytes  # norm scales stay inline
    graph = onnx.load(str(path / "decode.onnx"), load_external_data=False)
    assert {i.name for i in graph.graph.input} >= {"input_ids", "past_key.0", "past_value.1"}
    props = {p.key: p.value for p in graph.metadata_props}  # the graph file names its model too
    assert json.loads(props["rtdlm.model_config"]) == dataclasses.asdict(cfg)


def test_int8_onnx_quantizes_matmul_weights_and_holds_perplexity(
    trained: Trained, tmp_path: Path
) -> None:
    rows = held_out(CFG)
    report = onnx_export.export_onnx(trained, rows, tmp_path / "onnx8", BYTES, int8=True)
    assert report.int8 and abs(report.vs_float32.increase) < 0.02
    float_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(trained.params))
    int8_data = (tmp_path / "onnx8" / onnx_export.DATA).stat().st_size
    assert int8_data < float_bytes / 3  # INT8 matrices; the tied embedding stays float32
    graph = onnx.load(str(tmp_path / "onnx8" / "prefill.onnx"), load_external_data=False)
    ops = Counter(node.op_type for node in graph.graph.node)
    assert ops["MatMulInteger"] == 7 * CFG.num_layers  # q k v out gate up down; tied logits float
    manifest = json.loads((tmp_path / "onnx8" / "artifact.json").read_text())
    assert manifest["onnx"]["int8"] and manifest["validation"]["perplexity"] > 0
    assert onnx_export.verify_onnx(tmp_path / "onnx8", trained, rows).int8


def test_mixture_of_experts_is_refused_clearly(tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, num_layers=2, moe_every=2, num_experts=4)
    trained = load_checkpoint(save_checkpoint(tmp_path / "run", cfg))
    with pytest.raises(ExportError, match=r"mixture-of-experts .*\(exporter quantize\)"):
        onnx_export.export_onnx(trained, held_out(cfg), tmp_path / "onnx", BYTES)
    assert leftovers(tmp_path) == ["run"]


def test_verify_refuses_an_artifact_of_another_model_or_other_weights(
    tied_onnx: Exported, tmp_path: Path
) -> None:
    trained, _, path = tied_onnx
    rows = held_out(CFG)
    assert onnx_export.verify_onnx(path, trained, rows).vs_float32.greedy_agreement == 48
    wider = load_checkpoint(save_checkpoint(tmp_path / "wide", dataclasses.replace(CFG, d_ff=64)))
    with pytest.raises(ExportError, match=r"another model config .*d_ff: None vs 64"):
        onnx_export.verify_onnx(path, wider, rows)
    other = load_checkpoint(save_checkpoint(tmp_path / "other", CFG, step=8))
    with pytest.raises(ExportError, match=r"exported from other weights \(step 7 of .*step 8"):
        onnx_export.verify_onnx(path, other, rows)
