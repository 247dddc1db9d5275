"""Next-item losses on flattened real positions.

All functions take ``hidden`` (N, D) at the positions that have a target, ``targets`` (N,) item indices in
1..n_items, and the item table ``item_emb`` (n_items + 1, D) whose row 0 is padding (no other rows: a
[MASK] row must be sliced off by the caller). Each returns the mean over the N positions; :func:`full_ce`
also takes positions without a target (target 0, weight 0), so it can run on a whole (B*T) batch.

- :func:`full_ce`: softmax over the whole catalogue (optionally label-smoothed).
- :func:`sampled_softmax`: softmax over the positive and K negatives shared by all N positions, log-Q corrected.
- :func:`sampled_bce`: binary cross-entropy with K uniform negatives per position (SASRec).
- :func:`sampled_gbce`: gSASRec's generalised BCE, the positive's probability raised to the power beta.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recsys.config import ConfigError

# Above this many logits (positions x catalogue) the loss is built in row chunks of at most this many
# elements, never as a full (N, n_items) matrix: 16 MiB of float32 on CPU (cache-friendly), 512 MiB on GPU
# (large enough matmuls, few kernel launches; ML-1M at batch 128 x length 200, 87M logits, is one piece).
CE_CHUNK_ELEMENTS = 1 << 22
CE_CHUNK_ELEMENTS_CUDA = 1 << 27


def full_ce(
    hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, label_smoothing: float = 0.0,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None, weights: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax cross-entropy over the whole catalogue; the padding item is not a class.

    Unlike the other losses, ``targets`` may hold padding (0): such positions weigh 0 and the mean is over
    the positions with a target, so a caller can pass all B*T positions of a batch (static shapes, no
    boolean gather and no host synchronisation). Equal to ``F.cross_entropy(hidden @ item_emb[1:].T,
    targets - 1, ignore_index=-1, label_smoothing=label_smoothing)`` (0 instead of NaN with no target at all).
    Above the chunk budget (``CE_CHUNK_ELEMENTS``, ``_CUDA`` on GPU) logits are built in row chunks with the
    gradients formed in the same pass, so peak memory is one chunk of logits; under it, one piece.
    Softmax arithmetic is float32 (also under autocast). Raises ``ValueError`` unless 0 <= ``label_smoothing`` < 1.

    ``bias`` = (items (N, L), values (N, L)): ``values`` added to the logits of ``items`` (0 = padding, adds
    nothing; a repeated item gets the sum), e.g. the model's repeat bias; then the loss is built by plain
    autograd in the same row chunks, each recomputed in the backward pass (``torch.utils.checkpoint``).

    ``weights`` (N,) >= 0: each position's weight (e.g. by its target's event type, ``train.type_weights``);
    the loss is then the weighted mean ``sum(w * loss) / sum(w)`` over the positions with a target (plain
    mean when None; 0 when every weight is 0).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    classes, weight = targets.long() - 1, item_emb[1:]  # (N,) -1 = no target; (I, D)
    rows = (classes >= 0).float() if weights is None else (classes >= 0) * weights.float()  # (N,) row weights
    count = rows.sum()  # () a tensor: no host synchronisation
    count = torch.where(count > 0, count, torch.ones_like(count))  # no target, or all weights 0: a zero loss
    excluded = None if exclude is None else _exclusions(exclude, classes)
    if bias is not None:
        return _biased_ce(hidden, classes, weight, label_smoothing, count, *bias, rows=rows, excluded=excluded)
    # On GPU one logits matrix under the budget (what torch.compile fuses best); on CPU the one-pass loss and
    # gradient of _ChunkedCE is faster even in one chunk (2000 x 400 logits: 16 vs 21 ms forward + backward).
    if hidden.is_cuda and hidden.shape[0] * weight.shape[0] <= CE_CHUNK_ELEMENTS_CUDA:
        return _dense_ce(hidden, classes, weight, label_smoothing, count, rows, excluded)
    return _ChunkedCE.apply(hidden, classes, weight, float(label_smoothing), count, rows, excluded)


def _exclusions(exclude: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns (N, L) in 0..I-1, valid (N, L)): each row's excluded columns, each once, never its target
    (``classes`` (N,), -1 = none); ``valid`` is False on padding, repeats and the target."""
    items = exclude.long()
    items = torch.where(items == (classes + 1).unsqueeze(1), 0, items).sort(dim=1).values  # (N, L)
    repeat = torch.zeros_like(items, dtype=torch.bool)
    repeat[:, 1:] = items[:, 1:] == items[:, :-1]
    return (items - 1).clamp(min=0), (items > 0) & ~repeat


