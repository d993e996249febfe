"""Tokenizers built or trained here (nothing downloaded): a trained BPE encodes as the
`tokenizers` library itself does, every kind round-trips documents through shards, and a
document carries the special tokens its tokenizer defines."""

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from rtdlm.data import BYTES, DataError, from_index, huggingface, load_data, sentencepiece
from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.prepare import prepare_shards
from rtdlm.data.tokenizer import END_OF_TEXT, train_bpe

TEXTS = [text for _, text in stdlib_documents()][:120]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(iter(TEXTS[:100]), 600, path)
    return path


def test_a_trained_bpe_encodes_as_the_tokenizers_library_does(bpe: Path) -> None:
    ours, theirs = huggingface(bpe), HfTokenizer.from_file(str(bpe))
    assert ours.vocab_size == theirs.get_vocab_size() == 600
    assert ours.eos_id == theirs.token_to_id(END_OF_TEXT) and ours.bos_id is None
    for text in TEXTS[100:]:  # text it was not trained on
        assert ours.encode(text).tolist() == theirs.encode(text).ids
    assert [ids.tolist() for ids in ours.documents(TEXTS[100:])] == [
        [*theirs.encode(text).ids, ours.eos_id] for text in TEXTS[100:]
    ]


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
def test_byte_level_bpe_decodes_any_text_back_exactly(bpe: Path, text: str) -> None:
    tokenizer = huggingface(bpe)
    assert tokenizer.decode(tokenizer.document(text)) == text  # EOS dropped in decoding


def llama_like(directory: Path) -> Path:
    """A tokenizer.json with BOS/EOS added by its template, as Llama's does."""
    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(TEXTS[:50], trainer)
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    path = directory / "tokenizer.json"
    hf.save(str(path))
    return path


def test_special_tokens_come_from_the_config_or_the_template(tmp_path: Path) -> None:
    path = llama_like(tmp_path)
    templated = huggingface(path)
    assert (templated.bos_id, templated.eos_id) == (0, 1)
    assert templated.document("abc").tolist() == HfTokenizer.from_file(str(path)).encode("abc").ids
    assert templated.prompt("abc").tolist()[0] == 0 and templated.prompt("abc").tolist()[-1] != 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert (huggingface(path).bos_id, huggingface(path).eos_id) == (None, 1)


def sentencepiece_model(directory: Path) -> Path:
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:60]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=300, model_type="bpe"
    )
    return directory / "sp.model"


def shard_documents(shards: Path) -> list[str]:
    splits, tokenizer = load_data(shards)
    corpora = (splits.train, splits.validation)
    return [tokenizer.decode(c.document(i)) for c in corpora for i in range(c.num_documents)]


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "huggingface", "trained bpe"])
def test_every_kind_round_trips_documents_through_shards(
    tmp_path: Path, bpe: Path, kind: str
) -> None:
    source = tmp_path / "corpus.jsonl"
    texts = [f"Document {i}: {text[:200]}" for i, text in enumerate(TEXTS[:40])]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizers = {
        "bytes": lambda: BYTES,
        "sentencepiece": lambda: sentencepiece(sentencepiece_model(tmp_path)),
        "huggingface": lambda: huggingface(llama_like(tmp_path)),
    }
    shards = tmp_path / "shards"
    if kind == "trained bpe":
        index = prepare_shards([source], shards, train_bpe_vocab=500)
        assert index["tokenizer"]["kind"] == "huggingface" and index["vocab_size"] == 500
    else:
        tokenizer = tokenizers[kind]()
        prepare_shards([source], shards, tokenizer)
    splits, tokenizer = load_data(shards)
    for i in range(splits.train.num_documents):  # each document bracketed as defined
        ids = splits.train.document(i)
        assert tokenizer.bos_id is None or ids[0] == tokenizer.bos_id
        assert tokenizer.eos_id is None or ids[-1] == tokenizer.eos_id
    if kind == "sentencepiece":  # SentencePiece normalizes whitespace: compare its own view
        texts = [tokenizer.decode(tokenizer.encode(t)) for t in texts]
    train = [t for i, t in enumerate(texts) if i % 10]
    assert shard_documents(shards) == [*train, *texts[::10]]
    for file in tokenizer.files:
        assert file.parent == shards  # the tokenizer is kept beside the shards


def test_a_changed_tokenizer_file_is_refused(tmp_path: Path, bpe: Path) -> None:
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    index = prepare_shards([source], tmp_path / "shards", huggingface(bpe))
    with (tmp_path / "shards" / "tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(DataError, match="differs from the one the shards were made with"):
        from_index(index, tmp_path / "shards")


def test_a_file_that_is_not_a_tokenizer_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"tokenizer\.json is not a Hugging Face tokenizer\.json"):
        huggingface(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="--vocab-size must be at least 257"):
        train_bpe(iter(["x"]), 100, tmp_path / "small.json")
    assert np.array_equal(BYTES.document("ab"), [97, 98])  # bytes: no special tokens
