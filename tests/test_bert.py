"""BERT (issue 14): preset sizes (meta device and analytic), masked-LM / sentence-order samples (statistics over
10k samples, special tokens, determinism by position), post-LN, and transformers parity of to-hf / from-hf."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtlm import load_model
from mtlm.api import MaskedLanguageModel
from mtlm.checkpoint.format import CheckpointError
from mtlm.convert import main, to_hf
from mtlm.data.bert import IGNORE, MaskedLMDataset, SpecialIds, chunk_documents, document_bounds
from mtlm.model.bert import BERT, num_parameters
from mtlm.model.transformer import MLP
from mtlm.parallel import ParallelState
from mtlm.parallel.random import seed_streams
from mtlm.train.checkpoint import save_checkpoint
from tests.test_model import _preset


@pytest.mark.parametrize("preset,paper", [("bert_336m", 336e6), ("bert_1.3b", 1.3e9), ("bert_3.9b", 3.9e9)])
def test_bert_preset_parameter_counts(preset: str, paper: float) -> None:
    """Vocabulary 30,592 (BERT's 30,522 padded), 512 positions; on the meta device, no memory allocated."""
    m = _preset(preset)
    assert m._target_ == "mtlm.model.bert.BERT" and m.activation == "gelu" and m.layernorm_order == "pre"
    model = BERT(m, 30592, ParallelState(), device="meta")
    counted = sum(p.numel() for p in model.parameters())
    assert counted == num_parameters(m.num_layers, m.hidden_size, 30592, m.max_position_embeddings)
    assert abs(counted - paper) / paper < 0.02, f"{preset}: {counted:,} vs paper {paper:,.0f}"


def test_bert_336m_count_equals_the_released_model() -> None:
    # 24 x (12 h^2 + 13 h) + (V + 512 + 2) h + final LN 2h + LM head (h^2 + h + 2h + V) + pooler + binary head
    assert num_parameters(24, 1024, 30592, 512) == 336_297_858


# ---- samples -----------------------------------------------------------------------------------------------

SPECIAL = SpecialIds(cls=4, sep=5, mask=6, pad=0, vocab_size=200, never_random=(0, 1, 2, 3, 4, 5, 6))
EOS, SEQ = 3, 64


def _dataset(seed: int = 0, docs: int = 300) -> MaskedLMDataset:
    """Random documents of 5..400 ordinary tokens (ids 7..199), each ending with eos; ids 7..12 end sentences."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(docs):
        parts += [rng.integers(7, 200, rng.integers(5, 400)), [EOS]]
    tokens = np.concatenate(parts).astype(np.uint16)
    is_end = np.zeros(200, dtype=bool)
    is_end[7:13] = True
    return MaskedLMDataset(tokens, document_bounds(tokens, EOS), is_end, SPECIAL, SEQ, seed)


def test_chunks_stay_inside_documents_and_fit() -> None:
    bounds = np.array([[0, 10], [11, 11], [12, 13], [14, 300]])
    is_end = np.zeros(400, dtype=bool)  # over the vocabulary; the tokens are 0, 1, 2, ... so ids are positions
    is_end[[60, 110]] = True
    chunks = chunk_documents(bounds, np.arange(400), is_end, 61)
    assert chunks[0].tolist() == [0, 10]  # the empty and the 1-token document give no sample
    assert all(b - a >= 2 and b - a <= 61 for a, b in chunks)
    # Cut right after the sentence ends at 60 and 110, each in its chunk's second half.
    assert chunks[1:3].tolist() == [[14, 61], [61, 111]]
    assert sum(b - a for a, b in chunks[1:]) == 300 - 14  # the long document is covered exactly once


def test_masking_statistics_over_10k_samples() -> None:
    """15% of the non-special positions chosen; of those 80% [MASK], 10% random, 10% kept; swap rate 0.5 (each
    within 1% absolute, the mask rate within 1% relative). Special tokens are never chosen or replaced, the
    unmasked sample is [CLS] A [SEP] B [SEP] [PAD]... of one chunk, and token types mark the two segments."""
    ds = _dataset()
    batch = {k: v.numpy() for k, v in ds.get_batch(0, 10_000).items()}
    ids, labels, types, att = batch["input_ids"], batch["labels"], batch["token_type_ids"], batch["attention_mask"]
    special = np.isin(ids, [SPECIAL.cls, SPECIAL.sep, SPECIAL.pad]) & (labels == IGNORE)
    real = att == 1
    candidates = real & ~special
    chosen = labels != IGNORE
    assert not (chosen & ~candidates).any(), "a special or padding position was chosen"
    rate = chosen.sum() / candidates.sum()
    assert abs(rate / 0.15 - 1) < 0.01, rate
    shares = [(ids[chosen] == SPECIAL.mask).mean(), (ids[chosen] == labels[chosen]).mean()]
    shares.insert(1, 1 - sum(shares))  # replaced by a random token (an accidental same-token draw counts as kept)
    assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.01), shares
    assert not np.isin(ids[chosen & (ids != SPECIAL.mask)], SPECIAL.never_random).any()
    assert abs(batch["sop_labels"].mean() - 0.5) < 0.01
    assert (ids[:, 0] == SPECIAL.cls).all() and ((ids == SPECIAL.sep).sum(1) == 2).all()
    original = np.where(chosen, labels, ids)
    chunks = ds.chunks[ds.sample_indices(0, 10_000)]
    for i in range(0, 10_000, 97):  # the layout of every 97th sample, against its chunk
        n = att[i].sum()
        seps = np.flatnonzero(original[i] == SPECIAL.sep)
        first, second = original[i, 1:seps[0]], original[i, seps[0] + 1:seps[1]]
        a, b = (second, first) if batch["sop_labels"][i] else (first, second)
        start, stop = chunks[i]
        assert np.array_equal(np.concatenate([a, b]), ds.tokens[start:stop])
        assert seps[1] == n - 1 and (ids[i, n:] == SPECIAL.pad).all() and (types[i, n:] == 0).all()
        assert (types[i, :seps[0] + 1] == 0).all() and (types[i, seps[0] + 1:n] == 1).all()


def test_samples_are_addressed_by_position() -> None:
    """Data-parallel slices and a resumed run read by global position: same samples, however they are cut."""
    ds, again = _dataset(seed=5), _dataset(seed=5)
    whole = ds.get_batch(3, 8)
    halves = [again.get_batch(3, 4), again.get_batch(7, 4)]
    for k in whole:
        assert torch.equal(whole[k], torch.cat([h[k] for h in halves])), k
    assert not torch.equal(whole["labels"], _dataset(seed=6).get_batch(3, 8)["labels"])
    # The next epoch masks the same chunks anew (dynamic masking).
    n = ds.num_samples
    first, later = ds.sample(0), ds.sample(n + int(np.flatnonzero(ds.order(1) == ds.order(0)[0])[0]))
    assert not np.array_equal(first["labels"], later["labels"])


# ---- the model -----------------------------------------------------------------------------------------------

VOCAB = 300  # not a multiple of 128: mtlm pads it, transformers does not


def _cfg(**kw) -> SimpleNamespace:
    base = dict(_target_="mtlm.model.bert.BERT", name="b", num_layers=2, hidden_size=64, num_attention_heads=4,
                seq_length=24, max_position_embeddings=24, make_vocab_size_divisible_by=128, dropout=0.0,
                init_std=0.2, layernorm_eps=1e-5, activation="gelu", layernorm_order="pre", attention="auto")
    return SimpleNamespace(**{**base, **kw})


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=gen)
    types = (torch.arange(24) >= 10).long().expand(2, 24)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    return ids, types, mask


def _random_bert(cfg: SimpleNamespace) -> BERT:
    """Large std and random biases / layer-norm gains, so every layout mistake shows in the logits."""
    seed_streams(0, 0, torch.device("cpu"))
    model = BERT(cfg, VOCAB, ParallelState())
    model.init_weights(seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.bias[VOCAB:] = 0  # padding rows stay zero, as in training
    return model.eval()


def test_post_ln_is_original_bert() -> None:
    pre, post = BERT(_cfg(), VOCAB, ParallelState()), BERT(_cfg(layernorm_order="post"), VOCAB, ParallelState())
    assert pre.ln_f is not None and pre.ln_emb is None and post.ln_f is None and post.ln_emb is not None
    assert pre.num_parameters() == post.num_parameters() == sum(p.numel() for p in post.parameters())
    post.load_state_dict({k.replace("ln_f", "ln_emb"): v for k, v in _random_bert(_cfg()).state_dict().items()})
    block, x = post.blocks[0], torch.randn(2, 24, 64)
    # Post-LN: LN(x + attn(x)), then LN(. + mlp(.)).
    y = block.ln1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.ln2(y + block.mlp(y)))


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory: pytest.TempPathFactory):
    from transformers import MegatronBertForPreTraining

    tmp = tmp_path_factory.mktemp("bert_convert")
    bert = _random_bert(_cfg())
    save_checkpoint(tmp / "ck", 7, 56, ParallelState(), bert, extra={"tokenizer": {"pad_id": 0}})
    to_hf(tmp / "ck", tmp / "hf")
    return tmp, bert, MegatronBertForPreTraining.from_pretrained(tmp / "hf").eval()


@torch.no_grad()
def test_to_hf_logits_match_transformers(hf_pair) -> None:
    tmp, bert, hf = hf_pair
    ids, types, mask = _inputs()
    ours = load_model(tmp / "ck")
    assert isinstance(ours, MaskedLanguageModel) and ours.step == 7
    mlm, sop = ours(ids, token_type_ids=types, attention_mask=mask)
    assert mlm.shape == (2, 24, VOCAB) and sop.shape == (2, 2) and mlm.std() > 1.0
    out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(out.prediction_logits, mlm, rtol=1e-5, atol=1e-5 * mlm.abs().max().item())
    torch.testing.assert_close(out.seq_relationship_logits, sop, rtol=1e-5, atol=1e-5)
    # Padding is masked: the real positions do not see what the padded ones hold.
    changed = ids.clone()
    changed[1, 17:] = 0
    torch.testing.assert_close(ours(changed, types, mask)[0][1, :17], mlm[1, :17], rtol=0, atol=1e-5)
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-5 and config["vocab_size"] == VOCAB
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()


@torch.no_grad()
def test_from_hf_at_tensor_2_round_trips(hf_pair, tmp_path: Path) -> None:
    tmp, _, hf = hf_pair
    assert main(["from-hf", str(tmp / "hf"), str(tmp_path / "imported"), "--tensor", "2"]) == 0
    ids, types, mask = _inputs()
    out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    mlm, sop = load_model(tmp_path / "imported")(ids, types, mask)
    torch.testing.assert_close(mlm, out.prediction_logits, rtol=1e-5, atol=1e-5 * mlm.abs().max().item())
    torch.testing.assert_close(sop, out.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    assert main(["to-hf", str(tmp_path / "imported"), str(tmp_path / "hf2")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    # 3 embeddings, the final layer norm, the pooler, both heads and the LM bias; 16 tensors per layer.
    assert a.keys() == b.keys() and len(a) == 14 + 16 * 2
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_post_ln_bert_does_not_convert(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", 1, 8, ParallelState(), BERT(_cfg(layernorm_order="post"), VOCAB,
                                                                  ParallelState()))
    with pytest.raises(CheckpointError, match="pre-LN only"):
        to_hf(tmp_path / "ck", tmp_path / "hf")


def test_loss_at_init_is_log_vocab() -> None:
    seed_streams(0, 0, torch.device("cpu"))
    model = BERT(_cfg(init_std=0.02), 1000, ParallelState())
    model.init_weights(seed=0)
    ids, types, mask = _inputs()
    labels = torch.randint(0, 1000, ids.shape).masked_fill_(torch.rand(ids.shape) > 0.3, -1)
    losses, sop = model(ids, types, mask, labels)
    assert losses.shape == ((labels >= 0).sum(),) and abs(losses.mean().item() - math.log(1000)) < 0.1
    logits = model(ids, types, mask)[0]
    ref = torch.nn.functional.cross_entropy(logits[labels >= 0][:, :1000], labels[labels >= 0], reduction="none")
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)


def test_bert_flops_counted_gemm_by_gemm() -> None:
    """The formula against a GEMM-by-GEMM count: per layer qkv 6bsh^2, attention out 2bsh^2, MLP 16bsh^2, scores
    and scores x v 2bs^2h each; LM head on the 15% masked positions 2mh^2 + 2mhV; pooler 2bh^2, binary head 4bh;
    backward twice forward; recompute adds one forward of every layer."""
    from mtlm.metrics import flops

    b, s, L, h, v = 8, 512, 24, 1024, 30592
    layer = 6 * b * s * h * h + 2 * b * s * h * h + 16 * b * s * h * h + 4 * b * s * s * h
    m = 0.15 * b * s
    heads = 2 * m * h * h + 2 * m * h * v + 2 * b * h * h + 4 * b * h
    assert flops.bert_model_flops_per_iteration(b, s, L, h, v) == pytest.approx(3 * (L * layer + heads), rel=1e-12)
    assert flops.bert_hardware_flops_per_iteration(b, s, L, h, v, recompute=True) == pytest.approx(
        3 * (L * layer + heads) + L * layer, rel=1e-12)
    assert flops.bert_hardware_flops_per_iteration(b, s, L, h, v, recompute=False) == \
        flops.bert_model_flops_per_iteration(b, s, L, h, v)


@pytest.mark.parametrize("experiment,scales", [("weak_scaling_bert_cpu", ["bert_cpu_t1", "bert_cpu_t2"]),
                                               ("weak_scaling_bert_tp", ["bert_336m_t1", "bert_1.3b_t4",
                                                                         "bert_3.9b_t8"])])
def test_bert_experiments_compose(experiment: str, scales: list[str]) -> None:
    from tests.compose import compose_config

    for scale in scales:
        cfg = compose_config(f"+experiment={experiment}", f"scale={scale}", "trainer.device=cpu")
        assert cfg.model._target_ == "mtlm.model.bert.BERT" and cfg.model.activation == "gelu"
        assert cfg.model.name.startswith("bert_") and cfg.parallel.tensor == int(scale.rsplit("_t", 1)[1])


def test_bert_samples_from_a_megatron_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.paths=[PREFIX] (issue 12's .bin/.idx): documents come from the file's document index."""
    from mtlm.data.bert import build_bert_data
    from mtlm.data.corpus import default_documents
    from mtlm.data.indexed import IndexedWriter
    from mtlm.data.tokenizer import train_tokenizer
    from tests.compose import compose_config

    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "cache"))
    docs = default_documents()[:60]
    tok = train_tokenizer(iter(docs), str(tmp_path / "tok.model"), 400)
    with IndexedWriter(str(tmp_path / "corpus_text_document"), np.uint16) as w:
        for doc in docs:
            w.add_document(tok.encode(doc) + [tok.eos_id])
    cfg = compose_config("model=bert_tiny", "model.seq_length=32", "model.max_position_embeddings=32",
                         f"data.paths=[{tmp_path / 'corpus_text_document'}]", f"data.tokenizer.model={tok.path}")
    bundle = build_bert_data(cfg.data, 32, seed=0)
    batch = bundle.train.get_batch(0, 64)
    assert (batch["input_ids"][:, 0] == tok.piece_id("[CLS]")).all()
    assert not (batch["input_ids"] == tok.eos_id).any()  # documents end before their end-of-document token
    original = torch.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
    for row, swapped in zip(original.tolist(), batch["sop_labels"].tolist(), strict=True):
        first = tok.decode(row[1:row.index(tok.piece_id("[SEP]"))])  # segment A unless swapped
        assert any(first in d for d in docs) or swapped


