"""Pipeline parallelism (SC'21 §2.2) through torch.distributed.pipelining: GPT at (tensor, data, pipeline) =
(2,1,2), (1,2,2), (1,1,4) with GPipe, 1F1B and interleaved 1F1B (and at tensor 2 with sequence parallelism)
trains like one process (the same losses over 10 steps, the same weights after them, the same validation
loss), a checkpoint saved at one pipeline degree resumes at another, and an fp16 overflow on one stage skips
the step on all."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtlm.api import load_model
from mtlm.errors import ConfigError
from mtlm.parallel import ParallelState
from mtlm.train.checkpoint import save_trainer
from mtlm.train.loop import Trainer
from tests.compose import SMALL_MODEL, compose_config
from tests.distributed import run_ranks

pytestmark = pytest.mark.multiprocess
STEPS = 10
# 8 layers: 8 stages at pipeline 4 x 2 virtual stages. SGD, not Adam: Adam divides each gradient by its own
# running norm, which turns the ~1e-8 summation-order noise of a near-zero gradient (the key bias) into 1e-4
# weight differences whatever the layout (tensor 2 without a pipeline included).
BASE = (*SMALL_MODEL, "model.num_layers=8", "model.dropout=0.0", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=2", f"trainer.max_steps={STEPS}", "trainer.eval_iters=3",
        "scheduler.warmup_steps=2", "optimizer=sgd", "optimizer.lr=0.5")
SCHEDULES = {"gpipe": ("parallel.schedule=gpipe",), "1f1b": ("parallel.schedule=1f1b",),
             "interleaved_1f1b": ("parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2")}
SEQUENCE = {"1f1b + sequence parallel": ("parallel.schedule=1f1b", "parallel.sequence=true")}  # tensor > 1


def _owned_weights(trainer: Trainer, state: ParallelState) -> dict[str, torch.Tensor]:
    """This rank's parameters, whole over the tensor group, by their whole-model names."""
    out = {}
    for name, p in trainer.model.named_parameters():
        if getattr(p, "pipeline_copy", False):
            continue
        w = p.detach()
        if getattr(p, "partition_dim", None) is not None and state.tp_group is not None:
            parts = [torch.empty_like(w) for _ in range(state.tensor)]
            dist.all_gather(parts, w.contiguous(), group=state.tp_group)
            w = torch.cat(parts, dim=p.partition_dim)
        out[name] = w[: trainer.model.vocab_size] if name == "wte.weight" else w.clone()
    return out


def _train(state: ParallelState, layout: tuple[str, ...], schedules: tuple[str, ...]) -> dict:
    out = {}
    for name in schedules:
        overrides = {**SCHEDULES, **SEQUENCE}[name]
        state.sequence = name in SEQUENCE  # the same groups; the grid only says where the stream is split
        trainer = Trainer(compose_config(*BASE, *layout, *overrides), state, None, {})
        losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
        out[name] = {"losses": losses, "weights": _owned_weights(trainer, state),
                     "val_loss": trainer.evaluate()["val_loss"]}
    return out


@pytest.fixture(scope="module")
def reference(small_data_cache: str) -> dict:
    torch.set_num_threads(1)
    return _train(ParallelState(), (), ("1f1b",))["1f1b"]


