import pytest

from rtdlm.metrics import measure_matmul_flops, model_flops_utilization, peak_flops
from rtdlm.metrics.mfu import peak_from_table


@pytest.mark.parametrize(
    ("kind", "flops"),
    [
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756.0e12),
        ("NVIDIA A100-SXM4-80GB", 312.0e12),
    ],
)
def test_known_accelerators_come_from_the_table(kind: str, flops: float) -> None:
    peak = peak_from_table(kind)
    assert peak is not None and peak.flops_per_second == flops


def test_cpu_peak_is_measured_and_config_wins() -> None:
    assert peak_from_table("cpu") is None
    measured = peak_flops()
    assert measured.source.startswith("measured") and measured.flops_per_second > 1e8
    bf16 = peak_flops(dtype="bfloat16")
    assert bf16.source == "measured: 1024x1024 bfloat16 matmul" and bf16.flops_per_second > 1e8
    assert peak_flops(5e12).source == "config"
    with pytest.raises(ValueError, match="positive"):
        peak_flops(0.0)


def test_mfu_is_a_ratio() -> None:
    assert model_flops_utilization(5e11, 1.0, 1e12) == 0.5
    assert model_flops_utilization(5e11, 0.0, 1e12) == 0.0
    assert measure_matmul_flops(n=128, repeats=2) > 0
