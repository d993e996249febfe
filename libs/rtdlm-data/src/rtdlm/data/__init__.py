"""rtdlm.data: documents to verified token shards, tokenizers, and packed, resumable batches."""

from rtdlm.data.corpus import (
    BYTE_VOCAB_SIZE,
    Splits,
    decode,
    encode,
    split_documents,
    stdlib_documents,
)
from rtdlm.data.pipeline import Prefetch, evaluation_rows, packed_batches
from rtdlm.data.prepare import prepare_shards, write_held_out
from rtdlm.data.readers import documents, files
from rtdlm.data.shards import (
    Corpus,
    DataError,
    ShardWriter,
    corpus_from_documents,
    open_split,
    read_index,
    verify,
    write_index,
)
from rtdlm.data.tokenizer import (
    BYTES,
    Tokenizer,
    from_index,
    huggingface,
    load_data,
    load_held_out,
    sentencepiece,
    train_bpe,
)

__all__ = [
    "BYTES",
    "BYTE_VOCAB_SIZE",
    "Corpus",
    "DataError",
    "Prefetch",
    "ShardWriter",
    "Splits",
    "Tokenizer",
    "corpus_from_documents",
    "decode",
    "documents",
    "encode",
    "evaluation_rows",
    "files",
    "from_index",
    "huggingface",
    "load_data",
    "load_held_out",
    "open_split",
    "packed_batches",
    "prepare_shards",
    "read_index",
    "sentencepiece",
    "split_documents",
    "stdlib_documents",
    "train_bpe",
    "verify",
    "write_held_out",
    "write_index",
]
