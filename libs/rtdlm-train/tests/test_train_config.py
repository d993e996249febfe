import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtdlm.train import ConfigError, RunConfig, load_yaml, resolve, to_yaml


def test_preset_then_file_then_sets() -> None:
    file = load_yaml(
        "preset: small\noptimizer:\n  learning_rate: 1e-3\n  warmup_steps: 7\n", "x.yaml"
    )
    cfg = resolve(None, file, ["optimizer.learning_rate=3e-4", "model.remat=full"], vocab_size=256)
    assert cfg.preset == "small" and cfg.model.d_model == 768 and cfg.model.remat == "full"
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.optimizer.warmup_steps == 7
    assert cfg.model.vocab_size == 256
    assert resolve("tiny", file).preset == "tiny"  # the command line's preset wins


def test_resolved_config_round_trips_through_yaml() -> None:
    cfg = resolve("tiny", sets=["data.micro_batches=2", "metrics.peak_flops=1e12"])
    again = resolve(None, load_yaml(to_yaml(cfg), "saved"))
    assert again == cfg


@pytest.mark.parametrize(
    ("preset", "sets", "message"),
    [
        ("huge", [], "unknown preset 'huge'; choose one of tiny, small, medium, large"),
        ("tiny", ["optimizer.lrr=1"], "unknown key 'optimizer.lrr'; valid keys under optimizer"),
        ("tiny", ["optimizer.learning_rate=fast"], "optimizer.learning_rate must be a number"),
        ("tiny", ["optimizer.learning_rate=-1"], "optimizer.learning_rate must be positive"),
        ("tiny", ["data.batch_size=8", "data.micro_batches=3"], "must divide data.batch_size"),
        ("tiny", ["model.num_heads=3"], "model.num_heads (3) must divide model.d_model (256)"),
        ("tiny", ["train=3"], "train is a section: give it keys"),
        ("tiny", ["nonsense"], "is not KEY=VALUE"),
        ("tiny", ["metrics.enabled=maybe"], "metrics.enabled must be true or false"),
        ("tiny", ["train.on_nonfinite=ignore"], "train.on_nonfinite must be 'stop' or 'rollback'"),
    ],
)
def test_mistakes_are_one_clear_line(preset: str, sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve(preset, sets=sets)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_data_vocabulary_must_fit_the_model() -> None:
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the data's"):
        resolve("tiny", sets=["model.vocab_size=100"], vocab_size=256)


def test_bad_yaml_names_the_file_and_line() -> None:
    with pytest.raises(
        ConfigError, match=r"run.yaml is not valid YAML at line [0-9]+: fix its syntax"
    ):
        load_yaml("optimizer:\n  lr: [1\n", "run.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml("- 1\n- 2\n", "run.yaml")


KEYS = [
    "preset",
    "model",
    "optimizer",
    "data",
    "train",
    "metrics",
    "bogus",
    "learning_rate",
    "d_model",
    "batch_size",
    "micro_batches",
    "enabled",
    "port",
    "peak_flops",
    "d_ff",
    "seq_len",
    "max_steps",
    "on_nonfinite",
    "path",
    "compute_dtype",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["tiny", "1e-3", "true", "none", "float32", "8"])
)
trees = st.recursive(
    scalars, lambda inner: st.dictionaries(st.sampled_from(KEYS), inner, max_size=4), max_leaves=8
)


@given(trees)
def test_any_yaml_gives_a_config_or_a_clear_error_never_a_traceback(tree: object) -> None:
    try:
        cfg = resolve(None, tree if isinstance(tree, dict) else {"model": tree})
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert isinstance(cfg, RunConfig)


@given(
    st.lists(
        st.text(max_size=30)
        | st.sampled_from(
            ["model.d_model=64", "optimizer.b1=1.5", "data.batch_size=0", "a.b.c=1", "=", "x="]
        ),
        max_size=4,
    )
)
def test_any_set_gives_a_config_or_a_clear_error(sets: list[str]) -> None:
    try:
        cfg = resolve("tiny", sets=sets)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert isinstance(cfg, RunConfig)


def test_a_periodic_hugging_face_export_of_a_mixture_mixtral_differs_from_is_refused() -> None:
    sets = ["train.hf_export_every=100", "model.moe_every=2"]
    with pytest.raises(ConfigError, match=r"^train.hf_export_every: a mixture-of-experts model"):
        resolve("tiny", sets=sets)
    assert resolve("tiny", sets=sets[:1]).train.hf_export_every == 100
    mixtral = ["model.moe_every=1", "model.num_experts=4", "model.capacity_factor=2"]
    assert resolve("tiny", sets=[*sets[:1], *mixtral]).model.moe_every == 1
