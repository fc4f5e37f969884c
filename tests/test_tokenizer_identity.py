"""Issue 25: a tokenizer that is not the checkpoint's, but of the same size, was accepted (mtlm.evaluate reported
perplexity 17,095 instead of 140, exit 0). A checkpoint records its tokenizer's identity (type + content hash)
and every tool that takes a tokenizer refuses another one, in one line naming both, with exit status 2."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from mtlm.checkpoint.format import find_checkpoint
from mtlm.data import DataError
from mtlm.data.text_tokenizer import check_same_tokenizer, content_hash
from mtlm.data.tokenizer import Tokenizer, train_tokenizer
from mtlm.eval.config import register_eval_configs
from mtlm.eval.loading import load_tokenizer, read_checkpoint
from tests.compose import CONF
from tests.eval_helpers import TEXT, make_checkpoint

OTHER_TEXT = ("Sphinx of black quartz, judge my vow. Pack my box with five dozen liquor jugs! "
              "How vexingly quick daft zebras jump; 42 wizards box 7 jolly kangaroos.\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint trained with tok.model, and other.model: another sentencepiece model of the same size."""
    root = tmp_path_factory.mktemp("identity")
    ckpt = make_checkpoint(root)
    mine = Tokenizer(str(root / "tok.model"))
    other = train_tokenizer([OTHER_TEXT * 3 + TEXT], str(root / "other.model"), mine.vocab_size)
    assert other.vocab_size == mine.vocab_size  # the case a size check cannot see
    return root, ckpt, mine, other


def _app(name: str, *overrides: str):
    register_eval_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        return compose(config_name=name, overrides=list(overrides))


