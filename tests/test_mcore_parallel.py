"""Megatron-Core checkpoints across degrees, with megatron-core on 2 gloo ranks: mtlm's export loads into
megatron-core at tensor degree 2 (logits equal mtlm's) and at pipeline degree 2; what megatron-core saves at
those degrees, in the torch_dist format and in the per-rank torch format, imports back to the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlm.convert import main
from mtlm.convert.writer import read_checkpoint, write_checkpoint
from tests.distributed import run_ranks
from tests.mcore_cpu import mcore_gpt, mcore_world  # skips the module when megatron-core is absent
from tests.test_mcore_convert import _args, _ids
from tests.test_mcore_parity import HEADS, HIDDEN, LAYERS, POSITIONS, random_mtlm_gpt

dist_checkpointing = pytest.importorskip("megatron.core.dist_checkpointing")
pytestmark = pytest.mark.multiprocess
VOCAB = 384


def _on_ranks(state, src: str, out: str, tensor: int, pipeline: int):
    """Load mtlm's to-mcore export into megatron-core at (tensor, pipeline), run it, save it again (torch_dist,
    and the per-rank torch format)."""
    import argparse

    from megatron.core import parallel_state

    monkeypatch = pytest.MonkeyPatch()
    # With pipeline stages, megatron-core moves the last stage's copy of the tied output layer with .cuda()
    # before all-reducing it with the first stage's embedding: on a CPU it stays where it is.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    try:
        with mcore_world(monkeypatch, tensor, pipeline):
            theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS, tensor=tensor, pipeline=pipeline)
            with torch.serialization.safe_globals([argparse.Namespace]):
                loaded = dist_checkpointing.load({"model": theirs.sharded_state_dict()}, src)
            theirs.load_state_dict(loaded["model"], strict=False)
            logits = None
            if pipeline == 1:
                with torch.no_grad():  # this rank's vocabulary shard (megatron-core's parallel output)
                    logits = theirs(_ids(), torch.arange(POSITIONS).expand(2, -1), None)
            Path(out).mkdir(parents=True, exist_ok=True)
            args = _args(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                         vocab_size=None, padded_vocab_size=VOCAB)  # 384 rows, kept whole
            dist_checkpointing.save({"model": theirs.sharded_state_dict(), "args": args, "iteration": 5}, out)
            # and the same model in the older per-rank format (--ckpt-format torch), as Megatron-LM names it
            rank_dir = Path(out).parent / "torch_format" / "iter_0000005" / (
                f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}" + (
                    f"_{parallel_state.get_pipeline_model_parallel_rank():03d}" if pipeline > 1 else ""))
            rank_dir.mkdir(parents=True)
            torch.save({"model": theirs.state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": 5},
                       rank_dir / "model_optim_rng.pt")
            (Path(out).parent / "torch_format" / "latest_checkpointed_iteration.txt").write_text("5")
            return logits
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("tensor,pipeline", [(2, 1), (1, 2)])
def test_mcore_at_other_degrees_both_ways(tmp_path: Path, tensor: int, pipeline: int) -> None:
    ours = random_mtlm_gpt("gelu_tanh", 1e-5, seed=5)
    model = {"_target_": "mtlm.model.gpt.GPT", "name": "t", "num_layers": LAYERS, "hidden_size": HIDDEN,
             "num_attention_heads": HEADS, "seq_length": POSITIONS, "max_position_embeddings": POSITIONS,
             "vocab_size": VOCAB, "make_vocab_size_divisible_by": 128, "dropout": 0.0, "init_std": 0.02,
             "layernorm_eps": 1e-5, "activation": "gelu_tanh", "layernorm_order": "pre"}
    write_checkpoint(tmp_path / "ck", model, {n: p.detach() for n, p in ours.named_parameters()}, 1, {"test": "t"})
    assert main(["to-mcore", str(tmp_path / "ck"), str(tmp_path / "mc")]) == 0
    saved = tmp_path / "saved"
    shards = run_ranks(_on_ranks, 2, str(tmp_path / "mc" / "release"), str(saved), tensor, pipeline,
                       tensor=tensor, pipeline=pipeline, timeout=240.0)
    with torch.no_grad():
        expected = ours(_ids())
    if tensor == 2:
        theirs = torch.cat(shards, dim=-1)
        torch.testing.assert_close(expected, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    assert main(["from-mcore", str(saved), str(tmp_path / "back")]) == 0
    meta, back = read_checkpoint(tmp_path / "back")
    _, before = read_checkpoint(tmp_path / "ck")
    assert (meta["source"]["tensor"], meta["source"]["pipeline"]) == (tensor, pipeline)
    assert back.keys() == before.keys() and all(torch.equal(back[k], before[k]) for k in back)
    assert main(["from-mcore", str(tmp_path / "torch_format"), str(tmp_path / "back_torch")]) == 0
    meta, back = read_checkpoint(tmp_path / "back_torch")
    assert meta["source"]["iteration"] == 5
    assert back.keys() == before.keys() and all(torch.equal(back[k], before[k]) for k in back)
