"""The pieces every converter shares (mtlm/convert/common.py), each against a hand-written expectation."""

from __future__ import annotations

import pytest
import torch

from mtlm.checkpoint.format import CheckpointError
from mtlm.config import MODEL_DEFAULTS
from mtlm.convert.common import NameMap, join_ranks, model_section, reorder_qkv

LABELS = {  # each row labelled (which of q/k/v, head, d) as the order lays it out; 2 heads of dim 2
    "3hd": [(w, h, d) for w in range(3) for h in range(2) for d in range(2)],
    "h3d": [(w, h, d) for h in range(2) for w in range(3) for d in range(2)],
    "hd3": [(w, h, d) for h in range(2) for d in range(2) for w in range(3)],
}


@pytest.mark.parametrize("src", list(LABELS))
@pytest.mark.parametrize("dst", list(LABELS))
def test_reorder_qkv_moves_each_row_to_its_place(src: str, dst: str) -> None:
    rows = torch.tensor([100 * w + 10 * h + d for w, h, d in LABELS[src]], dtype=torch.float32)
    got = reorder_qkv(rows, 2, src, dst)
    assert got.tolist() == [100 * w + 10 * h + d for w, h, d in LABELS[dst]]
    weight = rows[:, None] * torch.tensor([1.0, -1.0, 2.0])  # a weight's columns travel with their row
    assert torch.equal(reorder_qkv(weight, 2, src, dst), got[:, None] * torch.tensor([1.0, -1.0, 2.0]))


def test_model_section_takes_model_config_defaults_and_keeps_given_values() -> None:
    shape = dict(num_layers=2, hidden_size=8, num_attention_heads=2, seq_length=16, max_position_embeddings=32,
                 vocab_size=50)
    section = model_section(None, "x", **shape, dropout=None, layernorm_eps=1e-12)
    assert "_target_" not in section and section["name"] == "x"
    assert section["dropout"] == MODEL_DEFAULTS["dropout"] and section["init_std"] == MODEL_DEFAULTS["init_std"]
    assert section["layernorm_eps"] == 1e-12
    section = model_section("t", "x", {"activation": "gelu"}, **shape)
    assert list(section)[:2] == ["_target_", "name"] and list(section)[-1] == "activation"
    with pytest.raises(TypeError, match="missing"):
        model_section(None, "x", num_layers=2)


def test_join_ranks_concatenates_split_and_averages_or_keeps_replicated() -> None:
    ranks = [{"w": torch.ones(2, 3) * r, "b": torch.full((3,), float(r))} for r in (1, 3)]
    dims = {"w": 1, "b": None}.get
    joined = join_ranks(ranks, dims, "x")
    assert joined["w"].shape == (2, 6) and joined["w"][0].tolist() == [1, 1, 1, 3, 3, 3]
    assert joined["b"].tolist() == [1, 1, 1]
    assert join_ranks(ranks, dims, "x", replicated="mean")["b"].tolist() == [2, 2, 2]
    with pytest.raises(CheckpointError, match="tensor rank 1 has no b"):
        join_ranks([ranks[0], {"w": ranks[1]["w"]}], dims, "x")


def test_name_map_both_ways() -> None:
    names = NameMap(("dec.layers.{}.", "enc.layers.{}."), {"ln1.weight": "norm.weight"}, {"wte.weight": "emb.w"},
                    read_layer={"old_norm.weight": "ln1.weight"}, read_top={"tok.w": "tte.weight"})
    assert names.theirs("blocks.11.ln1.weight") == "dec.layers.11.norm.weight"
    assert names.theirs("wte.weight") == "emb.w"
    assert names.ours("dec.layers.11.norm.weight") == "blocks.11.ln1.weight"
    assert names.ours("enc.layers.0.old_norm.weight") == "blocks.0.ln1.weight"
    assert names.ours("emb.w") == "wte.weight" and names.ours("tok.w") == "tte.weight"
    assert names.ours("dec.layers.0.unknown.weight") is None and names.ours("nothing") is None
