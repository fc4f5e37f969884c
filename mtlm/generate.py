"""Generate text from a checkpoint, at any tensor degree, with a KV cache.

    python -m mtlm.generate checkpoint.dir=checkpoints/x prompt="The meaning of" generate.temperature=0
    python -m mtlm.generate checkpoint.dir=DIR prompts_file=prompts.txt generate.top_p=0.9 generate.seed=7
    python -m mtlm.generate checkpoint.dir=DIR prompt="..." parallel.tensor=2

Temperature 0 is greedy; otherwise tokens are sampled (top_k / top_p filtered) from a generator seeded by
generate.seed. Generation stops at the end-of-document token, after generate.max_new_tokens, or at the end of
the model's positions. Each prompt and its continuation go to stdout and to generations.jsonl in the output dir.
"""

from __future__ import annotations

import json
import os
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtlm.data.text_tokenizer import tokenizer_from_entry
from mtlm.errors import ConfigError
from mtlm.eval.app import (
    BAD_INPUT,
    check_heads,
    check_overrides,
    exit_bad_input,
    rank_model,
    remove_unused_run_dir,
)
from mtlm.eval.config import GenerateConfig, register_eval_configs, validate_generate
from mtlm.eval.generation import Sampling, generate
from mtlm.eval.loading import autocast, load_tokenizer, read_checkpoint
from mtlm.eval.tasks import read_text
from mtlm.parallel.denormals import flush_denormals
from mtlm.parallel.launch import RankEnv, launch
from mtlm.rank_env import env_world_size

register_eval_configs()


def _worker(env: RankEnv, cfg_dict: dict, job: dict, out_dir: str | None) -> None:
    with rank_model(env, cfg_dict, "generate", job["step_dir"]) as (cfg, state, model):
        g = cfg.generate
        tok = tokenizer_from_entry(job["tokenizer"])
        sampling = Sampling(g.temperature, g.top_k, g.top_p)
        rows = []
        for i, (prompt, ids) in enumerate(zip(job["prompts"], job["ids"], strict=True)):
            new = generate(model, ids, g.max_new_tokens, sampling, g.seed + i, tok.eos_id, g.kv_cache,
                           lambda: autocast(cfg.precision.dtype, state.device))
            rows.append({"prompt": prompt, "completion": tok.decode(new), "tokens": new})
            if state.is_main:
                print(prompt + rows[-1]["completion"] + "\n" + "-" * 40, flush=True)
        if state.is_main and out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "generations.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            print(f"wrote {path}", flush=True)  # as mtlm.evaluate says where eval.json went


def prepare_job(cfg: Any) -> dict[str, Any]:
    """Checkpoint, tokenizer and prompts checked in the launching process: one line before any spawn."""
    step_dir, meta = read_checkpoint(cfg.checkpoint.dir)
    model = meta["model"]
    check_heads(model, cfg.parallel.tensor)
    tok = load_tokenizer(meta, cfg.data.tokenizer, step_dir)
    if cfg.prompt is not None:
        lines, key = [(0, cfg.prompt)], "prompt"
    else:
        text = read_text(cfg.prompts_file, "prompts_file")
        lines, key = [(n, p) for n, p in enumerate(text.splitlines(), 1) if p.strip()], "prompts_file"
        if not lines:
            raise ConfigError("prompts_file", f"{cfg.prompts_file} holds no prompt")
    prompts = [p for _, p in lines]
    ids = [tok.encode(p) for p in prompts]
    context = model["max_position_embeddings"]
    for (n, _), i in zip(lines, ids, strict=True):
        where = "" if key == "prompt" else f" (line {n})"
        if not i:
            raise ConfigError(key, f"an empty prompt{where}: give some text to continue")
        if len(i) >= context:
            raise ConfigError(key, f"the prompt{where} is {len(i)} tokens, longer than the model's context of "
                              f"{context} positions allows (at most {context - 1}); shorten it")
    return {"step_dir": str(step_dir), "tokenizer": tok.entry(), "prompts": prompts, "ids": ids}


def run(cfg: DictConfig, out_dir: str | None) -> None:
    flush_denormals()  # before any torch op starts the thread pool (mtlm/parallel/denormals.py)
    try:
        validate_generate(cfg, env_world_size())
        job = prepare_job(cfg)
    except BAD_INPUT as err:
        exit_bad_input(err, out_dir)
    try:
        launch(_worker, cfg.parallel.tensor, (OmegaConf.to_container(cfg, resolve=True), job, out_dir))
    except BaseException:
        remove_unused_run_dir(out_dir)  # a rank failed before writing any result
        raise


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run(cfg, hydra_cfg.runtime.output_dir if hydra_cfg.output_subdir is not None else None)


if __name__ == "__main__":
    check_overrides("generate", validate_generate, GenerateConfig)
    main()
