"""Next-item losses on flattened real positions.

All functions take ``hidden`` (N, D) at the positions that have a target, ``targets`` (N,) item indices in
1..n_items, and the item table ``item_emb`` (n_items + 1, D) whose row 0 is padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Logits are built this many elements at a time, never as a full (N, n_items) matrix: 16 MiB of float32 on
# CPU (cache-friendly), 256 MiB on GPU (large enough matmuls, few kernel launches).
CE_CHUNK_ELEMENTS = 1 << 22
CE_CHUNK_ELEMENTS_CUDA = 1 << 26


def full_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the whole catalogue; the padding item is not a class.

    Equal to ``F.cross_entropy(hidden @ item_emb[1:].T, targets - 1)`` but computed in row chunks, with the
    gradients formed in the same pass: peak memory is one chunk of logits instead of (N, n_items) logits,
    their log-softmax and its gradient. Softmax arithmetic is float32 (also under autocast).
    """
    return _ChunkedCE.apply(hidden, targets.long() - 1, item_emb[1:])


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden: (N, D); classes: (N,) in 0..I-1; weight: (I, D)."""
        n = hidden.shape[0]
        budget = CE_CHUNK_ELEMENTS_CUDA if hidden.is_cuda else CE_CHUNK_ELEMENTS
        chunk = max(1, budget // weight.shape[0])
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_grad else None  # (N, D)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None  # (I, D)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, c = hidden[start:start + chunk], classes[start:start + chunk]  # (C, D), (C,)
            logits = (h @ weight.T).float()  # (C, I)
            top = logits.amax(-1, keepdim=True)  # (C, 1)
            target = logits.gather(1, c.unsqueeze(1))  # (C, 1)
            exp = logits.sub_(top).exp_()  # (C, I) in place: one exp pass serves loss and gradient
            norm = exp.sum(-1, keepdim=True)  # (C, 1)
            total += (top + norm.log() - target).sum()
            if need_grad:
                probs = exp.div_(norm)  # (C, I) softmax
                probs[torch.arange(len(c), device=c.device), c] -= 1.0  # d(row loss)/d(logits)
                probs = probs.to(hidden.dtype)
                grad_h[start:start + chunk] = probs @ weight  # (C, D)
                grad_w += probs.T @ h  # (I, D)
        if need_grad:
            ctx.save_for_backward(grad_h / max(n, 1), (grad_w / max(n, 1)).to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, None, grad_w * grad_out


def sampled_bce(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor,
    n_negatives: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with the positive and ``n_negatives`` uniform negatives per position.

    Per position: ``-log sigmoid(s+) - sum_j log(1 - sigmoid(s-_j))`` (negative-sampling form; with one
    negative this is the SASRec paper's loss), averaged over positions. Negatives are drawn uniformly from
    1..n_items on ``generator``'s device (then moved to ``hidden``'s) and may hit the positive.
    """
    n_items = item_emb.shape[0] - 1
    device = generator.device if generator is not None else hidden.device
    negatives = torch.randint(1, n_items + 1, (hidden.shape[0], n_negatives), device=device, generator=generator)
    negatives = negatives.to(hidden.device)  # (N, K)
    pos = (hidden * item_emb[targets.long()]).sum(-1)  # (N,)
    neg = torch.einsum("nd,nkd->nk", hidden, item_emb[negatives])  # (N, K)
    return (F.softplus(-pos.float()) + F.softplus(neg.float()).sum(-1)).mean()
