import numpy as np
import pytest

from rtdlm.model import ModelConfig
from rtdlm.train import EvalLog, StepLog, TrainConfig, split_documents, train
from rtdlm.train.data import stdlib_documents

MODEL = ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, seq_len=32)
CONFIG = TrainConfig(batch_size=8, learning_rate=3e-3, warmup_steps=5, max_steps=40, eval_every=20)


def run(cfg: TrainConfig) -> tuple[list[StepLog], list[EvalLog]]:
    logs = list(train(MODEL, cfg, split_documents(stdlib_documents())))
    return [x for x in logs if isinstance(x, StepLog)], [x for x in logs if isinstance(x, EvalLog)]


def test_held_out_loss_falls_and_logs_are_complete() -> None:
    steps, evals = run(CONFIG)
    assert [s.step for s in steps] == list(range(1, 41))
    assert [e.step for e in evals] == [0, 20, 40]
    assert evals[-1].loss < evals[0].loss - 1.0  # from ~ln(256) = 5.5 towards byte statistics
    assert all(s.tokens_per_second > 0 and np.isfinite(s.loss) for s in steps)
    assert steps[0].learning_rate == 0.0 and steps[5].learning_rate == pytest.approx(3e-3)


def test_same_seed_same_numbers_bit_for_bit() -> None:
    cfg = TrainConfig(batch_size=4, max_steps=3, eval_every=3)
    first, _ = run(cfg)
    second, _ = run(cfg)
    assert [s.loss for s in first] == [s.loss for s in second]


def test_invalid_train_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="train.batch_size must be positive"):
        TrainConfig(batch_size=0)


def test_a_mixture_of_experts_model_trains_with_its_auxiliary_losses() -> None:
    moe = ModelConfig(**{**MODEL.__dict__, "num_layers": 2, "moe_every": 2, "num_experts": 4})
    cfg = TrainConfig(batch_size=4, learning_rate=3e-3, warmup_steps=2, max_steps=12, eval_every=12)
    logs = list(train(moe, cfg, split_documents(stdlib_documents())))
    steps = [x for x in logs if isinstance(x, StepLog)]
    evals = [x for x in logs if isinstance(x, EvalLog)]
    assert all(np.isfinite(s.loss) for s in steps)
    assert evals[-1].loss < evals[0].loss
    assert "block_1/moe/router" in steps[-1].state.params
