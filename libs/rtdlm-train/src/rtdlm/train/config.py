"""The run configuration: typed frozen dataclasses, built from a preset, a YAML file and
`--set section.key=value` overrides, in that order. Every mistake is one ConfigError line."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from rtdlm.ckpt import NotALocalPathError, StoragePathError, local_path, storage_path
from rtdlm.model import PRESETS, ModelConfig, hf, preset


class ConfigError(ValueError):
    """A configuration mistake, phrased as one line that names the key and the fix."""


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup_steps: int = 20
    # Where the cosine ends (MaxText's learning_rate_schedule_steps). None: train.max_steps at
    # the run's first start; saved with the run and fixed from then on, so raising max_steps on
    # resume continues the same schedule (past decay_steps the rate stays at the floor).
    decay_steps: int | None = None
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "optimizer", "learning_rate", "eps", "clip_norm")
        _in_range(self, "optimizer", "min_lr_ratio", 0.0, 1.0)
        _in_range(self, "optimizer", "b1", 0.0, 1.0, high_open=True)
        _in_range(self, "optimizer", "b2", 0.0, 1.0, high_open=True)
        _non_negative(self, "optimizer", "warmup_steps", "weight_decay")
        if self.decay_steps is not None:
            _positive(self, "optimizer", "decay_steps")


@dataclass(frozen=True)
class DataConfig:
    # shard directory written by prepare-data (a folder, s3://bucket/prefix or gs://...);
    # None: the built-in corpus
    path: str | None = None
    batch_size: int = 8  # sequences per optimizer step, across all processes
    micro_batches: int = 1  # gradient accumulation: batch_size splits into this many
    shuffle_seed: int = 0
    prefetch: int = 2  # batches packed ahead on a background thread
    eval_batches: int = 4
    verify: bool = False  # hash every shard before training (in a bucket: reads them all)

    def __post_init__(self) -> None:
        _positive(self, "data", "batch_size", "micro_batches", "eval_batches")
        _non_negative(self, "data", "shuffle_seed", "prefetch")
        if isinstance(self.path, str):
            try:
                storage_path(self.path)
            except StoragePathError as error:
                raise ConfigError(f"data.path: {error}") from None
        if self.batch_size % self.micro_batches:
            raise ConfigError(
                f"data.micro_batches ({self.micro_batches}) must divide data.batch_size "
                f"({self.batch_size})"
            )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 200
    eval_every: int = 25
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    z_loss_weight: float = 0.0  # PaLM's log(Z)^2 penalty keeping the softmax normaliser near 1
    moe_load_balance_weight: float = 0.01  # used only by models with MoE layers
    moe_router_z_weight: float = 0.001
    max_nonfinite_in_row: int = 5
    on_nonfinite: str = "stop"  # or "rollback": reload the last checkpoint and go on
    on_checkpoint_error: str = "stop"  # or "continue": train on, retry at the next cadence
    profile_steps: int = 0  # trace this many steps (after two warm-up steps) into profile/
    # A Hugging Face Llama checkpoint directory to start from (rtdlm.train.init_from): its
    # config.json fixes the model's shape, its weights are step 0's. A resume ignores it.
    init_from: str | None = None
    # Every N steps, the parameters in the Hugging Face layout (Llama, or Mixtral) in
    # <run-dir>/hf/<step> (unchecked: `exporter hf` makes a checked one); 0: never.
    hf_export_every: int = 0

    def __post_init__(self) -> None:
        _positive(self, "train", "max_steps", "eval_every", "checkpoint_every")
        _positive(self, "train", "keep_checkpoints", "max_nonfinite_in_row")
        _non_negative(self, "train", "seed", "z_loss_weight")
        _non_negative(self, "train", "moe_load_balance_weight", "moe_router_z_weight")
        _non_negative(self, "train", "profile_steps", "hf_export_every")
        _local("train", "init_from", self.init_from)
        if self.on_nonfinite not in ("stop", "rollback"):
            raise ConfigError(
                f"train.on_nonfinite must be 'stop' or 'rollback', got {self.on_nonfinite!r}"
            )
        if self.on_checkpoint_error not in ("stop", "continue"):
            raise ConfigError(
                "train.on_checkpoint_error must be 'stop' or 'continue', "
                f"got {self.on_checkpoint_error!r}"
            )


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "0.0.0.0"  # nosec B104 # scraped from other pods; --metrics-host narrows it
    port: int = 8000  # 0: any free port
    peak_flops: float | None = None  # None: the accelerator table, else a measured matmul

    def __post_init__(self) -> None:
        _in_range(self, "metrics", "port", 0, 65535)
        if self.peak_flops is not None:
            _positive(self, "metrics", "peak_flops")


@dataclass(frozen=True)
class MeshConfig:
    """Devices as a named grid; -1 takes the devices the others leave (at most one axis)."""

    data: int = -1  # batch split, parameters replicated
    fsdp: int = 1  # batch split, parameters and optimizer state sharded, gathered per layer
    tensor: int = 1  # attention heads, MLP width and vocabulary split
    expert: int = 1  # mixture-of-experts experts split (and the batch, outside them)

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in ("data", "fsdp", "tensor", "expert")}
        if any(size == 0 or size < -1 for size in sizes.values()):
            raise ConfigError(f"mesh sizes must be positive or -1 (the rest), got {sizes}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"at most one mesh axis may be -1 (the rest), got {sizes}")


@dataclass(frozen=True)
class RunConfig:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        if self.train.hf_export_every and isinstance(self.model, ModelConfig):
            try:
                hf.check_exportable(self.model)
            except hf.HfError as error:
                raise ConfigError(f"train.hf_export_every: {error}") from None


def _positive(cfg: object, section: str, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{section}.{name} must be positive, got {getattr(cfg, name)}")


def _non_negative(cfg: object, section: str, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {getattr(cfg, name)}")


def _local(section: str, name: str, value: object) -> None:
    """A path setting given as a URL is refused (rtdlm.ckpt.local_path says why)."""
    if isinstance(value, str):
        try:
            local_path(value)
        except NotALocalPathError as error:
            raise ConfigError(f"{section}.{name}: {error}") from None


def _in_range(
    cfg: object, section: str, name: str, low: float, high: float, high_open: bool = False
) -> None:
    value = getattr(cfg, name)
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{section}.{name} must be in [{low}, {high}{bracket}, got {value}")


# -- parsing -------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` as the field's type, accepting the strings a command line or YAML produces."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        empty = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if empty and type(None) in options:
            return None
        real = [option for option in options if option is not type(None)]
        return _coerce(key, value, real[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {_describe(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be a number, got {_describe(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {_describe(value)}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {_describe(value)}")
    raise ConfigError(f"{key} cannot be set")  # a nested section assigned a scalar


def _build(cls: type, base: Any, overrides: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in names:
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown key {_describe(key)}; valid keys under {where} are {', '.join(names)}"
            )
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} is a section: give it keys, e.g. {key}.{_first(current)}")
            changes[name] = _build(type(current), current, value, f"{key}.")
        else:
            changes[name] = _coerce(key, value, hints[name])
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # the model lib's own validation
        raise ConfigError(str(error)) from None


def _first(section: object) -> str:
    return dataclasses.fields(section)[0].name  # type: ignore[arg-type]


def parse_set(assignment: str) -> dict[str, Any]:
    """'optimizer.learning_rate=3e-4' as a nested dict; the value stays text until typed."""
    key, sep, value = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(
            f"--set {_describe(assignment)} is not KEY=VALUE, "
            "e.g. --set optimizer.learning_rate=3e-4"
        )
    nested: dict[str, Any] = {parts[-1].strip(): value.strip()}
    for part in reversed(parts[:-1]):
        nested = {part.strip(): nested}
    return nested


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


def load_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: fix its syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source} must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


# What a preset's run sets beyond its model, under the file and --set. tiny is the README's
# first command: in bf16 (float32 master weights; held-out loss within 0.6% of float32 after
# 300 steps) it trains 600 steps in less wall time than 200 float32 steps took before this
# stack's CPU speed work (alternated on a 2-core AMX Xeon: 116-124 s against 140 s; held-out
# loss 1.742 against 2.449). Where a CPU has no bf16 units, --set model.compute_dtype=float32.
PRESET_RUNS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"model": {"compute_dtype": "bfloat16"}, "train": {"max_steps": 600}},
}


def resolve(
    preset_name: str | None = None,
    file_overrides: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
    vocab_size: int | None = None,
) -> RunConfig:
    """Preset, then the YAML file's keys, then each --set; `vocab_size` comes from the data."""
    overrides: dict[str, Any] = _merge({}, file_overrides or {})
    for assignment in sets:
        _merge(overrides, parse_set(assignment))
    name = preset_name or overrides.pop("preset", None) or "tiny"
    overrides.pop("preset", None)
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {_describe(name)}; choose one of {', '.join(PRESETS)}")
    overrides = _merge(_merge({}, PRESET_RUNS.get(name, {})), overrides)
    train, model_keys = overrides.get("train"), overrides.get("model") or {}
    init_from = train.get("init_from") if isinstance(train, Mapping) else None
    if init_from and isinstance(init_from, str) and isinstance(model_keys, Mapping):
        overrides["model"] = _from_checkpoint(init_from, model_keys)  # (bad types: _build's)
    model = preset(name) if vocab_size is None else preset(name, vocab_size=vocab_size)
    cfg = _build(RunConfig, RunConfig(preset=name, model=model), overrides, "")
    if vocab_size is not None and cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
            f"({vocab_size}): drop the model.vocab_size override or use matching data"
        )
    return cfg


