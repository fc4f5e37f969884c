"""Fused vocab-parallel cross-entropy (§3): never gathers the b x s x v logits.

Each rank holds logits for its vocabulary slice. It computes its local max, then (after a MAX all-reduce)
its local sum of exp(logit - max) and the target's logit if the target is in its slice; two SUM all-reduces
of b x s values finish the softmax denominator and the target logit. Communication: 3 x b*s values.

Padded vocabulary entries (ids >= the real vocab size) must get no probability: the model fills their
logits with -inf before calling this (`mask_padded_logits_`), so exp() gives them exactly 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def mask_padded_logits_(logits: torch.Tensor, vocab_start: int, real_vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary entries (global id >= real_vocab_size) to -inf, in place."""
    first_pad = real_vocab_size - vocab_start
    if first_pad < logits.shape[-1]:
        logits[..., max(first_pad, 0):] = float("-inf")
    return logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        # Softmax math in fp32 whatever the compute dtype (bf16 exp-sums over 50k entries lose digits).
        ctx.dtype = logits.dtype
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = target - vocab_start
        in_slice = (local_target >= 0) & (local_target < logits.shape[-1])
        local_target = local_target.masked_fill(~in_slice, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill_(~in_slice, 0.0)

        exp = shifted.exp_()  # reuse the buffer: `shifted` is not needed any more
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_slice)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, in_slice = ctx.saved_tensors
        # (The saved buffer is reused, so this graph supports one backward pass, as training needs.)
        # d loss / d logit_j = softmax_j - [j == target]; only the rank owning the target subtracts 1.
        grad = softmax  # saved buffer, used once: update in place
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -in_slice.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0,
                                 group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token loss [b, s] from this rank's vocabulary slice of the logits [b, s, v/t]."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group)
