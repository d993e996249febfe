"""Our tokenizers as Hugging Face tokenizer files, read back by the `tokenizers` library (the
engine of transformers' fast tokenizers; tests/test_hf_interop.py loads them with AutoTokenizer)."""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HfTokenizer

from rtdlm.data import BYTES, DataError, huggingface, sentencepiece, train_bpe
from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.hf import (
    byte_symbols,
    byte_tokenizer_json,
    save_hf_tokenizer,
    sentencepiece_tokenizer_json,
)

BYTE_TOKENIZER = HfTokenizer.from_str(byte_tokenizer_json())


def test_each_byte_has_its_own_printable_symbol() -> None:
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and all(s.isprintable() and len(s) == 1 for s in symbols)
    assert symbols[ord("A")] == "A" and symbols[ord(" ")] == "Ġ" and symbols[ord("\n")] == "Ċ"


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_the_byte_tokenizer_json_gives_our_ids_and_text_back(text: str) -> None:
    ids = BYTE_TOKENIZER.encode(text).ids
    assert ids == BYTES.encode(text).tolist()
    assert BYTE_TOKENIZER.decode(ids) == text


def test_files_for_the_byte_tokenizer_and_a_trained_bpe(tmp_path: Path) -> None:
    (tmp_path / "bytes").mkdir()
    assert save_hf_tokenizer(BYTES, tmp_path / "bytes", 256) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "bytes" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["model_max_length"]) == (
        None,
        None,
        256,
    )

    texts = [text for _, text in stdlib_documents()[:40]]
    bpe = train_bpe(texts, 300, tmp_path / "bpe.json")
    (tmp_path / "out").mkdir()
    save_hf_tokenizer(bpe, tmp_path / "out", 64)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        tmp_path / "bpe.json"
    ).read_bytes()
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and bpe.eos_id is not None
    hf = HfTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert hf.token_to_id(config["eos_token"]) == bpe.eos_id


def sentencepiece_model(directory: Path, model_type: str, byte_fallback: bool = False) -> Path:
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(text for _, text in stdlib_documents()[:60]))
    prefix = directory / f"{model_type}{int(byte_fallback)}"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=800 if byte_fallback else 500,  # 256 byte pieces on top
        model_type=model_type,
        byte_fallback=byte_fallback,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory: pytest.TempPathFactory) -> tuple[spm.SentencePieceProcessor, Any]:
    """A BPE with byte fallback, as Llama's and Mistral's SentencePiece models are."""
    model = sentencepiece_model(tmp_path_factory.mktemp("spm"), "bpe", byte_fallback=True)
    converted = HfTokenizer.from_str(sentencepiece_tokenizer_json(model))
    return spm.SentencePieceProcessor(model_file=str(model)), converted


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from(list("ab XY\t\n*=-.é中😀▁<>\u3000\uff21")), max_size=40))
def test_a_sentencepiece_bpe_converts_to_the_same_ids_and_text(
    llama_style: tuple[spm.SentencePieceProcessor, Any], text: str
) -> None:
    """Runs of spaces, full-width letters (NFKC), unknown characters as bytes, "▁" itself."""
    ours, theirs = llama_style
    ids = theirs.encode(text, add_special_tokens=False).ids
    assert ids == ours.encode(text)
    assert theirs.decode(ids) == ours.decode(ids)


def test_sentencepiece_models_encode_held_out_documents_alike(tmp_path: Path) -> None:
    """BPE exactly; unigram up to ties SentencePiece's float32 sums break one way and the
    float64 ones of `tokenizers` the other (Python's docs underline headings with runs of "*",
    where they tie often): then the pieces are a reordering of each other, equally likely."""
    documents = [text for _, text in stdlib_documents()[60:]]
    for model_type in ("bpe", "unigram"):
        model = sentencepiece_model(tmp_path, model_type)
        ours = spm.SentencePieceProcessor(model_file=str(model))
        theirs = HfTokenizer.from_str(sentencepiece_tokenizer_json(model))
        for text in documents:
            a, b = ours.encode(text), theirs.encode(text, add_special_tokens=False).ids
            if a != b:
                assert model_type == "unigram" and sorted(a) == sorted(b)
                assert math.isclose(sum(map(ours.get_score, a)), sum(map(ours.get_score, b)))


def test_sentencepiece_files_name_its_specials_and_start_with_bos(tmp_path: Path) -> None:
    model = sentencepiece_model(tmp_path, "bpe")
    tokenizer = sentencepiece(model)
    save_hf_tokenizer(tokenizer, tmp_path, 128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    hf = HfTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode("a prompt").ids == tokenizer.prompt("a prompt").tolist()
    assert huggingface(tmp_path / "tokenizer.json").encode("a prompt").tolist() == (
        tokenizer.encode("a prompt").tolist()
    )


def test_a_sentencepiece_model_without_a_tokenizer_json_form_is_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text for _, text in stdlib_documents()[:5]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "w"), model_type="word", vocab_size=200
    )
    with pytest.raises(DataError, match=r"w.model is a SentencePiece WORD model; only unigram"):
        save_hf_tokenizer(sentencepiece(tmp_path / "w.model"), tmp_path, 64)
    (tmp_path / "bad.model").write_bytes(b"\xff" * 10)
    with pytest.raises(DataError, match="bad.model is not a SentencePiece model"):
        sentencepiece_tokenizer_json(tmp_path / "bad.model")
