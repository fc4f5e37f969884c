"""A GPT (or BLOOM) split into pipeline stages (SC'21 §2.2): the embedding on the first stage, an even share of
the layers on each, the final norm, tied output layer on the last. No schedule logic: a stage is a module
whose forward maps the previous stage's output to its own (token ids -> stream -> ... -> logits).

The stages reuse the GPT's own modules, and the GPT keeps only those this rank's stages hold, under their
whole-model names (`blocks.5.attn.qkv.weight` stays that name on whichever stage holds layer 5): optimizer
state, gradient clipping and checkpoints see full-model names, so a checkpoint saved at one pipeline degree
loads at another. With P > 1 the first and last stages each hold the word embedding (input and tied output
layer); the training loop sums its gradient between them (Megatron's embedding group).
"""

from __future__ import annotations

import torch
from torch import nn

from mtlm.parallel.pipeline import stage_layers


class GPTStage(nn.Module):
    def __init__(self, gpt: nn.Module, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        # The GPT's own modules (shared, not copied), registered so torch's stage sees their parameters.
        self.blocks = nn.ModuleDict({str(i): gpt.blocks[str(i)] for i in layers})
        self.embedding = nn.ModuleList(m for m in (gpt.wte, gpt.wpe, gpt.ln_emb) if m is not None) if first else None
        self.final = nn.ModuleList(m for m in (gpt.ln_f, gpt.wte) if m is not None) if last else None
        self._gpt = [gpt]  # not a submodule: the GPT is the owner and namer of the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gpt = self._gpt[0]
        sp = gpt.state.sequence
        if self.first:
            x = gpt.embed(x, 0, sp)
        for block in self.blocks.values():
            x = gpt.run_block(block, x)
        return gpt.head(x, sp) if self.last else x


def split_into_stages(gpt: nn.Module, ids: list[int], num_stages: int) -> list[GPTStage]:
    """This rank's stages `ids` of `num_stages`; drops from `gpt` every module no stage here uses."""
    layers = [stage_layers(gpt.cfg.num_layers, num_stages, i) for i in ids]
    owned = sorted(i for r in layers for i in r)
    gpt.blocks = nn.ModuleDict({str(i): gpt.blocks[i] for i in owned})  # whole-model indices as names
    first, last = 0 in ids, num_stages - 1 in ids
    if not first:
        gpt.wpe = gpt.ln_emb = None
    if not last:
        gpt.ln_f = None
    if not first and not last:
        gpt.wte = None
    if last and not first:  # a copy of the first stage's embedding, kept equal by summing their gradients
        gpt.wte.weight.pipeline_copy = True
    return [GPTStage(gpt, r, i == 0, i == num_stages - 1) for r, i in zip(layers, ids, strict=True)]
