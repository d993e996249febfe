import pytest
from hypothesis import given
from hypothesis import strategies as st

import rtdlm.metrics.mfu as mfu
from rtdlm.metrics import Peak, measure_matmul_flops, measure_peak, peak_flops, utilization
from rtdlm.metrics.mfu import peak_from_table, probe_forms


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
    assert measured.source.startswith("measured: best float32 ")
    assert measured.flops_per_second > 1e8
    bf16 = peak_flops(dtype="bfloat16")
    assert bf16.source.endswith(
        "of float32->float32 and bfloat16->float32 matmuls, sizes (512, 1024, 2048)"
    )
    assert peak_flops(5e12).source == "config"
    with pytest.raises(ValueError, match="positive"):
        peak_flops(0.0)
    assert measure_matmul_flops(n=128, repeats=2) > 0


def test_a_bf16_peak_is_the_best_probe_of_every_size_and_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU kind where a 1024 bf16 dot is slower than the model's own dots: the ceiling is
    then a float32 dot or another size, whichever is fastest, never the one slow probe."""
    rates = {(512, "float32"): 3.0, (1024, "float32"): 4.0, (2048, "float32"): 3.5}
    rates |= {(512, "bfloat16"): 2.0, (1024, "bfloat16"): 1.0, (2048, "bfloat16"): 5.0}
    probed: list[tuple[int, str]] = []

    def probe(n: int, repeats: int, dtype: str) -> float:
        probed.append((n, dtype))
        return rates[n, dtype]

    monkeypatch.setattr(mfu, "measure_matmul_flops", probe)
    peak = measure_peak("bfloat16")
    assert sorted(probed) == sorted(rates)
    assert peak.flops_per_second == 5.0 and "best bfloat16 2048x2048" in peak.source
    del rates[2048, "bfloat16"]
    rates[2048, "bfloat16"] = 0.5
    assert measure_peak("bfloat16").flops_per_second == 4.0
    assert probe_forms("float32") == ("float32",)
    assert probe_forms("bfloat16") == ("float32", "bfloat16")


@given(
    flops=st.floats(1.0, 1e18),
    seconds=st.floats(1e-6, 1e4),
    peak=st.floats(1.0, 1e18),
)
def test_utilization_is_never_above_one_and_a_beaten_peak_is_raised(
    flops: float, seconds: float, peak: float
) -> None:
    before = Peak(peak, "measured: a probe")
    ratio, after = utilization(flops, seconds, before)
    assert 0.0 < ratio <= 1.0
    if flops / seconds <= peak:
        assert after is before and ratio == pytest.approx(flops / seconds / peak)
    else:
        assert ratio == 1.0 and after.flops_per_second == flops / seconds
        assert after.source == mfu.RAISED + "measured: a probe"
        again, later = utilization(flops * 2, seconds, after)  # raised twice: named once
        assert again == 1.0 and later.source == after.source


def test_no_time_is_no_utilization() -> None:
    peak = Peak(1e12, "config")
    assert utilization(5e11, 0.0, peak) == (0.0, peak)
    assert utilization(5e11, 1.0, peak) == (0.5, peak)
