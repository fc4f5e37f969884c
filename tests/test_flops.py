"""FLOPs formulas pinned to hand-expanded integer arithmetic, the peak table, and the cached CPU GEMM probe.

Expanding Megatron's formula by hand (multiply 72*B*s*l*h^2 into the bracket) gives three exact integer terms:
    model    = 72*B*s*l*h*h + 12*B*s*s*l*h + 6*B*s*h*V
    recompute = 96*B*s*l*h*h + 16*B*s*s*l*h + 6*B*s*h*V     (the logit GEMM is not recomputed)
The expected values below are written out that way, so a typo in the implementation's bracket shows up.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mtlm.metrics import flops

S, V = 1024, 51200  # Table 1: sequence length and padded vocabulary


# Table 1 configs at the weak-scaling batch of 8 sequences per model-parallel group (hand-expanded terms).
TABLE1_MODEL_FLOPS_B8 = {
    # name: (layers, hidden, expected model FLOPs, expected FLOPs with recompute)
    "1.2B": (40, 1536,
             72 * 8 * 1024 * 40 * 1536 * 1536 + 12 * 8 * 1024 * 1024 * 40 * 1536 + 6 * 8 * 1024 * 1536 * 51200,
             96 * 8 * 1024 * 40 * 1536 * 1536 + 16 * 8 * 1024 * 1024 * 40 * 1536 + 6 * 8 * 1024 * 1536 * 51200),
    "2.5B": (54, 1920,
             72 * 8 * 1024 * 54 * 1920 * 1920 + 12 * 8 * 1024 * 1024 * 54 * 1920 + 6 * 8 * 1024 * 1920 * 51200,
             96 * 8 * 1024 * 54 * 1920 * 1920 + 16 * 8 * 1024 * 1024 * 54 * 1920 + 6 * 8 * 1024 * 1920 * 51200),
    "4.2B": (64, 2304,
             72 * 8 * 1024 * 64 * 2304 * 2304 + 12 * 8 * 1024 * 1024 * 64 * 2304 + 6 * 8 * 1024 * 2304 * 51200,
             96 * 8 * 1024 * 64 * 2304 * 2304 + 16 * 8 * 1024 * 1024 * 64 * 2304 + 6 * 8 * 1024 * 2304 * 51200),
    "8.3B": (72, 3072,
             72 * 8 * 1024 * 72 * 3072 * 3072 + 12 * 8 * 1024 * 1024 * 72 * 3072 + 6 * 8 * 1024 * 3072 * 51200,
             96 * 8 * 1024 * 72 * 3072 * 3072 + 16 * 8 * 1024 * 1024 * 72 * 3072 + 6 * 8 * 1024 * 3072 * 51200),
}


def test_hand_expansion_literals() -> None:
    # The same numbers as plain literals, so a reader can compare against their own calculator.
    assert TABLE1_MODEL_FLOPS_B8["1.2B"][2:] == (65_712_999_628_800, 86_328_842_649_600)
    assert TABLE1_MODEL_FLOPS_B8["2.5B"][2:] == (132_682_277_191_680, 175_299_090_186_240)
    assert TABLE1_MODEL_FLOPS_B8["4.2B"][2:] == (221_027_606_986_752, 292_770_740_699_136)
    assert TABLE1_MODEL_FLOPS_B8["8.3B"][2:] == (430_768_039_919_616, 571_780_406_181_888)


@pytest.mark.parametrize("name", list(TABLE1_MODEL_FLOPS_B8))
def test_table1_flops_batch8(name: str) -> None:
    layers, hidden, model, recompute = TABLE1_MODEL_FLOPS_B8[name]
    got = flops.model_flops_per_iteration(8, S, layers, hidden, V)
    assert got == pytest.approx(model, rel=1e-12)
    assert flops.hardware_flops_per_iteration(8, S, layers, hidden, V, recompute=False) == got
    got_rc = flops.hardware_flops_per_iteration(8, S, layers, hidden, V, recompute=True)
    assert got_rc == pytest.approx(recompute, rel=1e-12)


def test_8p3b_global_batch_512() -> None:
    # 8.3B, 8-way tensor x 64-way data parallel, global batch 512 (§5.1).
    model = 72 * 512 * 1024 * 72 * 3072 * 3072 + 12 * 512 * 1024 * 1024 * 72 * 3072 + 6 * 512 * 1024 * 3072 * 51200
    recompute = (96 * 512 * 1024 * 72 * 3072 * 3072 + 16 * 512 * 1024 * 1024 * 72 * 3072
                 + 6 * 512 * 1024 * 3072 * 51200)
    assert model == 27_569_154_554_855_424  # ~27.6 PFLOP per iteration
    assert recompute == 36_593_945_995_640_832  # ~36.6 PFLOP per iteration
    assert flops.model_flops_per_iteration(512, S, 72, 3072, V) == pytest.approx(model, rel=1e-12)
    assert flops.hardware_flops_per_iteration(512, S, 72, 3072, V, recompute=True) == pytest.approx(
        recompute, rel=1e-12)


def test_recompute_ratio_tends_to_four_thirds() -> None:
    # One extra forward on top of forward + 2x backward: 4/3, minus a little because logits are not redone.
    ratios = []
    for layers, hidden in [(40, 1536), (72, 3072), (128, 12288)]:
        m = flops.model_flops_per_iteration(8, S, layers, hidden, V)
        r = flops.hardware_flops_per_iteration(8, S, layers, hidden, V, recompute=True)
        ratios.append(r / m)
    assert all(x < 4 / 3 for x in ratios)
    assert ratios == sorted(ratios)  # closer to 4/3 as the model grows
    assert ratios[1] == pytest.approx(4 / 3, rel=0.01)
    assert ratios[2] == pytest.approx(4 / 3, rel=0.001)


def test_throughput_and_mfu() -> None:
    f = 2e15
    assert flops.tflops_per_device(f, 2.0, 4) == pytest.approx(250.0)
    assert flops.aggregate_pflops(f, 2.0) == pytest.approx(1.0)
    assert flops.mfu(250.0, 1000.0) == pytest.approx(0.25)
    assert math.isnan(flops.mfu(1.0, math.nan))
    with pytest.raises(ValueError):
        flops.tflops_per_device(f, 0.0, 1)
    with pytest.raises(ValueError):
        flops.mfu(1.0, 0.0)


def test_paper_weak_scaling_consistency() -> None:
    # §5.1: 15.1 PFLOP/s over 512 GPUs against the 39 TFLOP/s one-GPU baseline is quoted as 76% efficiency.
    # Whatever the iteration time was, per-device throughput must be aggregate / devices: 29.5 TFLOP/s.
    f = flops.model_flops_per_iteration(512, S, 72, 3072, V)
    iter_time = f / 15.1e15  # the iteration time the paper's aggregate implies for our FLOP count (~1.83 s)
    assert flops.aggregate_pflops(f, iter_time) == pytest.approx(15.1)
    per_gpu = flops.tflops_per_device(f, iter_time, 512)
    assert per_gpu == pytest.approx(29.49, abs=0.01)
    assert round(per_gpu / 39.0, 2) == 0.76
    # The baseline's "30% of peak": 39 / 125 = 31.2%, which the paper quotes as 30%.
    assert flops.mfu(39.0, flops.PEAK_TFLOPS["V100"]) == pytest.approx(0.30, abs=0.015)


@pytest.mark.parametrize("name, expected", [
    ("Tesla V100-SXM2-32GB", 125.0),
    ("Tesla V100-SXM3-32GB-H", 125.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H100 NVL", 835.5),  # issue 17: NVL before the generic H100 / H200 (SXM) names
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),  # a MIG slice: a share of the SMs, peak unknown
    ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None),
    ("NVIDIA H200 NVL MIG 7g.141gb", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("", None),
])
def test_peak_table_lookup(name: str, expected: float | None) -> None:
    assert flops.peak_tflops_for_device_name(name) == expected


def test_cuda_peak_of_a_mig_slice_is_unknown(monkeypatch) -> None:
    names = {0: "NVIDIA H100 80GB HBM3 MIG 1g.10gb", 1: "NVIDIA H100 NVL"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[torch.device(device).index])
    peak, source = flops.peak_tflops(torch.device("cuda", 0), dtype=torch.bfloat16)
    assert math.isnan(peak) and source == f"unknown:{names[0]}" and math.isnan(flops.mfu(300.0, peak))
    assert flops.peak_tflops(torch.device("cuda", 1)) == (835.5, "table:H100 NVL")


def test_gemm_probe_measures_once_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    value = flops.cpu_gemm_tflops_per_core(torch.float32)
    assert 0 < value < 100  # positive, and no single core does 100 TFLOP/s
    assert torch.get_num_threads() == threads  # the probe's set_num_threads(1) is undone
    cache = json.loads((tmp_path / "gemm_probe.json").read_text())
    assert len(cache) == 1 and "float32" in next(iter(cache))

    def must_not_measure(*args, **kwargs):
        raise AssertionError("re-measured although cached")

    monkeypatch.setattr(flops, "_measure_gemm_tflops", must_not_measure)
    assert flops.cpu_gemm_tflops_per_core(torch.float32) == value
    peak, label = flops.peak_tflops(torch.device("cpu"), threads=2, dtype=torch.float32)
    assert peak == pytest.approx(2 * value) and label == "cpu-probe:2 threads"
    assert flops.peak_tflops(torch.device("cpu"), threads=1)[1] == "cpu-probe:1 thread"


def test_cache_dir_argument_and_dtype_key(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(flops, "_measure_gemm_tflops", lambda dtype: 0.5 if dtype == torch.bfloat16 else 0.25)
    assert flops.cpu_gemm_tflops_per_core(torch.bfloat16, cache_dir=tmp_path / "arg") == 0.5
    assert flops.cpu_gemm_tflops_per_core(torch.float32, cache_dir=tmp_path / "arg") == 0.25
    assert not (tmp_path / "env").exists()  # an explicit cache_dir wins over the env var
    assert len(json.loads((tmp_path / "arg" / "gemm_probe.json").read_text())) == 2