def _exit_line(run, cfg, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run(cfg, None)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_identity_is_the_content_not_the_path(setup, tmp_path):
    root, _, mine, other = setup
    copy = tmp_path / "copy.model"
    shutil.copy(mine.path, copy)
    entry = mine.entry()
    assert entry["sha256"] == Tokenizer(str(copy)).entry()["sha256"] == content_hash("sentencepiece", [mine.path])
    assert entry["sha256"] != other.entry()["sha256"]
    assert check_same_tokenizer(entry, Tokenizer(str(copy)), "ckpt") is None
    with pytest.raises(DataError, match=r"other\.model .* is not the tokenizer ckpt was trained with, "
                                        r"sentencepiece .*tok\.model"):
        check_same_tokenizer(entry, other, "ckpt")


def test_evaluate_and_generate_refuse_a_same_size_tokenizer(setup, capsys):
    """As the user ran them: `python -m mtlm.evaluate ... data.tokenizer.model=other.model` (and generate)."""
    from mtlm.evaluate import run as evaluate
    from mtlm.generate import run as generate

    root, ckpt, mine, other = setup
    (root / "wiki.test.raw").write_text(" = A = \n The quick brown fox . \n" * 4, encoding="utf-8")
    for run, cfg in (
        (evaluate, _app("evaluate", "task=wikitext", f"data.path={root / 'wiki.test.raw'}", f"checkpoint.dir={ckpt}",
                        f"data.tokenizer.model={other.path}", "logger=none")),
        (generate, _app("generate", f"checkpoint.dir={ckpt}", "prompt=The quick",
                        f"data.tokenizer.model={other.path}")),
    ):
        err = _exit_line(run, cfg, capsys)
        assert err.startswith("data error: data.tokenizer: sentencepiece ") and other.path in err and mine.path in err
        assert "data.tokenizer.allow_mismatch=true" in err


def test_allow_mismatch_is_the_deliberate_override(setup, capsys):
    from mtlm.generate import prepare_job

    root, ckpt, mine, other = setup
    job = prepare_job(_app("generate", f"checkpoint.dir={ckpt}", "prompt=The quick",
                           f"data.tokenizer.model={other.path}", "data.tokenizer.allow_mismatch=true"))
    assert job["tokenizer"]["path"] == other.path and job["ids"] == [other.encode("The quick")]
    err = capsys.readouterr().err
    assert err.startswith("note: data.tokenizer: ") and "used anyway (data.tokenizer.allow_mismatch=true)" in err


def test_checkpoints_without_an_identity_still_load(setup, capsys):
    """Saved before this change: the entry has no sha256. It loads, with a note saying only the size is checked."""
    _, ckpt, mine, _ = setup
    step_dir, meta = read_checkpoint(ckpt)
    legacy = {**meta, "tokenizer": {k: v for k, v in meta["tokenizer"].items() if k != "sha256"}}
    none = SimpleNamespace(type=None, model=None, vocab_file=None, merge_file=None)
    assert load_tokenizer(legacy, none, step_dir).encode(TEXT) == mine.encode(TEXT)
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "records no tokenizer identity" in err and err.count("\n") == 1


def test_a_changed_tokenizer_file_is_refused(setup, tmp_path, capsys):
    """The recorded path now holds another model (e.g. a cache rebuilt): refused, not silently used."""
    root, ckpt, mine, other = setup
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    step = find_checkpoint(moved)
    meta = json.loads((step / "metadata.json").read_text())
    meta["tokenizer"]["path"] = str(tmp_path / "swapped.model")
    (step / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(other.path, tmp_path / "swapped.model")
    step_dir, meta = read_checkpoint(moved)
    with pytest.raises(DataError, match="is not the tokenizer .* was trained with"):
        load_tokenizer(meta, None, step_dir)


def test_lm_eval_adapter_refuses_it(setup):
    pytest.importorskip("lm_eval")
    from mtlm.eval.harness import MtlmLM

    _, ckpt, mine, other = setup
    with pytest.raises(DataError, match="is not the tokenizer"):
        MtlmLM(str(ckpt), tokenizer=other.path)
    assert MtlmLM(str(ckpt), tokenizer=other.path, allow_tokenizer_mismatch="true").tokenizer.path == other.path


def test_train_resume_refuses_it_before_launch(setup, tmp_path, monkeypatch, capsys):
    """`python train.py checkpoint.resume=CKPT data.tokenizer.model=other.model`: one line, exit 2, no rank."""
    from mtlm.run import run
    from tests.compose import compose_config

    root, ckpt, mine, other = setup
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "cache"))
    shape = ("model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
             "model.max_position_embeddings=64", f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.resume={ckpt}")
    cfg = compose_config(*shape, f"data.tokenizer.model={other.path}")
    err = _exit_line(run, cfg, capsys)
    assert err.startswith("data error: data.tokenizer: ") and other.path in err and mine.path in err


# ---- the tokenizer across a Megatron-LM round trip (issue 25) ----------------------------------------------


def test_megatron_round_trip_keeps_a_sentencepiece_tokenizer(setup, tmp_path, capsys):
    """`to-megatron` then `from-megatron` of a sentencepiece model gave a checkpoint with no tokenizer. The export
    holds the file in tokenizer/ and names it in args as Megatron-LM does; the import reads it back, even after
    the export folder moved."""
    from mtlm.convert import main
    from mtlm.convert.pickles import safe_load

    _, ckpt, mine, _ = setup
    meg = tmp_path / "megatron" / "tiny"
    assert main(["to-megatron", str(ckpt), str(meg), "--tensor", "2"]) == 0
    args = safe_load(meg / "release" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    assert args.tokenizer_type == "SentencePieceTokenizer"
    assert args.tokenizer_model == str((meg / "tokenizer" / "tok.model").resolve())
    moved = tmp_path / "elsewhere"
    shutil.move(meg, moved)  # args' absolute path is gone now: found beside the checkpoint instead
    capsys.readouterr()
    assert main(["from-megatron", str(moved), str(tmp_path / "back")]) == 0
    assert "note:" not in capsys.readouterr().err
    step_dir, meta = read_checkpoint(tmp_path / "back")
    assert meta["tokenizer"]["type"] == "sentencepiece"
    assert meta["tokenizer"]["path"] == str(moved / "tokenizer" / "tok.model")
    assert meta["tokenizer"]["sha256"] == mine.entry()["sha256"]  # the same tokenizer, by identity
    assert load_tokenizer(meta, None, step_dir).encode(TEXT) == mine.encode(TEXT)


def test_megatron_args_naming_missing_files_is_a_note(setup, tmp_path, capsys):
    """A Megatron checkpoint whose args name a tokenizer that is not on this machine (NVIDIA's paths): imported
    without one, said in one line naming the flags; evaluating it then lists every tokenizer type's keys."""
    from mtlm.convert import main

    _, ckpt, _, _ = setup
    meg = tmp_path / "meg"
    assert main(["to-megatron", str(ckpt), str(meg)]) == 0
    shutil.rmtree(meg / "tokenizer")
    capsys.readouterr()
    assert main(["from-megatron", str(meg), str(tmp_path / "back")]) == 0
    err = capsys.readouterr().err
    assert "args name a SentencePieceTokenizer tokenizer (tokenizer_model=" in err and "--tokenizer-file" in err
    step_dir, meta = read_checkpoint(tmp_path / "back")
    assert meta.get("tokenizer") is None
    with pytest.raises(DataError, match="records no tokenizer") as info:
        load_tokenizer(meta, None, step_dir)
    for key in ("data.tokenizer.model=FILE.model", "type=gpt2", "type=wordpiece", "type=tokenizer.json"):
        assert key in str(info.value)