def _assert_same(results: list[dict], ref: dict, label: str, same_val: bool) -> None:
    assert len(set(ref["losses"])) == STEPS  # the losses move: the comparison is not of a constant
    for rank, res in enumerate(results):
        for step, (a, b) in enumerate(zip(res["losses"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-6 * abs(b), f"{label} rank {rank} step {step}: loss {a} vs {b}"
        # Validation reads micro x data samples per iteration, so only the data degree 1 runs read the
        # reference's samples (the loop without a pipeline does the same).
        if same_val:
            assert abs(res["val_loss"] - ref["val_loss"]) <= 1e-6 * ref["val_loss"], f"{label} rank {rank} val"
        assert res["val_loss"] == results[0]["val_loss"], f"{label}: rank {rank} logs another val_loss"
    merged: dict[str, torch.Tensor] = {}
    for res in results:
        for name, w in res["weights"].items():
            if name in merged:  # data and tensor peers hold the same whole tensor
                torch.testing.assert_close(w, merged[name], rtol=0, atol=0, msg=f"{label} {name}: peers differ")
            merged[name] = w
    assert merged.keys() == ref["weights"].keys(), f"{label}: the stages together are not the whole model"
    for name, w in ref["weights"].items():
        rel = ((merged[name] - w).norm() / w.norm()).item()
        assert rel <= 1e-6, f"{label} {name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("tensor,data,pipeline", [(2, 1, 2), (1, 2, 2), (1, 1, 4)])
def test_pipeline_trains_like_one_process(reference: dict, tensor: int, data: int, pipeline: int) -> None:
    layout = (f"parallel.tensor={tensor}", f"parallel.data={data}", f"parallel.pipeline={pipeline}")
    names = (*SCHEDULES, *(SEQUENCE if tensor > 1 else ()))
    results = run_ranks(_train, 4, layout, names, tensor=tensor, pipeline=pipeline, timeout=300)
    for name in names:
        _assert_same([r[name] for r in results], reference, f"t{tensor}d{data}p{pipeline} {name}", data == 1)


@pytest.mark.parametrize("overrides,key", [
    (("parallel.pipeline=3",), "parallel.pipeline"),  # 8 layers over 3 stages
    (("parallel.pipeline=2", "parallel.virtual_stages=2"), "parallel.virtual_stages"),  # needs interleaved
    (("parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b"), "parallel.virtual_stages"),  # p=1
    (("parallel.pipeline=4", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b",
      "trainer.global_batch_size=4"), "parallel.schedule"),  # 2 micro-batches, not a multiple of 4
    (("parallel.pipeline=2", "trainer.compile=true"), "trainer.compile"),
    (("model=bert_tiny", "parallel.pipeline=2"), "parallel.pipeline"),
])
def test_pipeline_layouts_are_checked_up_front(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(*BASE, *overrides)
    assert info.value.key == key and "\n" not in str(info.value)


def _ckpt(root: str, name: str, resume: str = "none") -> tuple[str, ...]:
    return (f"checkpoint.dir={root}/{name}", f"checkpoint.resume={resume}")


def _steps(trainer: Trainer, n: int) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(n)]


def _at_two_stages(state: ParallelState, root: str, saved_at_one: str) -> dict:
    layout = ("parallel.pipeline=2",)
    resumed = Trainer(compose_config(*BASE, *layout, *_ckpt(root, "p2_resumed", saved_at_one)), state, None, {})
    out = {"resumed_losses": _steps(resumed, STEPS // 2), "resumed_weights": _owned_weights(resumed, state)}
    fresh = Trainer(compose_config(*BASE, *layout, *_ckpt(root, "p2")), state, None, {})
    _steps(fresh, STEPS // 2)
    out["saved"] = str(save_trainer(fresh))
    return out


def test_resume_across_a_change_of_pipeline_degree(small_data_cache: str, tmp_path) -> None:
    """Saved at P=1, resumed at P=2; saved at P=2, resumed at P=1: both continue the uninterrupted run."""
    torch.set_num_threads(1)
    root, one = str(tmp_path), ParallelState()
    straight = Trainer(compose_config(*BASE, *_ckpt(str(tmp_path), "p1")), one, None, {})
    losses = _steps(straight, STEPS // 2)
    saved_at_one = str(save_trainer(straight))
    losses += _steps(straight, STEPS // 2)
    want = _owned_weights(straight, one)
    two = run_ranks(_at_two_stages, 2, root, saved_at_one, tensor=1, pipeline=2, timeout=240)
    back = Trainer(compose_config(*BASE, *_ckpt(root, "p1_resumed", two[0]["saved"])), one, None, {})
    # load_model (evaluate, generate and the converters load through it) reads the pipeline-saved checkpoint.
    loaded = dict(load_model(two[0]["saved"]).gpt.named_parameters())
    for name, w in _owned_weights(back, one).items():
        torch.testing.assert_close(loaded[name].detach()[: w.shape[0]], w, rtol=0, atol=0, msg=name)
    runs = {"P=1 -> P=2": ([r["resumed_losses"] for r in two], [r["resumed_weights"] for r in two]),
            "P=2 -> P=1": ([_steps(back, STEPS // 2)], [_owned_weights(back, one)])}
    for label, (rank_losses, rank_weights) in runs.items():
        for got in rank_losses:
            for a, b in zip(got, losses[STEPS // 2:], strict=True):
                assert abs(a - b) <= 1e-6 * abs(b), f"{label}: loss {a} vs {b}"
        merged = {k: v for weights in rank_weights for k, v in weights.items()}
        assert merged.keys() == want.keys()
        for name, w in want.items():
            rel = ((merged[name] - w).norm() / w.norm()).item()
            assert rel <= 1e-6, f"{label} {name}: relative difference {rel:.2e}"


def _overflow_on_last_stage(state: ParallelState) -> list[dict]:
    cfg = compose_config(*SMALL_MODEL, "parallel.pipeline=2", "precision=fp16", "precision.initial_scale=1024",
                         "precision.growth_interval=2", "model.dropout=0.0", "trainer.global_batch_size=4",
                         "trainer.micro_batch_size=2", "trainer.max_steps=4")
    trainer = Trainer(cfg, state, None, {})
    unscale = trainer.precision.unscale_and_check

    def poisoned(params, groups):  # step 2 overflows on the last stage only
        if trainer.step == 1 and state.pp_rank == 1:
            next(iter(trainer.model.blocks.values())).mlp.fc.weight.grad.view(-1)[0] = float("inf")
        return unscale(params, groups)

    trainer.precision.unscale_and_check = poisoned
    rows = []
    for _ in range(4):
        before = [p.detach().clone() for p in trainer.params]
        m = trainer.train_step()
        rows.append({"unchanged": all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True)),
                     "loss": m["loss"], **{k: m[k] for k in ("loss_scale", "overflow", "skipped_steps")}})
    return rows


def test_fp16_overflow_on_one_stage_skips_the_step_on_every_stage(small_data_cache: str) -> None:
    for rank, rows in enumerate(run_ranks(_overflow_on_last_stage, 2, tensor=1, pipeline=2, timeout=180)):
        assert [r["unchanged"] for r in rows] == [False, True, False, False], f"rank {rank}"
        assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1], f"rank {rank}"
        assert [r["loss_scale"] for r in rows] == [1024.0, 512.0, 512.0, 1024.0], f"rank {rank}"
        assert all(0 < r["loss"] < 20 for r in rows), f"rank {rank}: the logged loss is unscaled"