def test_gpt_takes_the_shared_layer_choices() -> None:
    """model.layernorm_order / model.activation are the shared layer's: GPT honours them too (default: GPT-2)."""
    from mtlm.model.gpt import GPT

    gpt2 = GPT(_cfg(activation="gelu_tanh"), VOCAB, ParallelState())
    assert gpt2.ln_f is not None and gpt2.ln_emb is None and gpt2.blocks[0].attn.causal and gpt2.blocks[0].pre_ln
    post = GPT(_cfg(layernorm_order="post", activation="gelu"), VOCAB, ParallelState())
    assert post.ln_f is None and post.ln_emb is not None and not post.blocks[0].pre_ln
    assert post.num_parameters() == gpt2.num_parameters() == sum(p.numel() for p in post.parameters())
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(post.blocks[0].mlp.act(x), torch.nn.functional.gelu(x))
    assert torch.equal(gpt2.blocks[0].mlp.act(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_a_missing_activation_is_the_typed_configs_default_in_every_layer() -> None:
    """Issue 25: the layers and the masked-LM head read model.activation from one default (ModelConfig's,
    gelu_tanh), where the head used to fall back to exact gelu and the layers to the tanh form."""
    cfg = _cfg()
    del cfg.activation
    model = BERT(cfg, VOCAB, ParallelState())
    x = torch.linspace(-4, 4, 101)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert mlps and all(torch.equal(m.act(x), expected) for m in mlps)
    assert torch.equal(model.lm_head.act(x), expected)
    assert not torch.equal(expected, torch.nn.functional.gelu(x))  # the two forms do differ here
