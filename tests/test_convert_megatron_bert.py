"""Megatron-BERT legacy checkpoints (with and without the binary head) import to the logits of transformers'
MegatronBertForPreTraining at mtlm tensor degree 1 and 2, with their WordPiece vocabulary, and round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlm import load_model
from mtlm.checkpoint.format import read_metadata
from mtlm.convert import main
from mtlm.convert.megatron import from_megatron
from mtlm.convert.megatron_export import to_megatron
from mtlm.convert.pickles import safe_load
from mtlm.convert.writer import read_checkpoint
from tests.megatron_layouts import HEADS, POSITIONS, VOCAB, random_megatron_bert, write_megatron_bert


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))


def _bert_vocab(path: Path) -> Path:
    """A lower-case WordPiece vocab.txt of exactly VOCAB tokens (so: inferred uncased)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    path.write_text("\n".join(words) + "\n")
    return path


# (checkpoint_version, saved tensor ranks, args in the file, binary head, GeLU, mtlm degree)
BERT_LAYOUTS = [(0, 1, False, True, "gelu_new", 2), (2.0, 2, True, False, "gelu_new", 1),
                (3.0, 2, True, True, "gelu", 2)]


@pytest.mark.parametrize("version,saved,with_args,binary_head,act,tensor", BERT_LAYOUTS)
def test_bert_from_megatron_matches_transformers(tmp_path: Path, capsys, version, saved, with_args, binary_head,
                                                 act, tensor) -> None:
    hf_bert = random_megatron_bert(act=act)
    # gelu: the exact GeLU, which Megatron-LM runs only with its fused (tanh) bias-GeLU turned off.
    extra = {"bias_gelu_fusion": False} if act == "gelu" else None
    src = write_megatron_bert(tmp_path / "meg", hf_bert, version, saved, with_args, binary_head, extra)
    heads = [] if with_args else ["--num-attention-heads", str(HEADS)]
    vocab = _bert_vocab(tmp_path / "vocab.txt")
    assert main(["from-megatron", str(src), str(tmp_path / "ck"), "--tensor", str(tensor), *heads,
                 "--vocab-file", str(vocab)]) == 0
    err = capsys.readouterr().err
    assert "uncased (lower-casing) WordPiece" in err and ("no binary head" in err) != binary_head
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["model"]["_target_"] == "mtlm.model.bert.BERT" and meta["model"]["vocab_size"] == VOCAB
    assert meta["model"]["activation"] == ("gelu" if act == "gelu" else "gelu_tanh")
    assert meta["tokenizer"]["type"] == "wordpiece" and meta["tokenizer"]["lowercase"] is True
    ids = _ids()
    types = (torch.arange(POSITIONS) >= POSITIONS // 2).long().expand(2, -1)
    mask = torch.ones(2, POSITIONS, dtype=torch.long)
    mask[1, -5:] = 0  # padding in the second sample
    mlm, sop = load_model(tmp_path / "ck")(ids, types, mask)
    with torch.no_grad():
        theirs = hf_bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
    scale = theirs.prediction_logits.abs().max().item()
    assert theirs.prediction_logits.std() > 1.0
    torch.testing.assert_close(mlm, theirs.prediction_logits, rtol=1e-5, atol=1e-5 * scale)
    if binary_head:
        torch.testing.assert_close(sop, theirs.seq_relationship_logits, rtol=1e-5, atol=1e-5 * scale)
    else:
        assert not sop.any()  # no binary head in the file: mtlm's starts at zero
    back = tmp_path / "meg2"
    to_megatron(tmp_path / "ck", back, tensor=2)
    written = safe_load(back / "release" / "mp_rank_01" / "model_optim_rng.pt")
    assert written["args"].tokenizer_type == "BertWordPieceLowerCase" and "binary_head" in written["model"]
    from_megatron(back, tmp_path / "again", 1)
    _, a = read_checkpoint(tmp_path / "ck")
    _, b = read_checkpoint(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
