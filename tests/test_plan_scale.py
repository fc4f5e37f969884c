"""python -m mtlm.plan at scale (issue 23): the 2019 code's gradient all-reduce after backward, pinned to a hand
computation; the pipeline and sequence-parallel terms (mtlm/plan/pipeline.py) against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtlm.checks import compose_error
from mtlm.config import register_configs
from mtlm.metrics import memory
from mtlm.plan import cpu_check, perf, pipeline, search, sizing
from mtlm.plan.__main__ import validate_plan
from mtlm.plan.planner import make_plan
from mtlm.train.objective import objective_for

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PAPER_8_3B_512 = ["model=gpt2_8.3b", "parallel.tensor=8", "parallel.data=64", "precision=fp16",
                  "trainer.activation_checkpointing=true", "trainer.micro_batch_size=8",
                  "trainer.global_batch_size=512", "model.seq_length=1024", "model.vocab_size=51200",
                  "cluster=dgx2h_v100"]


def plan_config(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        cfg = compose(config_name="plan", overrides=["logger=none", *overrides])
    validate_plan(cfg)
    return cfg


def test_after_backward_allreduce_is_fp16_and_fully_exposed() -> None:
    """The 2019 code: one fp16 buffer of the rank's 1,043,549,184 gradients (2 bytes each), all-reduced over 64
    data ranks after backward. Across nodes each of the 8 data-parallel groups on a DGX-2H gets 100/8 = 12.5
    GB/s of its network (< 120 GB/s NVLink): 2 x 63/64 x 2,087,098,368 bytes / 12.5e9 + (8.4 + 2 x 63 x 14.0) us,
    all of it on the step, none hidden behind backward."""
    after = make_plan(plan_config(*PAPER_8_3B_512, "cluster.grad_allreduce=after_backward"))
    over = make_plan(plan_config(*PAPER_8_3B_512, "cluster.grad_allreduce=overlapped"))
    sent = 2 * 63 / 64 * 2 * 1_043_549_184
    assert after["grad_allreduce"] == "after_backward" and after["data_parallel_bytes_per_step"] == sent
    expected = sent / 12.5e9 + (8.4 + 2 * 63 * 14.0) * 1e-6
    assert after["step_time_parts_s"]["data_parallel_exposed"] == pytest.approx(expected, rel=1e-12)
    assert after["data_parallel_allreduce_s"] == pytest.approx(expected, rel=1e-12)
    # mtlm's DDP sends the fp32 gradients (twice the bytes) but hides most of them behind the backward.
    assert over["data_parallel_bytes_per_step"] == 2 * sent
    assert over["step_time_parts_s"]["data_parallel_exposed"] < 0.5 * over["data_parallel_allreduce_s"]
    assert over["step_time_parts_s"]["compute"] == after["step_time_parts_s"]["compute"]


def test_grad_allreduce_bad_value_is_one_line() -> None:
    err = compose_error(CONF, [*PAPER_8_3B_512, "cluster.grad_allreduce=sometimes"], "plan", validate_plan)
    assert err.startswith("config error: cluster.grad_allreduce:") and "after_backward" in err and "\n" not in err


# ---- pipeline terms, by hand ---------------------------------------------------------------------------------


def test_in_flight_micro_batches_per_schedule() -> None:
    assert pipeline.in_flight_chunks("gpipe", 4, 1, 8) == 8  # all m forwards before any backward
    assert pipeline.in_flight_chunks("1f1b", 4, 1, 8, rank=0) == 4  # P on the first stage
    assert pipeline.in_flight_chunks("1f1b", 4, 1, 8, rank=3) == 1  # one on the last
    assert pipeline.in_flight_chunks("1f1b", 4, 1, 2) == 2  # never more than m
    # Interleaved, P 4, V 2, m 8: (V-1)P + 2(P-1) + 1 = 4 + 6 + 1 = 11 chunks of l/8 layers on the first rank,
    # = 5.5 stage-shares = P (1 + (P-1)/(P V)) = 4 x 11/8 (Korthikanti et al. 2022); 4 + 0 + 1 on the last.
    assert pipeline.in_flight_chunks("interleaved_1f1b", 4, 2, 8, rank=0) == 11
    assert pipeline.in_flight_chunks("interleaved_1f1b", 4, 2, 8, rank=3) == 5
    assert pipeline.in_flight_chunks("interleaved_1f1b", 4, 2, 4, rank=0) == 8  # capped at m V
    assert pipeline.in_flight_chunks("1f1b", 1, 1, 16) == 1  # no pipeline: gradient accumulation
    with pytest.raises(ValueError, match="zigzag"):
        pipeline.in_flight_chunks("zigzag", 2, 1, 2)


def test_bubble_and_stage_parameters() -> None:
    assert pipeline.step_factor(4, 2, 8) == pytest.approx(1 + 3 / 16)  # (P-1)/(V m)
    assert pipeline.step_factor(1, 1, 8) == 1.0
    # 8 layers of 100, P 4: the first stage adds the word table (1000) and the position table (50), the last the
    # final norm (10) and its own copy of the tied word table; middle stages only their 2 layers.
    stage = [pipeline.stage_params(100, 8, 4, 1000, 50, 10, r) for r in range(4)]
    assert stage == [1250, 200, 200, 1210]
    assert pipeline.stage_params(100, 8, 1, 1000, 50, 10, 0) == 1860  # no pipeline: one word table


def test_point_to_point_and_tied_embedding() -> None:
    # b 2, s 1024, h 4096, fp16: 16 MiB per hop; SC'21's scatter/gather (or sequence parallelism) 1/8 per rank.
    assert pipeline.p2p_bytes(2, 1024, 4096, 2, 8, False, False) == 16_777_216
    assert pipeline.p2p_bytes(2, 1024, 4096, 2, 8, True, False) == 2_097_152
    assert pipeline.p2p_bytes(2, 1024, 4096, 2, 8, False, True) == 2_097_152
    # One HDR NIC per A100 (25 GB/s) and NCCL's network latency, 14.0 us.
    assert pipeline.p2p_time(2_097_152, 25.0, 14.0) == pytest.approx(14.0e-6 + 2_097_152 / 25e9)
    # Blocking sends: 2 V hops per micro-batch slot, m + (P-1)/V slots: 2 x 2 x 1e-4 x (8 + 3/2).
    assert pipeline.p2p_exposed_time(1e-4, 4, 2, 8) == pytest.approx(3.8e-3)
    assert pipeline.p2p_exposed_time(1e-4, 1, 1, 8) == 0.0
    assert pipeline.tied_embedding_allreduce_bytes(51_200, 4096, 8, 2) == 6_400 * 4096 * 2


# ---- sequence-parallel terms, by hand ------------------------------------------------------------------------


def test_sequence_parallel_activations_match_korthikanti() -> None:
    """§4.2.2: sbh (34/t + 5as/(ht)) bytes per layer at 16 bits with dropout; s 2048, b 1, h 4096, a 32, t 8:
    5as/h = 80, so 114/8 sbh = 119,537,664 bytes, against tensor parallelism alone's sbh (10 + 24/t + 5as/(ht))."""
    sbh = 2048 * 4096
    full = memory.activation_bytes_per_layer(2048, 1, 4096, 32, 1, 2, True, False)
    assert full == sbh * (34 + 80)
    assert pipeline.sequence_parallel_activation_bytes_per_layer(full, 8) == 119_537_664 == sbh * 114 // 8
    assert memory.activation_bytes_per_layer(2048, 1, 4096, 32, 8, 2, True, False) == sbh * (10 + 24 // 8 + 10)


def test_sequence_parallel_collectives_same_bytes_twice_the_launches() -> None:
    S, n, bw, step, base = 8_000_000, 8, 240.0, 3.4, 8.4
    rs = perf.reduce_scatter_time(S, n, bw, step, base)
    assert rs == pytest.approx((base + 7 * step) * 1e-6 + 7 / 8 * S / 240e9)
    colls = perf.tensor_parallel_collectives(2, 1, 2048, 4096, 2, False)
    ar = perf.collectives_time(colls, n, bw, step, base)
    sp = perf.collectives_time(colls, n, bw, step, base, sequence_parallel=True)
    count = sum(c.count for c in colls)
    # Same bandwidth term; each all-reduce's 2(n-1) steps + 1 launch become 2 x ((n-1) steps + 1 launch).
    assert sp - ar == pytest.approx(count * base * 1e-6)


# ---- the planner with a pipeline ---------------------------------------------------------------------------


def test_stage_memory_equals_memory_per_device_without_pipeline() -> None:
    cfg = plan_config(*PAPER_8_3B_512)
    rank = sizing.size_rank(cfg.model, 51_200, 8)
    args = (cfg.model, rank, cfg.optimizer, 8, 8, 64, "fp16", True, False)
    assert sizing.stage_memory_per_device(*args, 1, 1, "1f1b", 1, False) == sizing.memory_per_device(*args)


def test_pipeline_plan_by_hand() -> None:
    """8.3B (72 layers), tensor 8 x data 2 x pipeline 4 on DGX A100s, b 8, global 128: m = 8, 1F1B.
    Memory: the first stage holds 18 layers' inputs (recompute: e·sbh) for P = 4 micro-batches, plus their
    embedding-dropout masks. Time: the bubble is (compute + tensor-parallel) x 3/8; each hop crosses nodes
    (a stage's 16 ranks fill two nodes) at 200/8 GB/s, b·s·h fp16 per rank (mtlm sends no scatter/gather)."""
    plan = make_plan(plan_config(*PAPER_8_3B_512[:-1], "cluster=dgx_a100", "parallel.data=2",
                                 "parallel.pipeline=4", "trainer.global_batch_size=128"))
    sbh = 8 * 1024 * 3072
    assert plan["devices"] == 64 and plan["micro_batches"] == 8
    assert plan["memory_parts_gb"]["activations"] * 2**30 == 4 * 18 * 2 * sbh + 4 * sbh
    parts = plan["step_time_parts_s"]
    assert parts["pipeline_bubble"] == pytest.approx((parts["compute"] + parts["tensor_parallel"]) * 3 / 8)
    hop = 14.0e-6 + 2 * sbh / 25e9
    assert plan["p2p_bytes_per_hop"] == 2 * sbh and plan["p2p_across_nodes"]
    assert parts["pipeline_p2p"] == pytest.approx(2 * hop * (8 + 3))
    # The tied word table's fp32 gradient (6,400 x 3,072 per tensor rank) summed over first and last stage.
    assert parts["tied_embedding"] == pytest.approx((8.4 + 2 * 14.0) * 1e-6 + 6_400 * 3_072 * 4 / 25e9)
    # Parameters of the first stage: 18 layers + the word and position tables.
    layer = (12 * 3072**2 + 7 * 3072) // 8 + 6 * 3072
    assert plan["params_per_device"] == 18 * layer + 6_400 * 3_072 + 1_024 * 3_072
    assert plan["step_time_s"] == pytest.approx(sum(parts.values()))


# ---- SC'21 Table 1 on selene_a100 ------------------------------------------------------------------------------

SC21_ROWS = [  # scale, heads, hidden, layers, tensor, pipeline, GPUs, batch, billions of parameters (Table 1)
    ("sc21_1.7b", 24, 2304, 24, 1, 1, 32, 512, 1.7), ("sc21_3.6b", 32, 3072, 30, 2, 1, 64, 512, 3.6),
    ("sc21_7.5b", 32, 4096, 36, 4, 1, 128, 512, 7.5), ("sc21_18.4b", 48, 6144, 40, 8, 1, 256, 1024, 18.4),
    ("sc21_39.1b", 64, 8192, 48, 8, 2, 512, 1536, 39.1), ("sc21_76.1b", 80, 10240, 60, 8, 4, 1024, 1792, 76.1),
    ("sc21_145.6b", 96, 12288, 80, 8, 8, 1536, 2304, 145.6),
    ("sc21_310.1b", 128, 16384, 96, 8, 16, 1920, 2160, 310.1),
    ("sc21_529.6b", 128, 20480, 105, 8, 35, 2520, 2520, 529.6),
    ("sc21_1008b", 160, 25600, 128, 8, 64, 3072, 3072, 1008.0)]


@pytest.mark.parametrize("row", SC21_ROWS, ids=[r[0] for r in SC21_ROWS])
def test_sc21_rows_flops_are_eq3(row: tuple) -> None:
    """Each scale file is its Table 1 row, and mtlm's executed FLOPs of the row are the paper's Eq. 3
    (96·B·s·l·h²·(1 + s/6h + V/16lh), recompute counted); its parameters Eq. 2 plus the final norm's 2h."""
    scale, a, h, L, t, p, gpus, batch, billions = row
    cfg = plan_config("+experiment=sc21_table1", f"scale={scale}", "cluster=selene_a100")
    m, s, V = cfg.model, 2048, 51_200
    assert (m.num_attention_heads, m.hidden_size, m.num_layers) == (a, h, L)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (t, p)
    assert cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data == gpus
    assert cfg.trainer.global_batch_size == batch and m.seq_length == s
    _, hardware = objective_for(m).flops(m, batch, V, True)
    assert hardware == pytest.approx(96 * batch * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h)), rel=1e-12)
    eq2 = 12 * L * h**2 * (1 + 13 / (12 * h) + (V + s) / (12 * L * h))
    assert memory.parameters_per_device(L, h, V, s, 1) == pytest.approx(eq2 + 2 * h, rel=1e-12)
    assert abs(eq2 / 1e9 - billions) <= 0.051  # Table 1's parameter count, printed to 0.1B