def _biased_ce(
    hidden: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor, smoothing: float, count: torch.Tensor,
    items: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`full_ce` with ``values`` (N, L) added to the logits of ``items`` (N, L); row chunks as
    ``_ChunkedCE``, each checkpointed (its logits are recomputed for the backward pass, not kept)."""
    chunk = max(1, (CE_CHUNK_ELEMENTS_CUDA if hidden.is_cuda else CE_CHUNK_ELEMENTS) // weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        cut = None if excluded is None else (excluded[0][part], excluded[1][part])
        total = total + checkpoint(_biased_chunk, hidden[part], classes[part], weight, items[part], values[part],
                                   smoothing, rows[part], cut, use_reentrant=False)
    return total / count


def _biased_chunk(
    hidden: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor, items: torch.Tensor, values: torch.Tensor,
    smoothing: float, rows: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (C, I)
    real = items > 0  # (C, L) padding adds nothing
    logits = logits.scatter_add(1, (items.long() - 1).clamp(min=0), values.float() * real)
    return _weighted_sum(logits, classes, smoothing, rows, excluded)


def _weighted_sum(
    logits: torch.Tensor, classes: torch.Tensor, smoothing: float, rows: torch.Tensor,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over rows of ``rows`` (C,) x each row's cross-entropy (rows with class -1 weigh 0), over the columns
    not ``excluded`` (columns, valid) from :func:`_exclusions`."""
    if excluded is None:
        losses = F.cross_entropy(logits, classes, ignore_index=-1, reduction="none", label_smoothing=smoothing)
        return (losses * rows).sum()
    cols, valid = excluded
    c = classes.clamp(min=0).unsqueeze(1)  # (C, 1)
    masked = logits.scatter_add(1, cols, torch.where(valid, -math.inf, 0.0))  # excluded columns at -inf
    losses = masked.logsumexp(1) - (1.0 - smoothing) * logits.gather(1, c).squeeze(1)  # (C,)
    if smoothing:  # the mean logit over the columns left
        kept = logits.sum(1) - (logits.gather(1, cols) * valid).sum(1)
        losses = losses - smoothing * kept / (logits.shape[1] - valid.sum(1))
    return (torch.where(classes >= 0, losses, 0.0) * rows).sum()


def _dense_ce(
    hidden: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor, smoothing: float, count: torch.Tensor,
    rows: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """hidden: (N, D); classes: (N,) in 0..I-1, or -1 (weight 0); weight: (I, D); count: () the divisor;
    rows: (N,) each row's weight; excluded: (columns, valid) from :func:`_exclusions` or None."""
    logits = (hidden @ weight.T).float()  # (N, I)
    return _weighted_sum(logits, classes, smoothing, rows, excluded) / count


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor, smoothing: float,
        count: torch.Tensor, row_weights: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden: (N, D); classes: (N,) in 0..I-1, or -1 (weight 0); weight: (I, D); count: () the divisor;
        row_weights: (N,) each row's weight (0 where class is -1); excluded: (columns (N, L), valid (N, L)) from
        :func:`_exclusions`, or None.

        Row loss over the I' = I - (its excluded count) columns left: ``lse(s) - (1 - eps) * s[c] - eps *
        mean(s)``; its logit gradient ``softmax(s) - (1 - eps) * onehot(c) - eps / I'`` on those columns, 0 on
        the excluded ones.
        """
        chunk = max(1, (CE_CHUNK_ELEMENTS_CUDA if hidden.is_cuda else CE_CHUNK_ELEMENTS) // weight.shape[0])
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_grad else None  # (N, D)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None  # (I, D)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_items = weight.shape[0]
        # with exclusions, each row's smoothing weight per column left, eps / I' (N, 1)
        spread = None if excluded is None else (smoothing / (n_items - excluded[1].sum(1)).float()).unsqueeze(1)
        # Under autocast the matmul operands are cast ONCE here and the loop runs with autocast off: left to
        # autocast, every chunk's three products would cast the whole (I, D) table again (on a CPU with bf16
        # matrix units that cost more than the bf16 products saved). Softmax arithmetic stays float32.
        device_type = hidden.device.type
        low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        hid, table = (hidden, weight) if low is None else (hidden.to(low), weight.to(low))
        with torch.autocast(device_type, enabled=False):
            mean_w = table.float().mean(0) if smoothing else None  # (D,) mean item vector: mean logit = h . mean_w
            _chunked_ce_loop(hid, classes, table, smoothing, mean_w, spread, row_weights, excluded, chunk, total,
                             grad_h, grad_w)
            if smoothing and need_grad:
                # the smoothing term's logit gradient -eps / I' on every logit (the loop adds it back on the
                # excluded ones), in closed form: through the products it is -eps / I' * sum(W) for every row of
                # grad_h and -sum_n(eps / I'_n * w_n h_n) for every row of grad_w (no pass over the probabilities)
                if excluded is None:  # the same eps / I on every row
                    real = row_weights.unsqueeze(1)  # (N, 1)
                    grad_h -= real * (smoothing * mean_w)  # (N, D)
                    grad_w -= (smoothing / n_items) * (real * hid.float()).sum(0)  # (I, D) - (D,)
                else:
                    real = row_weights.unsqueeze(1) * spread  # (N, 1)
                    grad_h -= real * (n_items * mean_w)  # (N, D)
                    grad_w -= (real * hid.float()).sum(0)  # (I, D) - (D,)
        if need_grad:
            ctx.save_for_backward(grad_h / count, (grad_w / count).to(weight.dtype))
        return total / count

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, None, grad_w * grad_out, None, None, None, None


def _chunked_ce_loop(
    hidden: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor, smoothing: float, mean_w: torch.Tensor | None,
    spread: torch.Tensor | None, row_weights: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None, chunk: int,
    total: torch.Tensor, grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
) -> None:
    """The row-chunk loop of :class:`_ChunkedCE`: adds the weighted row losses to ``total`` and, when
    ``grad_h`` is given, the (undivided) gradients to ``grad_h`` (N, D) and ``grad_w`` (I, D, float32) in place.
    ``hidden`` and ``weight`` in the matmul dtype; logits and probabilities in float32; ``mean_w`` (D,) the
    float32 mean row of ``weight`` when ``smoothing``; ``spread`` (N, 1) each row's eps / (columns left) with ``excluded``. The
    smoothing term's gradient on every column is left to the caller; the loop adds it back on excluded columns."""
    n_items = weight.shape[0]
    # One float32 logits buffer for every chunk, and the products written in place (out=, addmm_): a fresh
    # 16 MiB matrix per chunk, and an (I, D) temporary per grad_w product, cost page faults and an extra pass
    # (on the 2-core CPU, Beauty's 54,542 items: 189 -> ~140 ms per 880-row loss and gradient). Same values.
    fp32 = hidden.dtype == torch.float32
    buffer = torch.empty(min(chunk, hidden.shape[0]), n_items, dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        h, c = hidden[part], classes[part].unsqueeze(1)  # (C, D), (C, 1)
        real = row_weights[part].unsqueeze(1)  # (C, 1) row weights
        c = c.clamp(min=0)
        logits = buffer[: h.shape[0]]  # (C, I)
        if fp32:
            torch.mm(h, weight.T, out=logits)
        else:
            logits.copy_(h @ weight.T)
        target = logits.gather(1, c)  # (C, 1)
        if smoothing:  # mean(s) over all columns = h . mean(W): no pass over the (C, I) logits
            mean = (h.float() @ mean_w).unsqueeze(1)  # (C, 1)
        if excluded is not None:
            cols, valid = excluded[0][part], excluded[1][part]  # (C, L)
            if smoothing:  # the mean over the columns left
                mean = (n_items * mean - (logits.gather(1, cols) * valid).sum(1, keepdim=True)) / (
                    n_items - valid.sum(1, keepdim=True))
            logits.scatter_add_(1, cols, torch.where(valid, -math.inf, 0.0))  # excluded: probability 0
        if smoothing:
            target = (1.0 - smoothing) * target + smoothing * mean
        top = logits.amax(-1, keepdim=True)  # (C, 1)
        exp = logits.sub_(top).exp_()  # (C, I) in place: one exp pass serves loss and gradient
        norm = exp.sum(-1, keepdim=True)  # (C, 1)
        total += ((top + norm.log() - target) * real).sum()
        if grad_h is not None:
            probs = exp.mul_(real / norm)  # (C, I) softmax, 0 on rows without a target
            probs.scatter_add_(1, c, real * -(1.0 - smoothing))  # d(row loss)/d(logits)
            if excluded is not None and smoothing:  # cancel the caller's -eps / I' on the excluded columns
                probs.scatter_add_(1, cols, valid * (real * spread[part]))
            if fp32:
                torch.mm(probs, weight, out=grad_h[part])  # (C, D)
                grad_w.addmm_(probs.T, h)  # (I, D)
            else:
                probs = probs.to(hidden.dtype)
                grad_h[part] = probs @ weight  # (C, D)
                grad_w += probs.T @ h  # (I, D)


def sampled_softmax(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor,
    n_negatives: int,
    sampling_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy over the positive and ``n_negatives`` negatives shared by all N positions.

    The negatives are drawn with replacement from ``sampling_probs`` (n_items + 1,) (per-draw probabilities,
    entry 0 must be 0; None = uniform over 1..n_items) on ``generator``'s device. Every logit, the positive's
    included, is corrected by ``- log Q(item)`` (sampled softmax with log-Q correction, Jean et al. 2015;
    Yi et al. 2019), so that the loss estimates the full softmax without the popularity bias of the sampler.
    A negative equal to the row's positive (an accidental hit) gets logit -inf. Logits are float32.
    """
    n_items = item_emb.shape[0] - 1
    device = generator.device if generator is not None else hidden.device
    if sampling_probs is None:
        negatives = torch.randint(1, n_items + 1, (n_negatives,), device=device, generator=generator)  # (K,)
        log_q = torch.full((n_items + 1,), -math.log(n_items), device=hidden.device)  # (I + 1,)
    else:
        if sampling_probs.shape != (n_items + 1,):
            raise ValueError(f"sampling_probs has shape {tuple(sampling_probs.shape)}, expected ({n_items + 1},)")
        negatives = torch.multinomial(sampling_probs.to(device), n_negatives, replacement=True, generator=generator)
        log_q = sampling_probs.to(hidden.device, torch.float32).log()  # (I + 1,)
    negatives = negatives.to(hidden.device)  # (K,)
    targets = targets.long()
    pos = (hidden * item_emb[targets]).sum(-1).float() - log_q[targets]  # (N,)
    neg = (hidden @ item_emb[negatives].T).float() - log_q[negatives]  # (N, K)
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))  # (N, K)
    return (torch.logsumexp(torch.cat([pos.unsqueeze(1), neg], 1), 1) - pos).mean()


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
    return _binary_loss(hidden, targets, item_emb, n_negatives, 1.0, generator)


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """gSASRec's power beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = n_negatives / (n_items - 1).

    Petrov & Macdonald, "gSASRec: Reducing Overconfidence in Sequential Recommendation Trained with Negative
    Sampling", RecSys 2023 (as in ``gbce.py`` of github.com/asash/gSASRec-pytorch). t = 0 gives
    beta = 1 (plain BCE), t = 1 gives beta = alpha (fully calibrated). Raises ``ValueError`` unless
    1 <= n_negatives <= n_items - 1 and 0 <= t <= 1.
    """
    if not 1 <= n_negatives <= n_items - 1:
        raise ConfigError(f"train.loss=gbce needs 1 <= train.n_negatives <= n_items - 1 = {n_items - 1} (the "
                          f"catalogue has {n_items} items), got {n_negatives}: lower train.n_negatives")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"train.gbce_t must be in [0, 1], got {t}")
    alpha = n_negatives / (n_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def sampled_gbce(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor,
    n_negatives: int,
    t: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """gSASRec's generalised BCE: :func:`sampled_bce` with the positive's probability raised to ``beta``.

    Per position: ``-beta * log sigmoid(s+) - sum_j log(1 - sigmoid(s-_j))`` with ``beta`` =
    :func:`gbce_beta` (``n_negatives``, n_items, ``t``); the same uniform negatives as :func:`sampled_bce`.
    """
    beta = gbce_beta(n_negatives, item_emb.shape[0] - 1, t)
    return _binary_loss(hidden, targets, item_emb, n_negatives, beta, generator)


def _binary_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor,
    n_negatives: int,
    beta: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``mean(beta * softplus(-s+) + sum_j softplus(s-_j))`` with per-position uniform negatives."""
    n_items = item_emb.shape[0] - 1
    device = generator.device if generator is not None else hidden.device
    negatives = torch.randint(1, n_items + 1, (hidden.shape[0], n_negatives), device=device, generator=generator)
    negatives = negatives.to(hidden.device)  # (N, K)
    pos = (hidden * item_emb[targets.long()]).sum(-1)  # (N,)
    neg = torch.einsum("nd,nkd->nk", hidden, item_emb[negatives])  # (N, K)
    return (beta * F.softplus(-pos.float()) + F.softplus(neg.float()).sum(-1)).mean()
