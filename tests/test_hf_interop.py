"""Hugging Face checkpoints out of a trained run and into a new one, with transformers itself in
the Python that build-support/hf-venv.sh makes (RTDLM_HF_PYTHON): what a user of transformers
gets must be what rtdlm.model computes, both ways."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from conftest import SMALL_RUN

from rtdlm.ckpt import restore_params
from rtdlm.data import load_held_out
from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.hf import byte_tokenizer_json
from rtdlm.export.artifact import load_checkpoint
from rtdlm.model import build, generate, hf
from rtdlm_exporter.main import main as exporter
from rtdlm_trainer.main import main as trainer
from rtdlm_trainer.prepare_data import main as prepare_data

pytestmark = pytest.mark.slow

FAST = [*SMALL_RUN, "--max-steps", "6", "--eval-every", "6", "--metrics-port", "0"]
FAST += ["--set", "model.num_kv_heads=2", "--seq-len", "64"]  # grouped-query attention

# A transformers user's few lines: AutoTokenizer, AutoModelForCausalLM, generate, decode; for
# each (directory, prompt, new tokens) on the command line, one JSON line.
USER = """
import json, sys, transformers
for directory, prompt, new_tokens in zip(*[iter(sys.argv[1:])] * 3):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=int(new_tokens), do_sample=False)[0, ids.shape[1]:]
    text = tokenizer.decode(out, skip_special_tokens=True)
    print(json.dumps({"prompt": ids[0].tolist(), "new": out.tolist(), "text": text}))
