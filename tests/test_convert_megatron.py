"""Megatron-LM legacy checkpoints: every layout generation imports to the logits of the same transformers GPT-2,
at mtlm tensor degree 1 and 2; to-megatron round-trips exactly; a pickle that would run code is refused."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtlm import load_model
from mtlm.checkpoint.format import CheckpointError, read_metadata
from mtlm.convert import main
from mtlm.convert.megatron import from_megatron, qkv_to_mtlm
from mtlm.convert.megatron_export import to_megatron
from mtlm.convert.pickles import UnsafeCheckpointError, safe_load
from mtlm.convert.writer import read_checkpoint
from tests.megatron_layouts import (
    HEADS,
    POSITIONS,
    VOCAB,
    pickle_bytes,
    random_gpt2,
    rank_state,
    rng_states,
    write_megatron,
)


@pytest.fixture(scope="module")
def hf():
    return random_gpt2()


def _tok(size: int) -> SimpleNamespace:
    """Stands for a GPT-2 BPE tokenizer of `size` tokens (only its size and metadata entry are used here)."""
    return SimpleNamespace(path="vocab.json", vocab_size=size, eos_id=size - 1)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))


def _assert_logits(ours: torch.Tensor, hf_model) -> None:
    with torch.no_grad():
        theirs = hf_model(_ids()).logits
    assert ours.shape == theirs.shape and theirs.std() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_qkv_orders_by_version() -> None:
    # One rank, 2 heads of dim 2: label each row by (q/k/v, head, d) as the version lays it out.
    labels = {0: [(w, h, d) for w in range(3) for h in range(2) for d in range(2)],
              1.0: [(w, h, d) for h in range(2) for d in range(2) for w in range(3)],
              2.0: [(w, h, d) for h in range(2) for w in range(3) for d in range(2)]}
    mtlm_order = labels[2.0]  # [head][q,k,v][d]
    for version, order in {**labels, 3.0: labels[2.0]}.items():
        rows = torch.tensor([100 * w + 10 * h + d for w, h, d in order], dtype=torch.float32)
        got = qkv_to_mtlm(rows, version, heads=2)
        assert got.tolist() == [100 * w + 10 * h + d for w, h, d in mtlm_order], version
        weight = rows[:, None].expand(12, 3)  # a weight's columns travel with their row
        assert torch.equal(qkv_to_mtlm(weight, version, 2)[:, 1], got)


# (checkpoint_version, 2.x names, args in the file, saved tensor ranks, zipped, legacy pickle, mtlm degree)
LAYOUTS = [
    (0, False, False, 1, True, True, 2),  # the GPT-2 345M release: v0, 1.x names, no args, one rank, NGC zip
    (0, False, True, 2, False, True, 1),
    (1.0, False, True, 2, False, False, 2),
    (1.0, True, False, 1, True, False, 1),
    (2.0, True, True, 2, True, False, 2),
    (2.0, False, False, 2, False, True, 1),
    (3.0, True, True, 2, False, False, 1),
    (3.0, False, False, 1, False, False, 2),
]


@pytest.mark.parametrize("version,new_names,with_args,saved,zipped,legacy,tensor", LAYOUTS)
def test_from_megatron_matches_transformers(hf, tmp_path: Path, version, new_names, with_args, saved, zipped,
                                            legacy, tensor) -> None:
    src = write_megatron(tmp_path / "meg", hf, version, saved, new_names, with_args, zipped, legacy,
                         iteration=None if saved == 1 else 1000, extra=rng_states() if with_args else None)
    heads = [] if with_args else ["--num-attention-heads", str(HEADS)]
    assert main(["from-megatron", str(src), str(tmp_path / "ck"), "--tensor", str(tensor), *heads]) == 0
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["layout"]["tensor"] == tensor and meta["source"]["checkpoint_version"] == version
    # Without tokenizer files or args.vocab_size the padded rows stay (as tokens no text produces).
    rows = -(-VOCAB // (128 * saved)) * 128 * saved
    assert meta["model"]["vocab_size"] == rows
    ours = load_model(tmp_path / "ck")(_ids())[..., :VOCAB]
    _assert_logits(ours, hf)


def test_real_vocabulary_and_preset(hf, tmp_path: Path) -> None:
    src = write_megatron(tmp_path / "meg", hf, 0, 2, False, False)
    from_megatron(src, tmp_path / "ck", 2, num_attention_heads=HEADS, tokenizer=_tok(VOCAB))
    meta, full = read_checkpoint(tmp_path / "ck")
    assert meta["model"]["vocab_size"] == VOCAB and full["wte.weight"].shape == (VOCAB, 64)
    assert meta["tokenizer"] == {"path": "vocab.json", "vocab_size": VOCAB, "eos_id": VOCAB - 1}
    _assert_logits(load_model(tmp_path / "ck")(_ids()), hf)
    for wrong in (200, 600):  # 200 pads to 256 rows at 2 ranks, not 512; 600 is more than there are
        with pytest.raises(CheckpointError, match=f"has {wrong} tokens, which does not fit the checkpoint's 512 "
                           "embedding rows padded to a multiple of 128 x 2"):
            from_megatron(src, tmp_path / "bad", tokenizer=_tok(wrong), num_attention_heads=HEADS)
    with pytest.raises(CheckpointError, match="--num-attention-heads N or --preset NAME"):
        from_megatron(src, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="--preset gpt2_tiny says num_layers=4, the checkpoint has 2"):
        from_megatron(src, tmp_path / "bad", preset="gpt2_tiny")
    with pytest.raises(CheckpointError, match="3 tensor ranks do not divide|does not divide"):
        from_megatron(src, tmp_path / "bad", 3, num_attention_heads=HEADS)


def test_preset_gives_what_the_file_lacks(tmp_path: Path) -> None:
    tiny = random_gpt2(layers=4, hidden=256, heads=4, positions=128)  # conf/model/gpt2_tiny.yaml's shape
    src = write_megatron(tmp_path / "meg", tiny, 0, 1, False, False, zipped=True, legacy_pickle=True)
    assert main(["from-megatron", str(src), str(tmp_path / "ck"), "--preset", "gpt2_tiny"]) == 0
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert (meta["model"]["name"], meta["model"]["num_attention_heads"], meta["model"]["seq_length"]) == \
        ("gpt2_tiny", 4, 128)
    _assert_logits(load_model(tmp_path / "ck")(_ids())[..., :VOCAB], tiny)


def test_to_megatron_round_trip_is_exact(hf, tmp_path: Path) -> None:
    src = write_megatron(tmp_path / "meg", hf, 1.0, 1, False, True)
    from_megatron(src, tmp_path / "ck", 1, tokenizer=_tok(VOCAB), num_attention_heads=HEADS)
    _, before = read_checkpoint(tmp_path / "ck")
    assert main(["to-megatron", str(tmp_path / "ck"), str(tmp_path / "meg2"), "--tensor", "2"]) == 0
    # The files are version 3.0 exactly as the tests' own writer lays it out (padding rows zero, not random).
    hf_sd = {k: v.detach() for k, v in hf.state_dict().items()}
    for rank in range(2):
        written = safe_load(tmp_path / "meg2" / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
        assert written["checkpoint_version"] == 3.0 and written["args"].tensor_model_parallel_size == 2
        assert written["args"].padded_vocab_size == 512 and written["args"].vocab_size == VOCAB
        expected = rank_state(hf_sd, HEADS, rank, 2, 3.0, True, 512)["language_model"]
        got = written["model"]["language_model"]
        assert got["encoder"].keys() == expected["encoder"].keys()
        for name, value in expected["encoder"].items():
            assert torch.equal(got["encoder"][name], value), name
        wte = got["embedding"]["word_embeddings"]["weight"]
        real = max(0, min(256, VOCAB - 256 * rank))
        assert torch.equal(wte[:real], expected["embedding"]["word_embeddings"]["weight"][:real])
        assert not wte[real:].any()
    assert (tmp_path / "meg2" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    from_megatron(tmp_path / "meg2", tmp_path / "back", 2)  # args now in the file: no options needed
    meta, after = read_checkpoint(tmp_path / "back")
    assert meta["model"]["vocab_size"] == VOCAB and before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    with pytest.raises(CheckpointError, match="not empty"):
        to_megatron(tmp_path / "ck", tmp_path / "meg2")


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path: Path, capsys, legacy: bool) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle_bytes({"model": {}, "args": Payload()}, legacy)
    # Negative control: a free unpickle of these bytes does run the payload.
    torch.load(__import__("io").BytesIO(evil), weights_only=False)
    assert marker.exists()
    marker.unlink()
    archive = tmp_path / "megatron_lm_345m_v0.0.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("latest_checkpointed_iteration.txt", "release")
        z.writestr("release/mp_rank_00/model_optim_rng.pt", evil)
    assert main(["from-megatron", str(archive), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "release/mp_rank_00/model_optim_rng.pt" in err and "system" in err, err
    assert not marker.exists() and not (tmp_path / "ck").exists()
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        safe_load(evil, "x.pt")
    assert not marker.exists()


def test_bad_layouts_are_named(hf, tmp_path: Path) -> None:
    src = write_megatron(tmp_path / "meg", hf, 3.0, 2, True, True, iteration=20)
    (tmp_path / "meg" / "latest_checkpointed_iteration.txt").write_text("30")
    with pytest.raises(CheckpointError, match="names '30' but .*iter_0000030 has no"):
        from_megatron(src, tmp_path / "ck")
    # Pointing at the iteration folder itself works without the tracker.
    from_megatron(tmp_path / "meg" / "iter_0000020", tmp_path / "ck")
    os.rename(tmp_path / "meg" / "iter_0000020" / "mp_rank_01", tmp_path / "meg" / "iter_0000020" / "mp_rank_00_001")
    with pytest.raises(CheckpointError, match="pipeline-parallel"):
        from_megatron(tmp_path / "meg" / "iter_0000020", tmp_path / "ck2")
    with pytest.raises(CheckpointError, match="not a Megatron-LM checkpoint"):
        from_megatron(tmp_path / "ck", tmp_path / "ck3")


def test_345m_layout_parameter_count() -> None:
    from types import SimpleNamespace

    from mtlm.convert.megatron import read_preset
    from mtlm.model.gpt import GPT
    from mtlm.parallel import ParallelState

    cfg = SimpleNamespace(**{"make_vocab_size_divisible_by": 128, "layernorm_eps": 1e-5, "init_std": 0.02,
                             **read_preset("gpt2_345m")})
    for vocab in (50257, 50304):  # the real GPT-2 vocabulary, or the release's padded rows kept as they are
        gpt = GPT(cfg, vocab, ParallelState(), device="meta")
        assert sum(p.numel() for p in gpt.parameters()) == 354_871_296 == gpt.num_parameters()


def test_gpt2_bpe_files_are_checked_and_recorded(hf, tmp_path: Path, capsys) -> None:
    from mtlm.data.gpt2_bpe import bytes_to_symbols, write_bpe_files
    from mtlm.data.text_tokenizer import tokenizer_from_entry

    symbols = list(bytes_to_symbols().values())
    merges = [(a, b) for a in "etaoinsh" for b in "shrdlucm"][: VOCAB - 257]  # 256 bytes + merges + <|endoftext|>
    vocab = {s: i for i, s in enumerate(symbols + [a + b for a, b in merges] + ["<|endoftext|>"])}
    assert len(vocab) == VOCAB
    vocab_json, merges_txt = write_bpe_files(tmp_path / "tok", vocab, merges)
    src = write_megatron(tmp_path / "meg", hf, 3.0, 1, True, True)
    assert main(["from-megatron", str(src), str(tmp_path / "ck"), "--vocab-file", str(vocab_json),
                 "--merge-file", str(merges_txt)]) == 0
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["model"]["vocab_size"] == VOCAB and meta["tokenizer"]["type"] == "gpt2"
    tok = tokenizer_from_entry(meta["tokenizer"])
    assert tok.eos_id == VOCAB - 1 and tok.decode(tok.encode("the heat")) == "the heat"
    # A 400-token BPE (padded: 512 rows) is not this model's (384 rows): one line, nothing written.
    merges = [(a, b) for a in "etaoinshrdlucmfwyp" for b in "etaoinshrdlucmfwyp"][:143]
    big = {s: i for i, s in enumerate(symbols + [a + b for a, b in merges] + ["<|endoftext|>"])}
    vocab_json, merges_txt = write_bpe_files(tmp_path / "big", big, merges)
    capsys.readouterr()
    assert main(["from-megatron", str(src), str(tmp_path / "bad"), "--vocab-file", str(vocab_json),
                 "--merge-file", str(merges_txt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has 400 tokens, which does not fit the checkpoint's 384 embedding rows" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
