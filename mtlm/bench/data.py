"""Data-pipeline throughput: preprocessing (MB/s of text, 1 and 2 workers, both tokenizers) and batch assembly from
token files against what a gpt2_tiny training step consumes.

    python -m mtlm.bench.data                 # 16 MB of text, both tokenizers, workers 1 and 2
    python -m mtlm.bench.data --mb 4 --workers 1 2 4

The text is the built-in corpus (pydoc_data's topics) repeated up to --mb. No GPT-2 vocab.json can be downloaded
here, so the GPT-2 side is a byte-level BPE trained here with `tokenizers` to GPT-2's size on that text (as many
merges as it yields), saved as a vocab.json + merges.txt pair and loaded like NVIDIA's files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Only torch-free imports at the top: the preprocessing workers (spawned) import this module again as __main__.
from mtlm.config import CONF_DIR, register_configs
from mtlm.data.corpus import default_documents
from mtlm.data.indexed import IndexedDataset
from mtlm.data.preprocess import preprocess
from mtlm.data.text_tokenizer import TokenizerSpec, load_tokenizer
from mtlm.data.tokenizer import train_tokenizer


def write_corpus(folder: Path, megabytes: float) -> tuple[Path, int]:
    """A .jsonl of the built-in documents repeated to `megabytes` of text; (path, text bytes)."""
    docs, path, size = default_documents(), folder / "text.jsonl", 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
                size += len(doc.encode("utf-8"))
    return path, size


def gpt2_like_files(folder: Path) -> TokenizerSpec:
    """A byte-level BPE in GPT-2's layout (vocab.json + merges.txt, <|endoftext|> last), trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=50257, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(default_documents(), trainer)
    tok.model.save(str(folder))  # vocab.json + merges.txt
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return TokenizerSpec(type="gpt2", vocab_file=str(folder / "vocab.json"), merge_file=str(folder / "merges.txt"))


def bench_preprocess(text: Path, specs: dict[str, TokenizerSpec], workers: list[int], out: Path) -> list[dict]:
    """MB/s of text (wall clock, worker start-up included) and the CPU seconds all processes spent: on shared
    cores the wall clock says how busy the machine was, the CPU time what the work costs."""
    rows = []
    for name, spec in specs.items():
        for n in workers:
            before = _cpu_seconds()
            s = preprocess([str(text)], str(out / f"{name}-w{n}"), spec, workers=n, force=True, quiet=True)
            cpu = _cpu_seconds() - before
            rows.append({"tokenizer": name, "vocab": s["tokenizer"]["vocab_size"], "workers": n,
                         "mb_per_s": s["mb_per_s"], "seconds": s["seconds"], "cpu_s": cpu, "tokens": s["tokens"]})
            print(f"preprocess {name:13s} workers={n}: {s['mb_per_s']:.2f} MB/s ({s['input_bytes'] / 1e6:.1f} MB, "
                  f"{s['seconds']:.1f} s wall, {cpu:.1f} CPU s = {s['input_bytes'] / 1e6 / cpu:.2f} MB per CPU s, "
                  f"{s['tokens']:,} tokens)", flush=True)
    return rows


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_batches(prefix: str, seq: int, batch: int, steps: int, cache: str) -> dict[str, float]:
    """Batch assembly: global batches at random positions (index built first, timed apart)."""
    from mtlm.data.gpt_dataset import TokenFileDataset  # deferred: torch (the workers import this module)

    ds = IndexedDataset(prefix)
    t0 = time.perf_counter()
    train = TokenFileDataset(ds, 0, ds.num_documents, seq, seed=1, split="train", cache_root=cache)
    train.epoch_index(0)
    index_s = time.perf_counter() - t0
    starts = np.random.default_rng(0).integers(0, max(1, len(train) - batch), size=steps)
    t0 = time.perf_counter()
    for start in starts:
        train.get_batch(int(start), batch)
    seconds = time.perf_counter() - t0
    return {"index_build_s": index_s, "batch_s": seconds / steps, "tokens_per_s": steps * batch * seq / seconds}


def bench_train_step(prefix: str, vocab: int, steps: int, warmup: int) -> dict[str, float]:
    """gpt2_tiny's training step (the real Trainer, fp32, this process's threads) on the same token file."""
    from hydra import compose, initialize_config_dir

    # deferred: torch and the model (the preprocessing workers import this module again, torch-free)
    from mtlm.checks import validate
    from mtlm.parallel import ParallelState
    from mtlm.train.loop import Trainer

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="bench_data"):
        cfg = compose(config_name="config", overrides=["logger=none", "checkpoint.save=false",
                                                        f"data.paths=[{prefix}]", f"model.vocab_size={vocab}"])
    validate(cfg, world_size=1)
    trainer = Trainer(cfg, ParallelState(), None, {})
    for _ in range(warmup):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = (time.perf_counter() - t0) / steps
    t = cfg.trainer
    return {"step_s": seconds, "tokens_per_s": t.global_batch_size * cfg.model.seq_length / seconds,
            "seq": cfg.model.seq_length, "batch": t.global_batch_size}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m mtlm.bench.data", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=16.0, help="MB of text to preprocess (default 16)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=5, help="timed gpt2_tiny steps (default 5, after 2 untimed)")
    p.add_argument("--batches", type=int, default=200, help="timed batch assemblies (default 200)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mtlm-bench-data-") as tmp:
        root = Path(tmp)
        text, size = write_corpus(root, args.mb)
        (root / "gpt2").mkdir()
        specs = {"sentencepiece": TokenizerSpec(model=train_tokenizer(default_documents(), str(root / "sp.model"),
                                                                      4096).path),
                 "gpt2": gpt2_like_files(root / "gpt2")}
        print(f"text: {size / 1e6:.1f} MB; sentencepiece vocab 4096; GPT-2-style BPE vocab "
              f"{load_tokenizer(specs['gpt2']).vocab_size}; {os.cpu_count()} cores", flush=True)
        rows = bench_preprocess(text, specs, args.workers, root)
        prefix = str(root / f"sentencepiece-w{args.workers[0]}")
        step = bench_train_step(prefix, 4096, args.steps, 2)
        batches = bench_batches(prefix, step["seq"], step["batch"], args.batches, tmp)
        ratio = batches["tokens_per_s"] / step["tokens_per_s"]
        print(f"batch assembly (seq {step['seq']}, global batch {step['batch']}): {batches['tokens_per_s']:,.0f} "
              f"tokens/s ({batches['batch_s'] * 1e3:.2f} ms a batch; sample index built in "
              f"{batches['index_build_s'] * 1e3:.0f} ms)")
        print(f"gpt2_tiny training step: {step['tokens_per_s']:,.0f} tokens/s ({step['step_s']:.3f} s a step)")
        print(f"loader / training consumption: {ratio:,.0f}x")
    return {"preprocess": rows, "batches": batches, "train_step": step, "ratio": ratio}


if __name__ == "__main__":
    main()
