"""Megatron-Core torch_dist checkpoints both ways, with megatron-core itself on the other side:
megatron-core saves -> from-mcore -> mtlm's logits equal megatron-core's; mtlm -> to-mcore -> megatron-core's
own dist_checkpointing.load -> logits equal; pickles that would run code are refused before they run."""

from __future__ import annotations

import argparse
import io
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from mtlm import load_model
from mtlm.checkpoint.format import read_metadata
from mtlm.convert import main
from mtlm.convert.writer import read_checkpoint, write_checkpoint
from mtlm.data.tokenizer import train_tokenizer
from tests.eval_helpers import TEXT
from tests.mcore_cpu import mcore_bert, mcore_gpt, mcore_world  # skips the module when megatron-core is absent
from tests.test_mcore_parity import HEADS, HIDDEN, LAYERS, POSITIONS, random_mtlm_gpt

dist_checkpointing = pytest.importorskip("megatron.core.dist_checkpointing")

REAL_VOCAB, PADDED = 300, 384  # Megatron pads 300 to a multiple of 128


def _ids() -> torch.Tensor:
    return torch.randint(0, REAL_VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))


def _args(**kw) -> argparse.Namespace:
    """The args Megatron-LM keeps in common.pt (the ones the importer reads, and a few it must ignore)."""
    base = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=4 * HIDDEN,
                max_position_embeddings=POSITIONS, seq_length=POSITIONS, padded_vocab_size=PADDED,
                vocab_size=REAL_VOCAB, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=1, layernorm_epsilon=1e-5, bias_gelu_fusion=True, openai_gelu=False,
                hidden_dropout=0.0, params_dtype=torch.float32, position_embedding_type="learned_absolute",
                ckpt_format="torch_dist", lr=3e-4)
    return argparse.Namespace(**{**base, **kw})


def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (p.dim() == 1) * 0.2)


def _mcore_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), None)


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert theirs.std() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("fusion", [True, False])
def test_megatron_core_save_imports_to_its_logits(monkeypatch, tmp_path: Path, fusion: bool) -> None:
    root = tmp_path / "run"
    with mcore_world(monkeypatch):
        # bias_gelu_fusion: Megatron-LM's fused bias-GeLU is the tanh one; without it megatron-core runs F.gelu.
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, PADDED, POSITIONS, activation="gelu_tanh" if fusion else "gelu")
        _randomise(theirs)
        with torch.no_grad():  # Megatron's padding rows: whatever training left there (never a real token)
            theirs.embedding.word_embeddings.weight[REAL_VOCAB:] = 0
        (root / "iter_0000007").mkdir(parents=True)
        dist_checkpointing.save({"model": theirs.sharded_state_dict(), "args": _args(bias_gelu_fusion=fusion),
                                 "checkpoint_version": 3.0, "iteration": 7}, str(root / "iter_0000007"))
        (root / "latest_checkpointed_iteration.txt").write_text("7")
        expected = _mcore_logits(theirs, _ids())[..., :REAL_VOCAB]
    assert main(["from-mcore", str(root), str(tmp_path / "ck"), "--tensor", "2"]) == 0
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["model"]["vocab_size"] == REAL_VOCAB and meta["layout"]["tensor"] == 2
    assert meta["model"]["activation"] == ("gelu_tanh" if fusion else "gelu")
    assert meta["source"]["iteration"] == 7
    _close(load_model(tmp_path / "ck")(_ids())[..., :REAL_VOCAB], expected)


