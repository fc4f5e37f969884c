"""mtlm checkpoints as a model of EleutherAI's lm-evaluation-harness (`pip install -e ".[eval]"`).

    lm_eval --model mtlm --model_args checkpoint=checkpoints/x --tasks lambada_openai   # after install-hook
    python -m mtlm.eval --model mtlm --model_args checkpoint=DIR --tasks ...            # no hook needed

    import lm_eval, mtlm.eval.harness                                                   # Python API
    lm_eval.simple_evaluate(model="mtlm", model_args="checkpoint=DIR", tasks=[...])

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so `--model mtlm` needs this
module imported first: `python -m mtlm.eval` is lm-eval's CLI with it imported, and
`python -m mtlm.eval install-hook` adds a one-line .pth file to this environment's site-packages that
registers `mtlm` lazily whenever lm_eval's registry is imported (mtlm/eval/lm_eval_hook.py), so the plain
`lm_eval` command knows it too.

The three request types run on mtlm's own model and tokenizer, through the same functions as
`python -m mtlm.evaluate`: log-likelihoods of continuations (mtlm.eval.scoring.score_continuations), rolling
log-likelihoods of whole documents (score_stream: windows of max_length tokens, each token scored once with
as much context as fits, the document starting after an end-of-document token), and greedy generation
(mtlm.eval.generation.generate, KV cache on). One process, tensor degree 1.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mtlm.eval.generation import Sampling, generate
from mtlm.eval.loading import autocast, load_gpt, load_tokenizer, read_checkpoint
from mtlm.eval.scoring import score_continuations, score_stream
from mtlm.parallel.state import ParallelState


@register_model("mtlm")
class MtlmLM(LM):
    """`--model_args checkpoint=DIR[,max_length=N][,dtype=bf16]`; lm-eval's own `--device` and `--batch_size`
    apply. The tokenizer is the checkpoint's; for one that records none (converted from Hugging Face) add
    `tokenizer=FILE.model` (sentencepiece), `vocab_file=vocab.json,merge_file=merges.txt` (GPT-2 BPE),
    `tokenizer_type=wordpiece,vocab_file=vocab.txt` or `tokenizer_type=tokenizer.json,tokenizer=tokenizer.json`.
    A tokenizer that is not the one the checkpoint records is refused unless `allow_tokenizer_mismatch=true`."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, vocab_file: str | None = None,
                 merge_file: str | None = None, device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | None = None, dtype: str = "fp32", tokenizer_type: str | None = None,
                 allow_tokenizer_mismatch: bool | str = False, **unused: object) -> None:
        super().__init__()
        step_dir, meta = read_checkpoint(checkpoint)
        kind = tokenizer_type or ("gpt2" if vocab_file else ("sentencepiece" if tokenizer else None))
        allow = str(allow_tokenizer_mismatch).lower() in ("true", "1", "yes")
        self.tokenizer = load_tokenizer(meta, SimpleNamespace(type=kind, model=tokenizer, vocab_file=vocab_file,
                                                              merge_file=merge_file, allow_mismatch=allow),
                                        step_dir)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI passes --device's default, cuda, whatever the machine has.
            print(f"note: device {device} is not available here; mtlm runs on the CPU", file=sys.stderr)
            device = "cpu"
        self._device = torch.device(device)
        self.model = load_gpt(step_dir, meta, ParallelState(device=self._device))
        self.max_length = int(max_length or meta["model"]["seq_length"])
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": a fixed 8
        self.eod = self.tokenizer.eos_id
        self._autocast = lambda: autocast(dtype, self._device)

    # ---- tokenization --------------------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Ids of (context, continuation). Trailing spaces of the context belong to the continuation (so a
        word is tokenized with its leading space, as a model reads it); an empty context is the end-of-
        document token, i.e. the start of a document."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        ctx = self.tokenizer.encode(stripped) if stripped else [self.eod]
        return ctx, self.tokenizer.encode(continuation)

    # ---- lm-eval's three request types ------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*req.args) for req in requests]
        scores = score_continuations(self.model, pairs, self.max_length, self.batch_size, self._autocast)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = [self.eod] + self.tokenizer.encode(req.args[0])
            loss_sum, _ = score_stream(self.model, ids, self.max_length, self.max_length, self.batch_size,
                                       self._autocast)
            out.append(-loss_sum)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sample = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 0.0)) > 0
            sampling = Sampling(float(kwargs["temperature"]) if sample else 0.0, int(kwargs.get("top_k", 0) or 0),
                                float(kwargs.get("top_p", 1.0) or 1.0))
            limit = self.model.cfg.max_position_embeddings - 1
            ids = (self.tokenizer.encode(context) if context else [self.eod])[-max(1, limit - max_new):]
            new = generate(self.model, ids, max_new, sampling, int(kwargs.get("seed", 0) or 0), self.eod,
                           kv_cache=True, autocast=self._autocast)
            text = self.tokenizer.decode(new)
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.path


def install_hook(site_dir: str | None = None) -> str:
    """Write mtlm-lm-eval.pth into site-packages (or `site_dir`): the plain `lm_eval` command then knows
    `--model mtlm`. Returns its path."""
    import os
    import sysconfig

    site_dir = site_dir or sysconfig.get_paths()["purelib"]
    path = os.path.join(site_dir, "mtlm-lm-eval.pth")
    with open(path, "w", encoding="utf-8") as f:
        f.write("import mtlm.eval.lm_eval_hook as h; h.install()\n")
    return path
