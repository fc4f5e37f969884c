"""`python -m mtlm.evaluate` and `python -m mtlm.generate` as a user runs them (issue 13): results on stdout,
in eval.json / generations.jsonl and W&B, tensor degree 2 spawned by the app itself, and bad input as one
line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlm.eval.generation import Sampling, generate
from mtlm.eval.loading import load_gpt, load_tokenizer, read_checkpoint
from mtlm.eval.tasks import evaluate_wikitext, prepare
from mtlm.parallel.state import ParallelState
from tests.eval_helpers import make_checkpoint

pytestmark = pytest.mark.slow

RAW = (" \n = Valkyria Chronicles = \n \n The game 's story , set in 1 @,@ 935 , follows a squad ( Squad 7 ) . "
       "It sold 3 @.@ 5 million copies . \n \n = = Gameplay = = \n \n The players ' units move on a map . \n") * 4


def _run(module: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=180)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "wiki.test.raw").write_text(RAW, encoding="utf-8")
    return root, make_checkpoint(root)


def test_evaluate_wikitext_at_tensor_degree_2(setup):
    root, ckpt = setup
    out = root / "out_wiki"
    r = _run("mtlm.evaluate", root, "task=wikitext", "data.path=wiki.test.raw", f"checkpoint.dir={ckpt}",
             "parallel.tensor=2", "eval.overlap=8", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "eval.json").read_text())
    assert {"ppl", "adjusted_ppl", "num_tokens", "num_original_tokens", "checkpoint", "tensor", "tokenizer"} \
        <= set(result)
    assert result["tensor"] == 2 and result["checkpoint"] == str((ckpt / "step_00000007").resolve())
    assert f'"adjusted_ppl": {result["adjusted_ppl"]}' in r.stdout
    assert list((out / "wandb").glob("offline-run-*")), "no W&B run"
    step_dir, meta = read_checkpoint(ckpt)  # the same evaluation in this process, at degree 1
    job = prepare("wikitext", str(root / "wiki.test.raw"), "text", load_tokenizer(meta, None, step_dir).encode)
    one = evaluate_wikitext(load_gpt(step_dir, meta, ParallelState()), job["ids"], job["num_original_tokens"],
                            32, 8, 8)
    assert result["num_tokens"] == one["num_tokens"] and result["num_original_tokens"] == RAW.strip().count(" ") + 1
    assert result["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert result["adjusted_ppl"] == pytest.approx(one["adjusted_ppl"], rel=1e-5)


def test_evaluate_lambada_and_generate(setup):
    root, ckpt = setup
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The quick brown fox jumps over the lazy dog", "Return the value of the variable")), encoding="utf-8")
    r = _run("mtlm.evaluate", root, "task=lambada", "data.path=lambada.jsonl", f"checkpoint.dir={ckpt}",
             "logger=none", f"hydra.run.dir={root / 'out_lambada'}")
    assert r.returncode == 0, r.stderr
    result = json.loads((root / "out_lambada" / "eval.json").read_text())
    assert result["num_examples"] == 2 and 0 <= result["accuracy_strict"] <= result["accuracy"] <= 1

    r = _run("mtlm.generate", root, f"checkpoint.dir={ckpt}", "prompt=Return the", "generate.temperature=0",
             "generate.max_new_tokens=12", f"hydra.run.dir={root / 'out_gen'}")
    assert r.returncode == 0, r.stderr
    row = json.loads((root / "out_gen" / "generations.jsonl").read_text())
    step_dir, meta = read_checkpoint(ckpt)
    tok = load_tokenizer(meta, None, step_dir)
    expected = generate(load_gpt(step_dir, meta, ParallelState()), tok.encode("Return the"), 12, Sampling(0.0),
                        eod_id=tok.eos_id)
    assert row["tokens"] == expected and row["completion"] == tok.decode(expected)
    assert r.stdout.startswith("Return the" + row["completion"])


def test_bad_input_exits_2_with_one_line(setup, capsys):
    root, ckpt = setup
    (root / "latin1.raw").write_bytes("caf\xe9 au lait".encode("latin-1"))
    r = _run("mtlm.evaluate", root, "task=wikitext", "data.path=latin1.raw", f"checkpoint.dir={ckpt}", "logger=none")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("data error: data.path: ") and "is not UTF-8" in r.stderr
    # the same path (prepare_job raising, run() printing one line and exiting 2) for a prompt too long, in-process
    from hydra import compose, initialize_config_dir

    from mtlm.eval.config import register_eval_configs
    from mtlm.generate import run
    from tests.compose import CONF

    (root / "long.txt").write_text("word " * 80 + "\n", encoding="utf-8")
    register_eval_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        cfg = compose(config_name="generate", overrides=[f"checkpoint.dir={ckpt}", f"prompts_file={root / 'long.txt'}"])
    with pytest.raises(SystemExit) as exit_info:
        run(cfg, None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: prompts_file: the prompt (line 1) is ") \
        and "longer than the model's context" in err, err
