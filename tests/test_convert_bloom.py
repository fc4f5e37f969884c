"""BLOOM: ALiBi slopes per tensor rank, the presets' exact sizes, and Hugging Face / Megatron-DeepSpeed
checkpoints (6 heads: not a power of two) converted to the logits of transformers' BloomForCausalLM at mtlm
tensor degree 1 and 2, and back to Hugging Face."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtlm import load_model
from mtlm.checkpoint.format import CheckpointError, read_metadata
from mtlm.convert import main
from mtlm.convert.deepspeed import from_deepspeed
from mtlm.convert.writer import read_checkpoint
from mtlm.data.text_tokenizer import content_hash
from mtlm.model.alibi import alibi_causal_bias, alibi_slopes, local_slopes
from tests.bloom_layouts import HEADS, VOCAB, random_bloom, write_deepspeed

SEQ = 24


@pytest.fixture(scope="module")
def hf():
    return random_bloom()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _assert_logits(ours: torch.Tensor, hf_model) -> None:
    with torch.no_grad():
        theirs = hf_model(_ids()).logits
    assert ours.shape == theirs.shape and theirs.std() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_alibi_slopes_match_transformers() -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 2, 3, 5, 6, 8, 12, 16, 24, 32, 40, 112):
        theirs = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]  # slope x key position 1
        torch.testing.assert_close(torch.tensor(alibi_slopes(n)), theirs, rtol=1e-6, atol=0)
    assert alibi_slopes(8)[0] == 0.5 and alibi_slopes(8)[-1] == 2.0 ** -8  # the paper's 1/2 ... 1/256
    assert alibi_slopes(6) == [2.0 ** (-2 * k) for k in (1, 2, 3, 4)] + [2.0 ** -1, 2.0 ** -3]
    for t in (1, 2, 3, 6):  # each rank keeps its contiguous chunk of heads' slopes
        assert torch.cat([local_slopes(6, t, r) for r in range(t)]).tolist() == alibi_slopes(6)


def test_relative_bias_gives_blooms_attention_probabilities() -> None:
    slopes = torch.tensor(alibi_slopes(HEADS))
    scores = torch.randn(HEADS, SEQ, SEQ)
    ours = (scores + alibi_causal_bias(slopes, SEQ, torch.float32)).softmax(-1)
    causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)
    theirs = (scores + slopes[:, None, None] * torch.arange(SEQ) + causal).softmax(-1)  # slope x key position
    torch.testing.assert_close(ours, theirs)
    assert not ours.triu(1).any() and math.isclose(ours[0, 0, 0].item(), 1.0)


def test_bloom_presets_parameter_counts() -> None:
    from mtlm.convert.megatron import read_preset
    from mtlm.model.build import build_model
    from mtlm.parallel import ParallelState

    expected = {"bloom_560m": 559_214_592, "bloom_1b1": 1_065_314_304}
    for name, count in expected.items():
        cfg = _preset_config(read_preset(name))
        model = build_model(cfg, cfg.vocab_size, ParallelState(), device="meta")
        assert sum(p.numel() for p in model.parameters()) == count == model.num_parameters(), name
        assert model.wpe is None and model.ln_emb is not None
    for name in ("bloom_1b7", "bloom_3b", "bloom_7b1"):
        spec = read_preset(name)
        assert spec["vocab_size"] == 250_880 and spec["seq_length"] == 2048 and spec["position_embedding"] == "alibi"


def _preset_config(spec: dict):
    from mtlm.api import model_config

    return model_config({"model": spec})


def _tokenizer_json(path: Path, size: int) -> Path:
    """A word-level tokenizer.json of `size` tokens with BLOOM's specials at ids 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("tensor", [1, 2])
def test_from_hf_matches_transformers_and_back(hf, tmp_path: Path, capsys, tensor: int) -> None:
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok = _tokenizer_json(tmp_path / "tok" / "tokenizer.json", VOCAB - 20)  # BLOOM's: fewer tokens than rows
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ck"), "--tensor", str(tensor),
                 "--tokenizer-file", str(tok)]) == 0
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["model"]["position_embedding"] == "alibi" and meta["layout"]["tensor"] == tensor
    assert meta["tokenizer"] == {"type": "tokenizer.json", "path": str(tok), "vocab_size": VOCAB - 20, "eos_id": 2,
                                 "sha256": content_hash("tokenizer.json", [str(tok)])}  # its identity (issue 25)
    big = _tokenizer_json(tmp_path / "big" / "tokenizer.json", VOCAB + 1)
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "bad"), "--tokenizer-file", str(big)]) == 2
    assert f"has {VOCAB + 1} tokens, which does not fit the checkpoint's {VOCAB} embedding rows" in \
        capsys.readouterr().err
    _assert_logits(load_model(tmp_path / "ck")(_ids()), hf)
    assert main(["to-hf", str(tmp_path / "ck"), str(tmp_path / "hf2")]) == 0
    from safetensors.torch import load_file
    from transformers import BloomForCausalLM

    again = BloomForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    _assert_logits(again(_ids()).logits, hf)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (config["n_head"], config["n_layer"], config["hidden_size"]) == (HEADS, 2, 48)


