"""Step 0 from a Hugging Face Llama checkpoint (train.init_from): continued pretraining or
fine-tuning. Its config.json fixed the model's shape when the config was resolved; here its
weights become the first parameters, each placed straight into its shards on the mesh, and
its tokenizer must be the one the data was prepared with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rtdlm.data.shards import Corpus, DataError
from rtdlm.data.tokenizer import Tokenizer, huggingface
from rtdlm.model import hf
from rtdlm.train.config import ARCHITECTURE, ConfigError, RunConfig
from rtdlm.train.sharding import param_shardings

log = logging.getLogger(__name__)


def initial_params(cfg: RunConfig, mesh: Mesh) -> Any:
    """train.init_from's weights in our layout (cfg.model's, looped or scanned), float32, as
    arrays sharded on `mesh`: every process reads the files and keeps its devices' slices."""
    directory = str(cfg.train.init_from)
    try:
        config, tensors = hf.load(directory)
        fixed = hf.model_config(config)
        differ = [n for n in ARCHITECTURE if getattr(fixed, n) != getattr(cfg.model, n)]
        if differ:
            raise hf.HfError(
                f"its config.json gives model.{differ[0]}={getattr(fixed, differ[0])!r}, the "
                f"run's config {getattr(cfg.model, differ[0])!r}: resolve the config with "
                "rtdlm.train.resolve, which takes the shape from the checkpoint"
            )
        params = jax.tree.map(np.asarray, hf.from_hf(tensors, cfg.model))
    except hf.HfError as error:
        raise ConfigError(f"train.init_from {directory}: {error}") from None
    shardings = param_shardings(mesh, params)
    log.info("initial parameters from %s", directory)
    return jax.tree.map(
        lambda value, sharding: jax.make_array_from_callback(
            value.shape, sharding, lambda index: value[index]
        ),
        params,
        shardings,
    )


def check_tokenizer(directory: str, tokenizer: Tokenizer, validation: Corpus) -> None:
    """The checkpoint's tokenizer.json must encode held-out text as the data's tokenizer did;
    DataError saying how to prepare the data otherwise. A checkpoint without one is trusted."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        log.warning("%s has no tokenizer.json: its vocabulary is taken to be the data's", directory)
        return
    theirs = huggingface(path)
    for i in range(min(4, validation.num_documents)):
        text = tokenizer.decode(validation.document(i))
        if not np.array_equal(theirs.encode(text), tokenizer.encode(text)):
            raise DataError(
                f"the data was tokenized with {tokenizer.name}, but the checkpoint in "
                f"train.init_from uses its own {path}: prepare the data with prepare-data "
                f"--tokenizer {path}"
            )
