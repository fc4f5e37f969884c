"""The lm-evaluation-harness adapter (issue 13): its log-likelihoods against mtlm's own evaluation, an
lm-eval run on a local task this test writes (no hub downloads), and the hook that lets `lm_eval --model mtlm`
find the adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from mtlm.api import load_model  # noqa: E402
from mtlm.eval.generation import Sampling, generate  # noqa: E402
from mtlm.eval.harness import MtlmLM, install_hook  # noqa: E402
from mtlm.eval.scoring import score_continuations, score_stream  # noqa: E402
from tests.eval_helpers import make_checkpoint  # noqa: E402

DOCS = [{"context": "Return the value", "continuation": " of the variable", "text": "The quick brown fox jumps."},
        {"context": "A layer splits its", "continuation": " weight by columns",
         "text": "Valkyria Chronicles III is a tactical role-playing game; it sold 1,000 copies in 2011."}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    return MtlmLM(checkpoint=str(make_checkpoint(root)), batch_size=2), root


def _req(kind, args):
    return Instance(kind, {}, args, 0)


def test_loglikelihoods_equal_mtlm_evaluation(lm):
    lm, _ = lm
    tok, model = lm.tokenizer, lm.model
    got = lm.loglikelihood([_req("loglikelihood", (d["context"], d["continuation"])) for d in DOCS])
    pairs = [(tok.encode(d["context"]), tok.encode(d["continuation"])) for d in DOCS]
    ours = score_continuations(model, pairs, lm.max_length)
    plain = load_model(lm.tokenizer.path.replace("tok.model", "ckpt"))
    for (logprob, greedy), mine, (ctx, cont) in zip(got, ours, pairs, strict=True):
        assert len(ctx) + len(cont) <= lm.max_length + 1  # whole: no context cut off
        assert logprob == pytest.approx(mine.logprob, rel=1e-5) and greedy == mine.greedy
        with torch.no_grad():  # independently: the plain degree-1 model's logits
            logp = F.log_softmax(plain(torch.tensor([ctx + cont[:-1]]))[0].double(), -1)[len(ctx) - 1:]
        assert logprob == pytest.approx(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), rel=1e-5)
    # a trailing space of the context moves to the continuation; an empty context is the start of a document
    moved = lm.loglikelihood([_req("loglikelihood", ("Return the value ", "of the variable")),
                              _req("loglikelihood", ("", "Return"))])
    assert moved[0][0] == pytest.approx(got[0][0], rel=1e-6)
    start = score_continuations(model, [([tok.eos_id], tok.encode("Return"))], lm.max_length)[0]
    assert moved[1][0] == pytest.approx(start.logprob, rel=1e-6)

    text = DOCS[1]["text"] * 3  # longer than one 32-token window: rolling windows
    rolling = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])[0]
    loss_sum, n = score_stream(model, [tok.eos_id] + tok.encode(text), lm.max_length, lm.max_length)
    assert n > lm.max_length and rolling == pytest.approx(-loss_sum, rel=1e-5)


def _write_task(root, kind: str, extra: str) -> None:
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (root / f"mtlm_{kind}.yaml").write_text(
        f"task: mtlm_{kind}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{extra}", encoding="utf-8")


def test_lm_eval_runs_a_local_task(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = lm
    _write_task(tmp_path, "ll", 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
                'doc_to_target: "{{continuation}}"\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n')
    _write_task(tmp_path, "rolling", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    _write_task(tmp_path, "gen", 'output_type: generate_until\ndoc_to_text: "{{context}}"\n'
                'doc_to_target: "{{continuation}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n'
                'metric_list:\n  - metric: exact_match\n')
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    # Seconds this test does not need: torch's collect_env subprocesses, and indexing lm-eval's ~14k task files.
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, tasks=["mtlm_ll", "mtlm_rolling", "mtlm_gen"], task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0)
    res = out["results"]
    ll = model.loglikelihood([_req("loglikelihood", (d["context"], d["continuation"])) for d in DOCS])
    assert res["mtlm_ll"]["acc,none"] == pytest.approx(sum(g for _, g in ll) / len(DOCS))
    assert res["mtlm_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(lp for lp, _ in ll) / len(DOCS)),
                                                              rel=1e-5)
    rolled = model.loglikelihood_rolling([_req("loglikelihood_rolling", (d["text"],)) for d in DOCS])
    words = sum(len(d["text"].split()) for d in DOCS)  # lm-eval's word count (whitespace split)
    assert res["mtlm_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(rolled) / words), rel=1e-5)
    tok = model.tokenizer
    for sample in out["samples"]["mtlm_gen"]:
        ids = tok.encode(sample["doc"]["context"])
        text = tok.decode(generate(model.model, ids, 6, Sampling(0.0), eod_id=tok.eos_id))
        assert sample["resps"][0][0] == text.split(".")[0]  # greedy, cut at the stop string


def test_plain_lm_eval_command_finds_mtlm_through_the_hook(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    pth = install_hook(str(site_dir))
    assert open(pth, encoding="utf-8").read().startswith("import mtlm.eval.lm_eval_hook")
    code = ("import site, sys; site.addsitedir(sys.argv[1]); heavy = 'torch' in sys.modules; "
            "from lm_eval.api.registry import get_model; cls = get_model('mtlm'); "
            "print(heavy, cls.__module__, cls.__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(site_dir)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "mtlm.eval.harness", "MtlmLM"]  # no torch until mtlm is asked for


# ---- failures are one line (issue 25: a wrong path and an offline task were long tracebacks) ------------------


def test_wrong_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from mtlm.eval.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no Hub probe in this process
    with pytest.raises(SystemExit) as info:
        main(["--model", "mtlm", "--model_args", f"checkpoint={tmp_path / 'nope'},dtype=fp32", "--tasks", "x"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"checkpoint error: {tmp_path / 'nope'}: no checkpoint there\n"


def test_hub_probe_gives_up_quickly(monkeypatch):
    import time

    from mtlm.eval.__main__ import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens on 443 here
    start = time.monotonic()
    assert hub_reachable(timeout=2.0) is False and time.monotonic() - start < 3.0


@pytest.mark.slow
def test_a_task_whose_data_is_not_cached_fails_in_one_line_when_offline(lm, tmp_path):
    """lambada_openai's data is on the Hub. Offline (set here; found by the probe on a machine without network),
    with an empty datasets cache, it stops at once in one line naming what to do, not after ~40 s of retries."""
    ckpt = lm[1] / "ckpt"
    cache = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "HF_DATASETS_CACHE": str(cache / "ds"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mtlm.eval", "--model", "mtlm", "--model_args", f"checkpoint={ckpt}",
                        "--device", "cpu", "--tasks", "lambada_openai", "--limit", "2"], capture_output=True,
                       text=True, env=env, timeout=180)
    assert r.returncode == 2, r.stderr
    ours = [line for line in r.stderr.splitlines() if not line[:4].isdigit()]  # lm-eval's own dated log lines
    assert len(ours) == 1 and ours[0].startswith("lm-eval error: a task's data could not be fetched (offline: ")
    assert "--include_path DIR --tasks NAME" in ours[0] and "Traceback" not in r.stderr


def test_docs_local_task_file_runs(lm, tmp_path, monkeypatch):
    """docs/evaluation.md's local task file, as written there, runs offline with the command written there."""
    import re
    from pathlib import Path

    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    page = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    task_yaml = re.search(r"```yaml\n(# (\S+);.*?)```", page, re.S)
    command = re.search(r"^python -m mtlm\.eval .*--include_path (\S+) --tasks (\S+)$", page, re.M)
    assert task_yaml and command
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yaml_path = tmp_path / task_yaml.group(2)
    yaml_path.parent.mkdir(parents=True)
    yaml_path.write_text(task_yaml.group(1), encoding="utf-8")
    assert yaml_path.parent.name == command.group(1)
    data = re.search(r"test: (\S+)", task_yaml.group(1)).group(1)
    (tmp_path / data).write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    tasks = TaskManager(include_path=command.group(1), include_defaults=False)
    model, _ = lm
    out = lm_eval.simple_evaluate(model=model, tasks=[command.group(2)], task_manager=tasks, bootstrap_iters=0)
    ll = model.loglikelihood([_req("loglikelihood", (d["context"], d["continuation"])) for d in DOCS])
    assert out["results"][command.group(2)]["acc,none"] == pytest.approx(sum(g for _, g in ll) / len(DOCS))
