"""Our tokenizers as Hugging Face tokenizer files, read back by the `tokenizers` library (the
engine of transformers' fast tokenizers; tests/test_hf_interop.py loads them with AutoTokenizer)."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HfTokenizer

from rtdlm.data import BYTES, DataError, train_bpe
from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.hf import byte_symbols, byte_tokenizer_json, save_hf_tokenizer

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


def test_a_sentencepiece_model_is_refused_saying_what_exports(tmp_path: Path) -> None:
    from dataclasses import replace

    spm = replace(BYTES, name="sentencepiece:sp.model", index_entry={"kind": "sentencepiece"})
    with pytest.raises(DataError, match="a sentencepiece tokenizer has no Hugging Face"):
        save_hf_tokenizer(spm, tmp_path, 64)