# What a Hugging Face checkpoint fixes of the model; how it runs (dtype, attention, remat,
# scan, context) stays the run's choice.
ARCHITECTURE: tuple[str, ...] = ("d_model", "num_layers", "num_heads", "num_kv_heads")
ARCHITECTURE += ("vocab_size", "d_ff", "rope_base", "tie_embeddings", "norm_eps")


def _from_checkpoint(directory: str, model: Mapping[str, Any]) -> dict[str, Any]:
    """The model overrides with the architecture train.init_from's config.json fixes; a field
    set otherwise, or one our model cannot compute, is a ConfigError. A config that states
    every such field (a run's saved config.yaml) is taken as it is."""
    if all(name in model for name in ARCHITECTURE):
        return dict(model)
    _local("train", "init_from", directory)
    try:
        fixed = hf.model_config(hf.read_config(directory))
    except hf.HfError as error:
        raise ConfigError(f"train.init_from {directory}: {error}") from None
    merged = dict(model)
    for name in ARCHITECTURE:
        value = getattr(fixed, name)
        if name in model and not _same(model[name], value):
            raise ConfigError(
                f"model.{name} is set to {model[name]!r}, but the checkpoint in train.init_from "
                f"({directory}) has {value!r}: drop the override"
            )
        merged[name] = value
    return merged


