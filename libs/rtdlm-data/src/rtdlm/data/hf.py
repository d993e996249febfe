"""Our tokenizers as Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`),
which `AutoTokenizer.from_pretrained` loads to the same ids.

The byte tokenizer becomes a byte-level BPE without merges: each UTF-8 byte is one token whose
id is the byte's value, spelled with GPT-2's printable stand-in for that byte.
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


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int) -> list[str]:
    """tokenizer.json and tokenizer_config.json for `tokenizer` in `directory`; the names."""
    kind = tokenizer.index_entry.get("kind")
    if kind == "bytes":
        (directory / TOKENIZER).write_text(byte_tokenizer_json())
    elif kind == "huggingface":
        shutil.copyfile(tokenizer.files[0], directory / TOKENIZER)
    else:
        raise DataError(
            f"a {kind} tokenizer has no Hugging Face tokenizer.json form here: train on a "
            "Hugging Face tokenizer (--tokenizer tokenizer.json) or a trained BPE to export one"
        )
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