def test_to_mcore_is_loaded_by_megatron_core(monkeypatch, tmp_path: Path) -> None:
    ours = random_mtlm_gpt("gelu_tanh", 1e-5, seed=4)
    model = {"_target_": "mtlm.model.gpt.GPT", "name": "t", "num_layers": LAYERS, "hidden_size": HIDDEN,
             "num_attention_heads": HEADS, "seq_length": POSITIONS, "max_position_embeddings": POSITIONS,
             "vocab_size": 384, "make_vocab_size_divisible_by": 128, "dropout": 0.0, "init_std": 0.02,
             "layernorm_eps": 1e-5, "activation": "gelu_tanh", "layernorm_order": "pre"}
    write_checkpoint(tmp_path / "ck", model, {n: p.detach() for n, p in ours.named_parameters()}, 2, {"test": "t"})
    assert main(["to-mcore", str(tmp_path / "ck"), str(tmp_path / "mc")]) == 0
    with mcore_world(monkeypatch):
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, 384, POSITIONS)
        # megatron-core reads common.pt weights-only; Megatron-LM allows Namespace at start-up (its safe_globals).
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = dist_checkpointing.load({"model": theirs.sharded_state_dict()}, str(tmp_path / "mc" / "release"))
            common = dist_checkpointing.load_common_state_dict(str(tmp_path / "mc" / "release"))
        missing, unexpected = theirs.load_state_dict(loaded["model"], strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
        logits = _mcore_logits(theirs, _ids())
    assert common["args"].num_attention_heads == HEADS and common["args"].padded_vocab_size == 384
    with torch.no_grad():
        _close(ours(_ids()), logits)
    assert main(["from-mcore", str(tmp_path / "mc"), str(tmp_path / "back")]) == 0  # and back, exactly
    assert torch.equal(load_model(tmp_path / "back")(_ids()), load_model(tmp_path / "ck")(_ids()))


class _Payload:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_that_run_code_are_refused(monkeypatch, tmp_path: Path, capsys) -> None:
    ours = random_mtlm_gpt("gelu_tanh", 1e-5)
    model = {"_target_": "mtlm.model.gpt.GPT", "name": "t", "num_layers": LAYERS, "hidden_size": HIDDEN,
             "num_attention_heads": HEADS, "seq_length": POSITIONS, "max_position_embeddings": POSITIONS,
             "vocab_size": 384, "make_vocab_size_divisible_by": 128, "dropout": 0.0, "init_std": 0.02,
             "layernorm_eps": 1e-5, "activation": "gelu_tanh", "layernorm_order": "pre"}
    write_checkpoint(tmp_path / "ck", model, {n: p.detach() for n, p in ours.named_parameters()}, 1, {"test": "t"})
    _Payload.marker = tmp_path / "pwned"
    for target in (".metadata", "common.pt"):
        out = tmp_path / f"mc_{target}"
        assert main(["to-mcore", str(tmp_path / "ck"), str(out)]) == 0
        file = out / "release" / target
        if target == ".metadata":
            file.write_bytes(pickle.dumps(_Payload()))
        else:
            torch.save({"args": _Payload()}, file)
        assert main(["from-mcore", str(out), str(tmp_path / f"x{target}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("checkpoint error:") and "refused to load" in err and "\n" not in err
        assert str(file) in err and not _Payload.marker.exists()


def test_untied_output_layer_is_refused(monkeypatch, tmp_path: Path, capsys) -> None:
    with mcore_world(monkeypatch):
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, PADDED, POSITIONS, tied=False)
        _randomise(theirs)
        dist_checkpointing.save({"model": theirs.sharded_state_dict(), "args": _args(), "iteration": 1},
                                str(tmp_path))
    assert main(["from-mcore", str(tmp_path), str(tmp_path / "ck")]) == 2
    assert "untied output layer" in capsys.readouterr().err


def _nemo_config(**kw) -> str:
    cfg = dict(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=HEADS,
               max_position_embeddings=POSITIONS, encoder_seq_length=POSITIONS, layernorm_epsilon=1e-5,
               normalization="layernorm", activation="gelu", bias_activation_fusion=True, bias=True,
               position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
               make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, precision="bf16-mixed",
               tokenizer={"library": "megatron", "type": "GPT2BPETokenizer"})
    return yaml.safe_dump({**cfg, **kw})


def _tar(path: Path, folder: Path, extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname=".")
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def test_nemo_archive_imports_to_megatron_core_logits(monkeypatch, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    with mcore_world(monkeypatch):
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, PADDED, POSITIONS)
        _randomise(theirs)
        (packed / "model_weights").mkdir(parents=True)
        # NeMo's keys carry its `model.` prefix; its common.pt has no Megatron-LM args.
        dist_checkpointing.save(theirs.sharded_state_dict(prefix="model."), str(packed / "model_weights"))
        expected = _mcore_logits(theirs, _ids())[..., :REAL_VOCAB]
    # The tokenizer inside the archive, named as NeMo names its files: nemo:<name>.
    tok = train_tokenizer([TEXT * 3], str(packed / "a1b2_tokenizer.model"), 340)
    (packed / "model_config.yaml").write_text(_nemo_config(
        tokenizer={"library": "sentencepiece", "model": "nemo:a1b2_tokenizer.model"}))
    nemo = _tar(tmp_path / "gpt.nemo", packed)
    assert main(["from-nemo", str(nemo), str(tmp_path / "ck")]) == 0
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["model"]["activation"] == "gelu_tanh" and meta["source"]["megatron_core"] == str(nemo)
    assert meta["model"]["vocab_size"] == tok.vocab_size == 340
    assert meta["tokenizer"]["sha256"] == tok.entry()["sha256"]
    assert Path(meta["tokenizer"]["path"]) == (tmp_path / "ck" / "tokenizer" / "a1b2_tokenizer.model").resolve()
    _close(load_model(tmp_path / "ck")(_ids())[..., :REAL_VOCAB], expected)


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize("member,why", [
    (_member("/tmp/evil.txt"), "absolute path"), (_member("model_weights/../../evil.txt"), "'..'"),
    (_member("model_weights/link", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member("model_weights/hard", tarfile.LNKTYPE, link="model_config.yaml"), "is a link"),
    (_member("model_weights/dev", tarfile.CHRTYPE), "device"), (_member("model_weights/fifo", tarfile.FIFOTYPE),
                                                                "device")])
def test_unsafe_nemo_members_are_refused(tmp_path: Path, capsys, member: tarfile.TarInfo, why: str) -> None:
    packed = tmp_path / "packed"
    (packed / "model_weights").mkdir(parents=True)
    (packed / "model_config.yaml").write_text(_nemo_config())
    nemo = _tar(tmp_path / "bad.nemo", packed, [member])
    assert main(["from-nemo", str(nemo), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("checkpoint error:") and why in err and "refused" in err and "\n" not in err
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("key,value", [("swiglu", True), ("group_query_attention", True),
                                       ("position_embedding_type", "rope"), ("normalization", "RMSNorm"),
                                       ("add_bias_linear", False)])
def test_architectures_mtlm_lacks_are_refused(tmp_path: Path, capsys, key: str, value) -> None:
    ours = random_mtlm_gpt("gelu_tanh", 1e-5)
    model = {"_target_": "mtlm.model.gpt.GPT", "name": "t", "num_layers": LAYERS, "hidden_size": HIDDEN,
             "num_attention_heads": HEADS, "seq_length": POSITIONS, "max_position_embeddings": POSITIONS,
             "vocab_size": 384, "make_vocab_size_divisible_by": 128, "dropout": 0.0, "init_std": 0.02,
             "layernorm_eps": 1e-5, "activation": "gelu_tanh", "layernorm_order": "pre"}
    write_checkpoint(tmp_path / "ck", model, {n: p.detach() for n, p in ours.named_parameters()}, 1, {"test": "t"})
    assert main(["to-mcore", str(tmp_path / "ck"), str(tmp_path / "mc")]) == 0
    common = tmp_path / "mc" / "release" / "common.pt"
    saved = torch.load(common, weights_only=False)
    setattr(saved["args"], key, value)
    torch.save(saved, common)
    assert main(["from-mcore", str(tmp_path / "mc"), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("checkpoint error:") and f"args.{key}=" in err
    assert "cannot represent" in err or "needs" in err


def test_tokenizer_travels_through_to_mcore_and_back(tmp_path: Path, capsys) -> None:
    """to-mcore copies the checkpoint's tokenizer beside the files and names it in args, as to-megatron does;
    from-mcore records it again (the same file, by content), even after the folder moved."""
    from tests.eval_helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path)
    meta_before = read_metadata(ckpt / "step_00000007")
    assert main(["to-mcore", str(ckpt), str(tmp_path / "mc")]) == 0
    moved = tmp_path / "moved"
    (tmp_path / "mc").rename(moved)
    capsys.readouterr()
    assert main(["from-mcore", str(moved), str(tmp_path / "back")]) == 0
    assert "note:" not in capsys.readouterr().err
    meta = read_metadata(tmp_path / "back" / "step_00000000")
    assert meta["tokenizer"]["sha256"] == meta_before["tokenizer"]["sha256"]
    assert meta["tokenizer"]["path"] == str(moved / "tokenizer" / "tok.model")
    assert meta["model"]["vocab_size"] == meta_before["model"]["vocab_size"]


def test_per_rank_torch_format_in_bf16(monkeypatch, tmp_path: Path) -> None:
    """--ckpt-format torch with --bf16: one mp_rank_00 file of megatron-core names in bfloat16 imports as fp32
    (the exact upcast), mtlm's checkpoint dtype."""
    with mcore_world(monkeypatch):
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, PADDED, POSITIONS)
        _randomise(theirs)
        state = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in
                 theirs.state_dict().items()}
    rank = tmp_path / "run" / "iter_0000003" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"model": state, "args": _args(vocab_size=None, params_dtype=torch.bfloat16), "iteration": 3},
               rank / "model_optim_rng.pt")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("3")
    assert main(["from-mcore", str(tmp_path / "run"), str(tmp_path / "ck")]) == 0
    _, full = read_checkpoint(tmp_path / "ck")
    assert all(t.dtype == torch.float32 for t in full.values())
    qkv = state["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert torch.equal(full["blocks.1.attn.qkv.weight"], qkv.float())
    assert torch.equal(full["wte.weight"], state["embedding.word_embeddings.weight"].float())


@pytest.mark.parametrize("binary_head", [True, False])
def test_megatron_core_bert_imports_to_its_logits(monkeypatch, tmp_path: Path, capsys, binary_head: bool) -> None:
    ids = _ids()
    types = (torch.arange(POSITIONS) >= POSITIONS // 2).long().expand(2, -1)
    mask = torch.ones(2, POSITIONS, dtype=torch.long)
    mask[1, -5:] = 0  # padding in the second sample
    with mcore_world(monkeypatch):
        theirs = mcore_bert(LAYERS, HIDDEN, HEADS, PADDED, POSITIONS, binary_head=binary_head)
        _randomise(theirs)
        dist_checkpointing.save({"model": theirs.sharded_state_dict(), "iteration": 2,
                                 "args": _args(bias_gelu_fusion=False, bert_binary_head=binary_head,
                                               num_tokentypes=2)}, str(tmp_path))
        with torch.no_grad():
            out = theirs(ids, mask, tokentype_ids=types)
    mlm_theirs, sop_theirs = out if isinstance(out, tuple) else (out, None)
    assert main(["from-mcore", str(tmp_path), str(tmp_path / "ck"), "--tensor", "2"]) == 0
    assert ("no binary head" in capsys.readouterr().err) != binary_head
    meta = read_metadata(tmp_path / "ck" / "step_00000000")
    assert meta["model"]["_target_"] == "mtlm.model.bert.BERT" and meta["model"]["activation"] == "gelu"
    mlm, sop = load_model(tmp_path / "ck")(ids, types, mask)
    # Padded positions' outputs differ by design and are never used: megatron-core masks padded queries as
    # well as keys (their attention is uniform), mtlm and transformers mask the keys only.
    real = mask.bool()
    _close(mlm[real][..., :REAL_VOCAB], mlm_theirs[real][..., :REAL_VOCAB])
    if binary_head:
        torch.testing.assert_close(sop, sop_theirs, rtol=1e-5, atol=1e-5 * mlm_theirs.abs().max().item())
    else:
        assert not sop.any()


def test_bert_with_tanh_layers_is_refused(monkeypatch, tmp_path: Path, capsys) -> None:
    """megatron-core's BERT LM head is always the exact GeLU: with tanh layers mtlm's BERT is another model."""
    with mcore_world(monkeypatch):
        theirs = mcore_bert(LAYERS, HIDDEN, HEADS, PADDED, POSITIONS, activation="gelu_tanh")
        dist_checkpointing.save({"model": theirs.sharded_state_dict(), "args": _args(bias_gelu_fusion=True)},
                                str(tmp_path))
    assert main(["from-mcore", str(tmp_path), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: megatron-core's own config warnings)
    assert err.startswith("checkpoint error:") and "one GeLU for both" in err
