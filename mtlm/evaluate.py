"""Zero-shot evaluation as in the paper's Table 3, at any tensor degree.

    python -m mtlm.evaluate task=wikitext data.path=wikitext-103-raw/wiki.test.raw checkpoint.dir=checkpoints/x
    python -m mtlm.evaluate task=lambada data.path=lambada_test.jsonl checkpoint.dir=DIR parallel.tensor=2

WikiText-103: token perplexity and the adjusted one (normalised by WikiText's own word count) over
overlapping windows; LAMBADA: strict accuracy (the whole last word), last-token accuracy, last-word perplexity.
Results: stdout, eval.json in the output dir, and W&B (logger=none to skip it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtlm.errors import ConfigError
from mtlm.eval.app import (
    BAD_INPUT,
    check_heads,
    check_overrides,
    exit_bad_input,
    rank_model,
    remove_unused_run_dir,
)
from mtlm.eval.config import EvaluateConfig, register_eval_configs, validate_evaluate
from mtlm.eval.loading import autocast, load_tokenizer, read_checkpoint
from mtlm.eval.tasks import evaluate_lambada, evaluate_wikitext, prepare
from mtlm.metrics.sinks import WandbSink
from mtlm.parallel.denormals import flush_denormals
from mtlm.parallel.launch import RankEnv, launch
from mtlm.rank_env import env_world_size

register_eval_configs()


def _worker(env: RankEnv, cfg_dict: dict, job: dict, out_dir: str | None) -> None:
    with rank_model(env, cfg_dict, "eval", job["step_dir"]) as (cfg, state, model):
        e = cfg.eval
        cast = lambda: autocast(cfg.precision.dtype, state.device)
        if cfg.task == "wikitext":
            result = evaluate_wikitext(model, job["ids"], job["num_original_tokens"], job["seq_length"], e.overlap,
                                       e.batch_size, cast)
        else:
            result = evaluate_lambada(model, job["strict"], job["last_token"], job["seq_length"], e.batch_size,
                                      cast)
        if state.is_main:
            report(cfg, {**result, **job["about"]}, out_dir)


def report(cfg: Any, result: dict[str, Any], out_dir: str | None) -> None:
    """stdout, eval.json and (logger.name=wandb) a W&B run whose summary holds the results."""
    print(json.dumps(result, indent=1), flush=True)
    if out_dir is None:
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "eval.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if cfg.logger.name == "wandb":
        sink = WandbSink(cfg.logger, OmegaConf.to_container(cfg, resolve=True), out_dir)
        sink.summary({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        sink.close("ok")
    print(f"wrote {path}", flush=True)


def prepare_job(cfg: Any) -> dict[str, Any]:
    """Everything checked and tokenized in the launching process: bad input is one line before any spawn."""
    step_dir, meta = read_checkpoint(cfg.checkpoint.dir)
    model = meta["model"]
    seq_length = cfg.eval.seq_length or model["seq_length"]
    if seq_length > model["max_position_embeddings"]:
        raise ConfigError("eval.seq_length", f"{seq_length} exceeds the model's {model['max_position_embeddings']} "
                          "positions")
    if cfg.eval.overlap > seq_length:
        raise ConfigError("eval.overlap", f"{cfg.eval.overlap} exceeds the window of {seq_length} tokens")
    check_heads(model, cfg.parallel.tensor)
    tok = load_tokenizer(meta, cfg.data.tokenizer, step_dir)
    job = prepare(cfg.task, cfg.data.path, cfg.data.text_key, tok.encode)
    about = {"task": cfg.task, "data": os.path.abspath(os.path.expanduser(cfg.data.path)),
             "checkpoint": str(step_dir.resolve()), "step": meta["step"], "tensor": cfg.parallel.tensor,
             "tokenizer": tok.entry(), "seq_length": seq_length, "precision": cfg.precision.dtype}
    if cfg.task == "wikitext":
        about["overlap"] = cfg.eval.overlap
    return {**job, "step_dir": str(step_dir), "seq_length": seq_length, "about": about}


def run(cfg: DictConfig, out_dir: str | None) -> None:
    flush_denormals()  # before any torch op starts the thread pool (mtlm/parallel/denormals.py)
    try:
        validate_evaluate(cfg, env_world_size())
        job = prepare_job(cfg)
    except BAD_INPUT as err:
        exit_bad_input(err, out_dir)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    try:
        launch(_worker, cfg.parallel.tensor, (cfg_dict, job, out_dir))
    except BaseException:
        remove_unused_run_dir(out_dir)  # a rank failed before writing any result
        raise


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run(cfg, hydra_cfg.runtime.output_dir if hydra_cfg.output_subdir is not None else None)


if __name__ == "__main__":
    check_overrides("evaluate", validate_evaluate, EvaluateConfig)
    main()