"""


def transformers_user(hf_python: str, *jobs: tuple[Path, str, int]) -> list[dict[str, Any]]:
    """What USER gets from each (directory, prompt, new tokens), in one transformers process."""
    argv = [str(field) for job in jobs for field in job]
    done = subprocess.run([hf_python, "-c", USER, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(jobs) :]]


@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run on the built-in data and byte tokenizer."""
    run = tmp_path_factory.mktemp("bytes") / "run"
    assert trainer([*FAST, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run on shards under a BPE (with an EOS) that prepare-data trained."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in stdlib_documents()))
    bpe = ["--train-tokenizer", "bpe", "--vocab-size", "300"]
    assert prepare_data([str(corpus), "--output", str(root / "shards"), *bpe]) == 0
    data = ["--set", f"data.path={root / 'shards'}"]
    assert trainer([*FAST, *data, "--run-dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run whose every block is a mixture of 4 experts, 2 per token, none dropped, on
    shards under a SentencePiece BPE with byte fallback (Llama's kind): Mixtral's layout and a
    converted tokenizer in one export."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("mixture")
    texts = [text for _, text in stdlib_documents()]
    (root / "corpus.txt").write_text("\n".join(texts[:60]))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spm_flags = ["--sentencepiece", str(root / "sp.model")]
    assert prepare_data([str(corpus), "--output", str(root / "shards"), *spm_flags]) == 0
    sets = [f"data.path={root / 'shards'}", "model.moe_every=1", "model.num_experts=4"]
    sets.append("model.capacity_factor=2")
    assert (
        trainer([*FAST, *(f for s in sets for f in ("--set", s)), "--run-dir", str(root / "run")])
        == 0
    )
    return root / "run"


RUNS = ["bytes_run", "bpe_run", "mixture_run"]


@pytest.fixture(scope="module")
def exports(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hf_python: str
) -> dict[str, tuple[Path, Path, str, dict[str, Any]]]:
    """Each run exported through `exporter hf` (what it printed), then what a transformers user
    generates from each export, all users in one process: {run: (run, export, printed, theirs)}."""
    exported = {}
    for name in RUNS:
        run, out = request.getfixturevalue(name), tmp_path_factory.mktemp(name) / "hf"
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            export = ["hf", "--checkpoint", str(run), "--out", str(out), "--hf-python", hf_python]
            assert exporter(export) == 0
        exported[name] = (run, out, printed.getvalue())
    jobs = [(out, "The ", 24) for _, out, _ in exported.values()]
    every = request.getfixturevalue("every_run")  # what the trainer wrote at step 3 of 6
    exported["every_run"] = (every, every / "hf" / "3", "")
    users = transformers_user(hf_python, *jobs, (every / "hf" / "3", "The ", 4))
    return {
        name: (*done, theirs) for (name, done), theirs in zip(exported.items(), users, strict=True)
    }


@pytest.mark.parametrize("trained_run", RUNS)
def test_transformers_loads_the_export_and_generates_what_rtdlm_does(
    trained_run: str, exports: dict[str, tuple[Path, Path, str, dict[str, Any]]]
) -> None:
    run, out, printed, theirs = exports[trained_run]
    assert "within 1e-04" in printed and "the same 48 greedy tokens" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    artifact = json.loads((out / "artifact.json").read_text())
    assert artifact["kind"] == "huggingface"
    mixture = trained_run == "mixture_run"
    assert artifact["huggingface"]["architecture"] == (
        "MixtralForCausalLM" if mixture else "LlamaForCausalLM"
    )

    trained = load_checkpoint(run)
    _, tokenizer = load_held_out(run / "data")
    prompt = tokenizer.prompt("The ")
    assert theirs["prompt"] == prompt.tolist()
    ours = generate(
        trained.params,
        prompt[None],
        jax.random.PRNGKey(0),
        cfg=trained.cfg,
        max_new_tokens=24,
        temperature=0.0,
    ).tokens[0]
    ours = np.asarray(ours).tolist()
    if tokenizer.eos_id in ours:  # transformers' generate stops there
        ours = ours[: ours.index(tokenizer.eos_id) + 1]
    assert theirs["new"] == ours
    text = tokenizer.decode(np.asarray(ours))
    if "\ufffd" not in text:  # invalid UTF-8 (from byte tokens) decodes to U+FFFD either way
        assert theirs["text"] == text


def test_a_failed_check_writes_nothing(
    bytes_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Python without transformers fails the check; none at all is one line before any work."""
    out = tmp_path / "hf"
    export = ["hf", "--checkpoint", str(bytes_run), "--out", str(out)]
    assert exporter([*export, "--hf-python", sys.executable]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("exporter: check failed: transformers could not load the export: ")
    assert "No module named" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("RTDLM_HF_PYTHON", raising=False)
    assert exporter(export) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exporter: error: exporter hf proves the export with transformers")
    assert "--hf-python" in err and "build-support/hf-venv.sh" in err
    assert list(tmp_path.iterdir()) == []


# A Llama made and saved by transformers itself (random weights, no download), with its logits
# on fixed tokens: what our import must reproduce.
MAKE_LLAMA = """
import sys, numpy, torch, transformers
for directory, bias in (("plain", False), ("bias", True)):
    directory = f"{sys.argv[1]}/{directory}"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=bias,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokens = torch.tensor(numpy.random.default_rng(0).integers(0, 256, (2, 24)))
    with torch.no_grad():
        numpy.save(f"{directory}/logits.npy", model(tokens).logits.numpy())
    numpy.save(f"{directory}/tokens.npy", tokens.numpy())
"""


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory, hf_python: str) -> Path:
    """<dir>/plain and <dir>/bias (attention biases), made in one transformers process."""
    root = tmp_path_factory.mktemp("llamas")
    subprocess.run([hf_python, "-c", MAKE_LLAMA, str(root)], check=True)
    for llama in ("plain", "bias"):  # our bytes, as exported
        (root / llama / "tokenizer.json").write_text(byte_tokenizer_json())
    return root


def test_a_transformers_llama_imports_trains_resumes_and_exports_again(
    tmp_path: Path, hf_python: str, llamas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llama = llamas / "plain"
    config, tensors = hf.load(llama)
    cfg = hf.model_config(config)
    ours = build(cfg).apply(hf.from_hf(tensors, cfg), None, np.load(llama / "tokens.npy"))
    np.testing.assert_allclose(ours, np.load(llama / "logits.npy"), atol=1e-4)

    run = tmp_path / "run"
    start = [*SMALL_RUN, "--run-dir", str(run), "--init-from", str(llama), "--no-metrics"]
    start += ["--set", "model.num_layers=2", "--set", "optimizer.learning_rate=1e-9"]
    assert trainer([*start, "--max-steps", "1", "--eval-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "d_model: 64" in printed and "num_kv_heads: 2" in printed and "d_ff: 96" in printed
    first = restore_params(run / "checkpoints")
    for module, leaves in hf.from_hf(tensors, cfg).items():  # one step at a rate of ~1e-10
        for name, value in leaves.items():
            np.testing.assert_allclose(first.params[module][name], value, atol=1e-8)

    assert trainer([*start, "--max-steps", "3", "--eval-every", "3"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert (
        exporter(["hf", "--checkpoint", str(run), "--out", str(out), "--hf-python", hf_python]) == 0
    )
    _, exported = hf.load(out)
    last = restore_params(run / "checkpoints")
    assert last.step == 3
    for module, leaves in hf.from_hf(exported, cfg).items():  # import(export(checkpoint))
        for name, value in leaves.items():
            assert np.asarray(last.params[module][name]).tobytes() == value.tobytes()


def test_a_checkpoint_our_model_cannot_compute_is_one_line_and_writes_nothing(
    tmp_path: Path, llamas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llama = llamas / "bias"
    run = tmp_path / "run"
    assert trainer([*SMALL_RUN, "--run-dir", str(run), "--init-from", str(llama)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"trainer: error: train.init_from {llama}: config.json: attention_bias=True is not "
        "supported: our attention has no biases"
    )
    assert not run.exists()


@pytest.fixture(scope="module")
def every_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that writes the Hugging Face layout every 3 of its 6 steps."""
    run = tmp_path_factory.mktemp("every") / "run"
    every = ["--set", "train.hf_export_every=3", "--max-steps", "6", "--checkpoint-every", "6"]
    assert trainer([*SMALL_RUN, "--run-dir", str(run), "--no-metrics", *every]) == 0
    return run


def test_the_trainer_writes_the_layout_every_n_steps(
    every_run: Path, exports: dict[str, tuple[Path, Path, str, dict[str, Any]]]
) -> None:
    run = every_run
    assert sorted(p.name for p in (run / "hf").iterdir()) == ["3", "6"]
    checkpoint = restore_params(run / "checkpoints")
    _, tensors = hf.load(run / "hf" / "6")
    for module, leaves in hf.from_hf(tensors, load_checkpoint(run).cfg).items():
        for name, value in leaves.items():
            assert np.asarray(checkpoint.params[module][name]).tobytes() == value.tobytes()
    *_, theirs = exports["every_run"]  # transformers loads the layout of step 3
    assert theirs["prompt"] == list(b"The ")