def test_sc21_calibration_row_reproduces_itself() -> None:
    """selene_a100's one input is row 1 (137 TFLOP/s per GPU in Eq. 3 FLOPs, its fp16 all-reduce after
    backward taken out): planning row 1 gives it back."""
    plan = make_plan(plan_config("+experiment=sc21_table1", "scale=sc21_1.7b", "cluster=selene_a100"))
    rate = plan["hardware_flops_per_step"] / (plan["step_time_s"] * plan["devices"] * 1e12)
    assert rate == pytest.approx(137.0, rel=1e-9)
    assert plan["calibration"]["data_parallel_s"] == pytest.approx(plan["step_time_parts_s"]["data_parallel_exposed"])


def test_elementwise_bytes_by_hand() -> None:
    """SC'21 row 1's layer (s 2048, b 1, h 2304, a 24, t 1, fp16, dropout, recompute): per score
    (4e+1)·2 + 5e+1 = 29 bytes over 24 x 2048² scores, per stream value (10e+2) x 3 = 66 bytes over s·b·h, per
    MLP value 2e·2 + 3e = 14 bytes over 4·s·b·h."""
    sbh = 2048 * 2304
    expected = 24 * 2048**2 * 29 + sbh * 66 + 4 * sbh * 14
    assert expected == 3_494_903_808
    assert perf.elementwise_bytes_per_layer(2048, 1, 2304, 24, 1, 2, True, True, False) == expected
    # Tensor 8 splits the scores and the MLP; the stream only under sequence parallelism.
    tp = perf.elementwise_bytes_per_layer(2048, 1, 2304, 24, 8, 2, True, True, False)
    assert tp == 3 * 2048**2 * 29 + sbh * 66 + 4 * sbh / 8 * 14
    sp = perf.elementwise_bytes_per_layer(2048, 1, 2304, 24, 8, 2, True, True, True)
    assert sp == pytest.approx(tp - sbh * 66 * 7 / 8)
    # No dropout, no recompute: 2e forward + 3e backward per score, 10e per stream value each way.
    assert perf.elementwise_bytes_per_layer(2048, 1, 2304, 24, 1, 2, False, False, False) == (
        24 * 2048**2 * 10 + sbh * 40 + 4 * sbh * 10)
    assert perf.memory_bound_time(2.039e12, 2039.0) == pytest.approx(1.0)
    assert perf.memory_bound_time(1e9, None) == 0.0


