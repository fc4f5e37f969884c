"""Hugging Face interop: `to-hf` gives a GPT2LMHeadModel with mtlm's logits, `from-hf` imports one at any
tensor degree, and the round trip returns the same tensors; load_model() slices the padded vocabulary off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtlm import load_model
from mtlm.checkpoint.format import CheckpointError, read_metadata
from mtlm.convert import from_hf, main, to_hf
from mtlm.model.gpt import GPT
from mtlm.parallel import ParallelState
from mtlm.train.checkpoint import save_checkpoint

VOCAB = 300  # not a multiple of 128: mtlm pads it, HF does not
CFG = SimpleNamespace(name="t", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                      max_position_embeddings=24, make_vocab_size_divisible_by=128, dropout=0.0, init_std=0.2,
                      layernorm_eps=1e-5)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory: pytest.TempPathFactory):
    """An mtlm checkpoint of a randomly initialised model (large std and random biases / LN gains, so every
    layout mistake shows in the logits) and its to-hf conversion, loaded by transformers."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("convert")
    gpt = GPT(CFG, VOCAB, ParallelState())
    gpt.init_weights(seed=3)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(tmp / "ck", 5, 40, ParallelState(), gpt, extra={"tokenizer": {"eos_id": 2}})
    to_hf(tmp / "ck", tmp / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp / "hf").eval()
    return tmp, gpt.eval(), hf


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_to_hf_logits_match_transformers(hf_pair) -> None:
    tmp, gpt, hf = hf_pair
    ours = load_model(tmp / "ck")
    assert ours.step == 5 and ours.vocab_size == VOCAB
    logits = ours(_ids())
    assert logits.shape == (2, 24, VOCAB)  # the real vocabulary: no padded (-inf) columns
    torch.testing.assert_close(logits, gpt(_ids())[..., :VOCAB], rtol=0, atol=0)
    theirs = hf(_ids()).logits
    assert theirs.shape == logits.shape and logits.std() > 1.0
    torch.testing.assert_close(theirs, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["vocab_size"], config["n_positions"]) == \
        (2, 64, 4, VOCAB, 24)
    assert config["activation_function"] == "gelu_new" and config["eos_token_id"] == 2
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


@torch.no_grad()
def test_from_hf_at_tensor_2_round_trips(hf_pair) -> None:
    tmp, _, hf = hf_pair
    # Through the command line, as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "mtlm.convert", "from-hf", str(tmp / "hf"), str(tmp / "imported"),
                           "--tensor", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = read_metadata(tmp / "imported" / "step_00000000")
    assert meta["layout"]["tensor"] == 2 and sorted(meta["files"]) == ["rank00000.safetensors",
                                                                      "rank00001.safetensors"]
    qkv = meta["tensors"]["model.blocks.0.attn.qkv.weight"]["shards"]
    assert [(s["start"], s["stop"]) for s in qkv] == [(0, 96), (96, 192)]  # whole heads per rank
    theirs = hf(_ids()).logits
    imported = load_model(tmp / "imported")(_ids())
    torch.testing.assert_close(imported, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    # Back to HF: the very same tensors.
    assert main(["to-hf", str(tmp / "imported"), str(tmp / "hf2")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp / "hf" / "model.safetensors"), load_file(tmp / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) == 4 + 12 * 2
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_from_hf_rejects_what_it_cannot_represent(hf_pair, tmp_path: Path, capsys) -> None:
    tmp = hf_pair[0]
    config = json.loads((tmp / "hf" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    assert main(["from-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("checkpoint error: ") and "relu" in err and "\n" not in err
    with pytest.raises(CheckpointError, match="does not divide"):
        from_hf(tmp / "hf", tmp_path / "out3", tensor=3)
