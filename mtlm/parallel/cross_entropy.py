"""Fused vocab-parallel cross-entropy (§3): never gathers the b x s x v logits.

Each rank holds logits for its vocabulary slice and computes, per token, its slice's log-sum-exp in fp32.
Two all-reduces of b x s values combine them into the global one (a MAX, then a SUM of the rescaled
exp-sums: lse = M + log sum_r exp(lse_r - M)), and a third SUM brings the target's logit from the rank that
owns it. Communication: 3 x b*s values. At tensor degree 1 there is nothing to combine.

Backward recomputes softmax = exp(logit - lse) from the saved logits and subtracts 1 at the target.

On CPU both passes walk the logits a block of rows at a time (~2 MB of fp32), so the fp32 temporaries stay
in cache and reuse one small heap block: a fresh vocabulary-sized buffer costs a page fault per 4 KB, which
on CPU is as slow as the softmax itself. With `inplace_backward` the gradient is written over the saved
logits, so the loss allocates nothing vocabulary-sized at all (the model passes it: its logits are its own).

Padded vocabulary entries (ids >= the real vocab size) must get no probability: the model fills their
logits with -inf before calling this (`mask_padded_logits_`), so exp() gives them exactly 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 19  # rows per block on CPU: 512k values, 2 MB in fp32


def mask_padded_logits_(logits: torch.Tensor, vocab_start: int, real_vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary entries (global id >= real_vocab_size) to -inf, in place."""
    first_pad = real_vocab_size - vocab_start
    if first_pad < logits.shape[-1]:
        logits[..., max(first_pad, 0):] = float("-inf")
    return logits


def _blocks(rows: torch.Tensor) -> list[slice]:
    """Row blocks of a [tokens, v] tensor: ~CHUNK_ELEMENTS each on CPU, all rows at once on GPUs."""
    n, v = rows.shape
    step = n if rows.device.type != "cpu" else max(1, CHUNK_ELEMENTS // v)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group,
                inplace_backward: bool) -> torch.Tensor:
        v = logits.shape[-1]
        rows = logits.reshape(-1, v)
        # Softmax math in fp32 whatever the compute dtype (bf16 exp-sums over 50k entries lose digits).
        acc = torch.promote_types(logits.dtype, torch.float32)
        local_target = target.reshape(-1) - vocab_start
        in_slice = (local_target >= 0) & (local_target < v)
        local_target = local_target.masked_fill_(~in_slice, 0)

        lse = torch.empty(rows.shape[0], dtype=acc, device=logits.device)
        for b in _blocks(rows):
            torch.logsumexp(rows[b].to(acc), dim=-1, out=lse[b])  # -inf for a slice of padding only
        target_logit = rows.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).to(acc).masked_fill_(~in_slice, 0.0)
        if group is not None:
            lse_max = lse.clone()
            dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
            sum_exp = (lse - lse_max).exp_()
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target_logit, group=group)
            lse = sum_exp.log_().add_(lse_max)

        ctx.inplace_backward = inplace_backward
        ctx.save_for_backward(rows, lse, local_target, in_slice)
        ctx.shape = logits.shape
        return (lse - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        rows, lse, local_target, in_slice = ctx.saved_tensors
        # (With inplace_backward the saved logits become the gradient: the graph supports one backward pass,
        # as training needs.)
        grad = rows if ctx.inplace_backward else torch.empty_like(rows)
        scale = grad_loss.reshape(-1, 1).to(lse.dtype)
        minus_one = -in_slice.unsqueeze(-1).to(lse.dtype)
        for b in _blocks(rows):
            # d loss / d logit_j = softmax_j - [j == target]; only the rank owning the target subtracts 1.
            p = torch.sub(rows[b], lse[b].unsqueeze(-1)).exp_()  # a fresh fp32 block: the logits stay intact
            p.scatter_add_(-1, local_target[b].unsqueeze(-1), minus_one[b])
            grad[b] = p.mul_(scale[b])  # rounded to the logits' dtype on the way
        return grad.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0,
                                 group: dist.ProcessGroup | None = None,
                                 inplace_backward: bool = False) -> torch.Tensor:
    """Per-token loss [b, s] from this rank's vocabulary slice of the logits [b, s, v/t].

    `inplace_backward`: the caller will not read `logits` again, so backward may overwrite them with the
    gradient instead of allocating a buffer of the same size.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group, inplace_backward)
