"""`load_model(path)`: a trained mtlm checkpoint as a plain PyTorch module in one process.

    from mtlm import load_model
    model = load_model("checkpoints/gpt2_tiny")   # a checkpoint folder (its latest) or one step_* folder
    logits = model(input_ids)                     # [batch, seq, vocab], the real vocabulary only

    bert = load_model("checkpoints/bert_tiny")    # a BERT checkpoint gives the BERT model:
    mlm_logits, sop_logits = bert(input_ids, token_type_ids=None, attention_mask=None)  # [b, s, vocab], [b, 2]

Whatever tensor degree the checkpoint was saved at, the model comes back at degree 1 (this process holds all
of it), built from the model section stored in the checkpoint's metadata.json.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn

from mtlm.checkpoint.format import ShardReader, find_checkpoint, read_metadata
from mtlm.config import MODEL_DEFAULTS
from mtlm.model.bert import BERT
from mtlm.model.build import build_model
from mtlm.model.gpt import GPT
from mtlm.parallel.state import ParallelState
from mtlm.train.checkpoint import load_weights


class LanguageModel(nn.Module):
    """A GPT at tensor degree 1 whose forward gives logits over the real vocabulary (GPT.forward's logits
    include the padded vocabulary entries, as -inf)."""

    def __init__(self, gpt: GPT, step: int) -> None:
        super().__init__()
        self.gpt = gpt
        self.vocab_size = gpt.vocab_size
        self.config = gpt.cfg
        self.step = step  # the training step the weights are from

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids)[..., : self.vocab_size]


class MaskedLanguageModel(nn.Module):
    """A BERT at tensor degree 1: (masked-LM logits over the real vocabulary [b, s, vocab], sentence-order
    logits [b, 2]; index 1: segments A and B were swapped)."""

    def __init__(self, bert: BERT, step: int) -> None:
        super().__init__()
        self.bert = bert
        self.vocab_size = bert.vocab_size
        self.config = bert.cfg
        self.step = step

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mlm, sop = self.bert(input_ids, token_type_ids, attention_mask)
        return mlm[..., : self.vocab_size], sop


def model_config(meta: dict) -> SimpleNamespace:
    """The model section of a checkpoint, with today's defaults for keys an older checkpoint lacks."""
    return SimpleNamespace(**{**MODEL_DEFAULTS, **meta["model"]})


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LanguageModel | MaskedLanguageModel:
    """Load a checkpoint's weights (saved at any tensor degree) into one model on `device`, in eval mode: a
    LanguageModel for a GPT checkpoint, a MaskedLanguageModel for a BERT one (the `_target_` it was saved with)."""
    step_dir = find_checkpoint(path)
    meta = read_metadata(step_dir)
    device = torch.device(device)
    model = build_model(model_config(meta), meta["model"]["vocab_size"], ParallelState(device=device),
                        device=device)
    load_weights(ShardReader(step_dir, meta), ParallelState(device=device), model)
    wrapper = MaskedLanguageModel if isinstance(model, BERT) else LanguageModel
    return wrapper(model, meta["step"]).eval()