# ---- the layout search --------------------------------------------------------------------------------------


def test_layouts_enumerated_by_hand() -> None:
    """4 devices, 4 heads, 4 layers, seq 8, batch 4 (counted by hand): tensor 1 gives 14 layouts (P 1: b 1;
    P 2: b 1 with V 1 or 2, b 2 with V 1; P 4: b 1, 2, 4; each with and without recompute), tensor 2 gives 28
    (sequence parallelism doubles them), tensor 4 gives 12."""
    found = list(search.layouts(4, 8, 4, 4, 8, 4))
    assert len(found) == 54
    assert all(x["tensor"] * x["pipeline"] * x["data"] == 4 for x in found)
    assert sum(x["tensor"] == 1 for x in found) == 14 and sum(x["tensor"] == 4 for x in found) == 12
    assert not any(x["sequence"] and x["tensor"] == 1 for x in found)
    assert not any(x["tensor"] > 2 for x in search.layouts(4, 2, 4, 4, 8, 4))  # a tensor group inside a node


def test_search_ranks_fitting_layouts() -> None:
    cfg = plan_config("model=gpt2_345m", "model.seq_length=1024", "trainer.global_batch_size=16",
                      "precision=fp16", "cluster=dgx_a100")
    best, counts = search.search(cfg, 8, top=4)
    assert counts["layouts"] >= counts["fit"] >= len(best) == 4
    rates = [p["tokens_per_s"] for p in best]
    assert rates == sorted(rates, reverse=True)
    assert all(p["devices"] == 8 and p["fits"] for p in best)
    cfg.cluster.device_memory_gb = 0.5  # nothing fits in half a GB
    assert search.search(cfg, 8)[0] == []