def _same(given: Any, value: Any) -> bool:
    """Whether an override (a --set string, or a YAML value) means `value`."""
    if isinstance(value, bool):
        return str(given).lower() == str(value).lower()
    if isinstance(value, int | float) and isinstance(given, str | int | float):
        try:
            return float(given) == value
        except ValueError:
            return False
    return bool(given == value)


# Keys a resumed run may change: how long and how often, never what is trained or how.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_in_row",
    "train.on_nonfinite",
    "train.on_checkpoint_error",
    "train.profile_steps",
    "train.hf_export_every",
    "data.prefetch",
    "data.verify",
    "metrics.",
    "mesh.",  # checkpoints reshard onto whatever mesh resumes them
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} of a nested mapping (a config as `to_dict` gives it)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def for_first_start(cfg: RunConfig) -> RunConfig:
    """The config a new run is saved with: the schedule's length fixed from max_steps."""
    if cfg.optimizer.decay_steps is not None:
        return cfg
    optimizer = dataclasses.replace(cfg.optimizer, decay_steps=cfg.train.max_steps)
    return dataclasses.replace(cfg, optimizer=optimizer)


def for_resume(saved: RunConfig, requested: RunConfig, where: str) -> RunConfig:
    """`requested` as the continuation of the run `saved` describes, or one ConfigError line.

    Only RESUMABLE_CHANGES may differ; optimizer.decay_steps is taken from the saved run (a
    different explicit value is refused), so the learning-rate schedule never jumps.
    """
    fixed = saved.optimizer.decay_steps or saved.train.max_steps
    asked = requested.optimizer.decay_steps
    if asked is not None and asked != fixed:
        raise ConfigError(
            f"optimizer.decay_steps is {fixed} for the run in {where} and cannot change on "
            "resume: drop the override, or pass a new --run-dir"
        )
    resumed = dataclasses.replace(
        requested, optimizer=dataclasses.replace(requested.optimizer, decay_steps=fixed)
    )
    before, after = flatten(to_dict(for_first_start(saved))), flatten(to_dict(resumed))
    changed = [
        key
        for key in after
        if before.get(key) != after[key] and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        raise ConfigError(
            f"{where} was started with a different config ({', '.join(changed[:5])} differ): "
            "resume it without those changes, or pass a new --run-dir"
        )
    return resumed


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