@pytest.mark.parametrize("saved,tensor", [(1, 2), (2, 1)])
def test_from_deepspeed_matches_transformers(hf, tmp_path: Path, saved: int, tensor: int) -> None:
    src = write_deepspeed(tmp_path / "ds", hf, saved, drift=0.01)
    assert main(["from-deepspeed", str(src), str(tmp_path / "ck"), "--tensor", str(tensor),
                 "--num-attention-heads", str(HEADS)]) == 0
    _assert_logits(load_model(tmp_path / "ck")(_ids()), hf)
    _, full = read_checkpoint(tmp_path / "ck")
    if saved == 2:  # replicated tensors that drifted apart are averaged
        torch.testing.assert_close(full["ln_f.weight"], hf.transformer.ln_f.weight.detach(), rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="--num-attention-heads N or --preset NAME"):
        from_deepspeed(src, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="preset bloom_560m says num_layers=24, the checkpoint has 2"):
        from_deepspeed(src, tmp_path / "bad", preset="bloom_560m")


@torch.no_grad()
def test_alibi_generation_cache_and_unfused_path_match(hf, tmp_path: Path) -> None:
    from mtlm.model.kv_cache import KVCache

    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ck")])
    gpt = load_model(tmp_path / "ck").gpt
    ids = _ids()
    full = gpt(ids)
    cache = KVCache(len(gpt.blocks))  # prefill 10 positions, then one at a time, as mtlm.generate does
    steps = [gpt(ids[:, :10], kv_cache=cache)] + [gpt(ids[:, i:i + 1], kv_cache=cache) for i in range(10, SEQ)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-4)
    for block in gpt.blocks:
        block.attn.impl = "unfused"  # Megatron-style core attention: the same bias through baddbmm
    torch.testing.assert_close(gpt(ids), full, rtol=1e-5, atol=1e-4)


def _logits_at_degree(state, paths: list[str], ids: torch.Tensor) -> list[torch.Tensor]:
    """Each converted checkpoint run at this process group's tensor degree, logits gathered over the vocab
    (BERT: its masked-LM logits, then its sentence-order logits)."""
    from mtlm.api import model_config
    from mtlm.checkpoint.format import find_checkpoint
    from mtlm.model.build import build_model
    from mtlm.parallel.mappings import gather_last_dim
    from mtlm.train.checkpoint import restore_checkpoint

    out = []
    for path in paths:
        meta = read_metadata(find_checkpoint(path))
        model = build_model(model_config(meta), meta["model"]["vocab_size"], state).eval()
        restore_checkpoint(path, state, model)
        with torch.no_grad():
            result = model(ids)
        logits, sop = result if isinstance(result, tuple) else (result, None)
        out.append(gather_last_dim(logits, state.tp_group)[..., :meta["model"]["vocab_size"]])
        if sop is not None:
            out.append(sop)
    return out


@pytest.mark.multiprocess
def test_converted_checkpoints_at_tensor_degree_2(hf, tmp_path: Path) -> None:
    """One gloo run for all: a legacy Megatron GPT-2 (version 0: each rank's rows [q|k|v] of its heads), a BLOOM
    from Megatron-DeepSpeed (6 heads: 3 per rank, each rank its own ALiBi slopes) and a Megatron-BERT."""
    from tests.distributed import run_ranks
    from tests.megatron_layouts import HEADS as GPT_HEADS
    from tests.megatron_layouts import POSITIONS, random_gpt2, random_megatron_bert, write_megatron, write_megatron_bert

    gpt2 = random_gpt2()
    src = write_megatron(tmp_path / "meg", gpt2, 0, 2, False, True)
    main(["from-megatron", str(src), str(tmp_path / "gpt"), "--tensor", "2", "--num-attention-heads",
          str(GPT_HEADS)])
    write_deepspeed(tmp_path / "ds", hf, 2)
    main(["from-deepspeed", str(tmp_path / "ds"), str(tmp_path / "bloom"), "--tensor", "2",
          "--num-attention-heads", str(HEADS)])
    bert = random_megatron_bert()
    write_megatron_bert(tmp_path / "bert_meg", bert, 2.0, 2, True)
    main(["from-megatron", str(tmp_path / "bert_meg"), str(tmp_path / "bert"), "--tensor", "2"])
    ids = _ids()[:, :POSITIONS]
    results = run_ranks(_logits_at_degree, 2, [str(tmp_path / p) for p in ("gpt", "bloom", "bert")], ids)
    with torch.no_grad():
        bert_out = bert(input_ids=ids)
        expected = [gpt2(ids).logits, hf(ids).logits, bert_out.prediction_logits, bert_out.seq_relationship_logits]
    for ours, theirs in zip(results[0], expected, strict=True):
        ours = ours[..., :theirs.shape[-1]]  # no tokenizer given: the Megatron files' padding rows were kept
        assert ours.shape == theirs.shape and (theirs.dim() == 2 or theirs.std() > 1.0)  # 2-D: the SOP logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))