@pytest.mark.parametrize("name", sorted(cpu_check.LAYOUTS_ISSUE23))
def test_cpu_check_issue23_layouts_are_valid(name: str) -> None:
    """The prepared CPU check (run on idle cores: docs/planner.md) composes and validates as train.py would,
    on at most 2 ranks."""
    overrides = [*cpu_check.BASE, *cpu_check.LAYOUTS_ISSUE23[name]]
    assert compose_error(CONF, overrides) is None
    cfg = plan_config(*overrides, "cluster=dgx_a100", "trainer.device=auto")
    assert cfg.parallel.tensor * cfg.parallel.data * cfg.parallel.pipeline <= 2


def test_half_model_sends_every_tensor_parallel_allreduce_in_fp16() -> None:
    """Megatron's fp16 code (selene_a100): the embedding's g and backward's f are fp16 like the layers' g; the
    loss's three b·s all-reduces stay fp32. 2 layers, b 1, s 8, h 4: bsh = 32 values."""
    mtlm_colls = perf.tensor_parallel_collectives(2, 1, 8, 4, 2, False)
    half = perf.tensor_parallel_collectives(2, 1, 8, 4, 2, False, half_model=True)
    assert sum(c.count * c.nbytes for c in mtlm_colls) == 4 * 32 * 2 + 32 * 4 + 3 * 8 * 4 + 4 * 32 * 4 + 32 * 4
    assert sum(c.count * c.nbytes for c in half) == 4 * 32 * 2 + 32 * 2 + 3 * 8 * 4 + 4 * 32 * 2 + 32 * 2
