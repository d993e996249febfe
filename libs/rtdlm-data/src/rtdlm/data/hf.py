"""Our tokenizers as Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`),
which `AutoTokenizer.from_pretrained` loads to the same ids.

The byte tokenizer becomes a byte-level BPE without merges: each UTF-8 byte is one token whose
id is the byte's value, spelled with GPT-2's printable stand-in for that byte. A SentencePiece
model becomes the `tokenizers` pipeline SentencePiece runs: its normalization, then its pieces
with their scores (unigram) or merges (BPE).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rtdlm.data.shards import DataError
from rtdlm.data.tokenizer import Tokenizer

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level BPE writes for each byte 0..255: printable
    Latin-1 characters stand for themselves, the rest for 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    symbols, shifted = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(shifted))
            shifted += 1
    return symbols


def byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    hf = HfTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return str(hf.to_str())


def sentencepiece_tokenizer_json(model_file: Path) -> str:
    """A SentencePiece model as a `tokenizers` tokenizer that encodes text to the same ids.

    BPE models match exactly: SentencePiece merges the adjacent pair whose merged piece scores
    highest (the earliest in the vocabulary), so each merge is ranked by that piece's id. Unigram
    models keep their pieces and scores, but SentencePiece sums path scores in float32 where
    `tokenizers` uses float64, so two segmentations that tie in one may not in the other (seen on
    long runs of one character, such as "********"); the export's tokenizer check catches that.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers import Tokenizer as HfTokenizer

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as error:  # protobuf's DecodeError, or a missing file
        raise DataError(f"{model_file} is not a SentencePiece model ({error})") from None
    spec, norm, Piece = proto.trainer_spec, proto.normalizer_spec, pb.ModelProto.SentencePiece
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk = spec.unk_id
    model: models.Model
    if spec.model_type == pb.TrainerSpec.UNIGRAM:
        model = models.Unigram(pieces, unk_id=unk, byte_fallback=spec.byte_fallback)
    elif spec.model_type == pb.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = sorted(
            (i, vocab[piece[:cut]], vocab[piece[cut:]], piece[:cut], piece[cut:])
            for i, p in enumerate(proto.pieces)
            if p.type == Piece.NORMAL
            for piece in (p.piece,)
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        )
        model = models.BPE(
            vocab,
            [(left, right) for *_, left, right in merges],
            unk_token=pieces[unk][0],
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    else:
        kind = pb.TrainerSpec.ModelType.Name(spec.model_type)
        raise DataError(
            f"{model_file} is a SentencePiece {kind} model; only unigram and BPE models have a "
            "Hugging Face tokenizer.json form"
        )
    hf = HfTokenizer(model)
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    hf.normalizer = normalizers.Sequence(steps)
    prefix = "always" if norm.add_dummy_prefix else "never"
    hf.pre_tokenizer = pre_tokenizers.Metaspace("▁", prefix, split=spec.split_by_whitespace)
    decode: list[decoders.Decoder] = [decoders.Replace("▁", " ")]
    decode += [decoders.ByteFallback()] if spec.byte_fallback else []
    decode.append(decoders.Fuse())
    decode += [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    hf.decoder = decoders.Sequence(decode)
    special = {Piece.CONTROL, Piece.UNKNOWN}
    hf.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in special
        ]
    )
    if spec.bos_id >= 0:  # transformers' encode(text) starts as our prompts and documents do
        bos = pieces[spec.bos_id][0]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )
    return str(hf.to_str())


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int) -> list[str]:
    """tokenizer.json and tokenizer_config.json for `tokenizer` in `directory`; the names."""
    kind = tokenizer.index_entry.get("kind")
    if kind == "bytes":
        (directory / TOKENIZER).write_text(byte_tokenizer_json())
    elif kind == "huggingface":
        shutil.copyfile(tokenizer.files[0], directory / TOKENIZER)
    elif kind == "sentencepiece":
        (directory / TOKENIZER).write_text(sentencepiece_tokenizer_json(tokenizer.files[0]))
    else:
        raise DataError(f"a {kind} tokenizer has no Hugging Face tokenizer.json form")
    from tokenizers import Tokenizer as HfTokenizer

    hf = HfTokenizer.from_file(str(directory / TOKENIZER))

    def token(i: int | None) -> str | None:
        return None if i is None else hf.id_to_token(i)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id),
        "pad_token": None,  # nosec B105 # a token, not a password
        "clean_up_tokenization_spaces": False,
    }
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [TOKENIZER, TOKENIZER_CONFIG]
