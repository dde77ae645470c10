"""Token-level divergences between the student and the teacher, as pure functions on tensors.

Visual-OPSD scores the student's own sampled completion twice with the same network: the student
sees the question only, the teacher additionally sees privileged visual thoughts. At every
completion position t both produce a distribution over the vocabulary, p_S(. | t) and p_T(. | t),
and the loss pulls p_S toward p_T. This module holds that loss in three forms:

1. `generalized_jsd`: the reference form on materialised logits, plain autograd.
2. `fused_linear_generalized_jsd`: the same objective from hidden states and the output head,
   chunk by chunk, so that no (tokens x vocab) tensor is ever alive; values and gradients match
   (1) to float32 round-off.
3. `sampled_token_reverse_kl`: the memory-light "teacher log-prob as reward" estimator of
   KL(p_S || p_T) that needs only the log-probabilities of the sampled tokens.

plus `global_token_count` / `global_sequence_count` for gradient-accumulation-correct normalisation.

Conventions (the same as TRL's GKD trainer, which users know):

* Generalized JSD, with M = beta * p_T + (1 - beta) * p_S:
      JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),   0 < beta < 1.
  beta = 0 is special-cased to the forward KL(p_T || p_S) ("mean-seeking"), and beta = 1 to the
  reverse KL(p_S || p_T) ("mode-seeking"). The generalized formula itself tends to 0 at both ends
  (JSD_beta ~ beta * KL(p_T || p_S) as beta -> 0 and ~ (1 - beta) * KL(p_S || p_T) as beta -> 1),
  so the loss jumps at exactly 0 and 1: that is the convention, not a bug.
* Remember that `torch.nn.functional.kl_div(input, target)` computes KL(target || input); this
  module never calls it, and every docstring names the direction explicitly.
* Temperature divides both logits; the loss is multiplied by temperature**2 (Hinton) so that
  gradient magnitudes do not shrink with temperature. (TRL divides but does not rescale.)
* top_k: at every position the teacher's top-k token ids (no gradient) are taken, both logit
  vectors are gathered there and each is renormalised by a log-softmax over the k entries
  (the Visual-OPSD reference code's choice; no tail bucket).
* clip: the loss is a sum over vocabulary entries of per-entry contributions
      c_v = beta * p_T(v) * (log p_T(v) - log M(v)) + (1 - beta) * p_S(v) * (log p_S(v) - log M(v))
  (for beta = 0: c_v = p_T(v) * (log p_T(v) - log p_S(v)); for beta = 1: c_v = p_S(v) * (log p_S(v)
  - log p_T(v))). With `clip`, each c_v is replaced by min(c_v, clip) *before* the sum over the
  vocabulary, as in the reference code (which clamps the elementwise `beta * kl_teacher +
  (1 - beta) * kl_student` tensor). Clipping applies to the divergence before the temperature**2
  factor. For 0 < beta < 1 every c_v is >= 0 (convexity of x log x), so the clipped loss stays
  >= 0. At the KL endpoints individual c_v can be negative (where p_S > p_T); clipping only the
  positive ones can then make a position's clipped loss negative. That is the reference behaviour
  and it is kept; the gradient is simply that of the entries below the clip.
* Round-off: mathematically JSD_beta >= 0 and KL >= 0. Where that holds exactly (0 < beta < 1, or
  an endpoint without clip) each position's value is clamped at 0 so float round-off can never
  produce a negative loss (one library's bf16 JSD did); the gradient is passed through unchanged
  (it is the exact gradient of the unclamped expression). All arithmetic is in float32 (float64
  if the inputs are float64) whatever the input dtype; the mixture is formed in log space.
* -inf logits (in `generalized_jsd`) mean probability exactly 0, with 0 * log 0 = 0: entries that
  are -inf on both sides contribute nothing and receive no gradient. If the first argument of a
  KL has mass where the second has none, the KL is mathematically infinite; -inf logits are raised
  to -1e30 before the log-softmax, so it comes out as a huge finite number (and `clip` then bounds
  it, with finite gradients) instead of inf / NaN. Every position needs at least one finite logit
  on each side. (The fused form computes its logits from finite hidden states and head weights.)
* Padded output heads (e.g. 152,064 rows for 151,936 tokenizer entries): pass `vocab_size`; the
  extra columns / rows are dropped, which is exactly equivalent to giving them logit -inf (and
  never the same as logit 0).
* Reductions over completion positions selected by a boolean `mask` (True = scored):
  "none" (per-position values, 0 where masked), "token_mean" (sum / number of scored positions),
  "sequence_mean" (mean over each sequence's scored positions, then mean over the sequences that
  have at least one; the last position axis is time), "sum".
* Normalisation across micro-batches and ranks: divide by the number of scored tokens of the
  whole optimizer step, not of the micro-batch, or the gradient depends on how the batch was
  split. Pass `normalizer=global_token_count(all_masks_of_the_step)` with reduction="token_mean"
  (which is exactly `reduction="sum"` divided by it), or `normalizer=global_sequence_count(...)`
  with reduction="sequence_mean".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Reduction",
    "fused_linear_generalized_jsd",
    "generalized_jsd",
    "global_sequence_count",
    "global_token_count",
    "sampled_token_reverse_kl",
]

Reduction = Literal["none", "token_mean", "sequence_mean", "sum"]
_REDUCTIONS = ("none", "token_mean", "sequence_mean", "sum")

# -inf logits (probability 0) are raised to this finite floor before the log-softmax: exp() of the
# resulting log-probability is exactly 0, differences of two floored entries are 0, so no
# inf - inf or 0 * inf = NaN can appear, neither in the forward nor in the backward pass. No
# finite logit vector gets near it.
_LOGIT_FLOOR = -1e30

# fused top-k: the student side is computed sparsely (gathering only the k head rows per position)
# when k * _SPARSE_TOPK_RATIO <= vocabulary; gathers run at memory speed, matmuls at compute speed,
# and this ratio is roughly where the two cost the same on CPUs and GPUs.
_SPARSE_TOPK_RATIO = 32

# fused default: rows per chunk so that one (chunk x vocab) buffer holds about 2**25 elements
# (128 MiB in float32; at most four are alive). Larger chunks amortise streaming the (V, H) head
# through the matmuls (on 2 CPU cores 256 rows ran ~1.5x faster than 64 at V = 151,936).
_CHUNK_ELEMENTS = 2**25


# --------------------------------------------------------------------------------------------
# argument checks and shared helpers


def _check_options(beta: float, temperature: float, top_k: int | None, clip: float | None, reduction: str) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if clip is not None and not clip > 0.0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _value_is_nonnegative(beta: float, clip: float | None) -> bool:
    """Whether each position's loss is >= 0 in exact arithmetic (see the module docstring)."""
    return 0.0 < beta < 1.0 or clip is None


def _clamp_value_keep_grad(x: Tensor) -> Tensor:
    """max(x, 0) in value, identity in gradient: removes round-off negatives only."""
    return x + (x.clamp(min=0.0) - x).detach()


def _as_denominator(value: int | float | Tensor, like: Tensor) -> Tensor:
    """A >= 1 denominator tensor (0 scored tokens -> loss 0 rather than 0 / 0 = NaN)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1.0)


def _reduce(
    per_position: Tensor,
    mask: Tensor,
    reduction: str,
    normalizer: int | float | Tensor | None,
) -> Tensor:
    """Apply a reduction to per-position values already zeroed outside `mask`."""
    if normalizer is not None and reduction not in ("token_mean", "sequence_mean"):
        raise ValueError("normalizer only applies to reduction='token_mean' or 'sequence_mean'")
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "token_mean":
        denominator = mask.sum() if normalizer is None else normalizer
        return per_position.sum() / _as_denominator(denominator, per_position)
    # sequence_mean: the last axis is time, every other leading axis indexes sequences
    time_steps = mask.shape[-1] if mask.dim() > 0 else 1
    per_seq_sum = per_position.reshape(-1, time_steps).sum(-1)
    lengths = mask.reshape(-1, time_steps).sum(-1)
    per_seq_mean = per_seq_sum / lengths.clamp(min=1).to(per_seq_sum.dtype)
    denominator = (lengths > 0).sum() if normalizer is None else normalizer
    return per_seq_mean.sum() / _as_denominator(denominator, per_seq_mean)


# --------------------------------------------------------------------------------------------
# 1. the reference form on logits


def _per_entry_divergence(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    """Per-vocabulary-entry contributions c_v of the divergence (their sum over v is the divergence).

    Both inputs are finite, temperature-scaled logits over the same support; the log-softmax
    renormalises each on that support. The teacher side is computed without autograd history."""
    student_logp = torch.log_softmax(student_logits, dim=-1)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher_logits, dim=-1)
    if beta == 0.0:
        # KL(p_T || p_S): the teacher is the weighting (first) argument.
        return teacher_logp.exp() * (teacher_logp - student_logp)
    if beta == 1.0:
        # KL(p_S || p_T): the student is the weighting (first) argument.
        return student_logp.exp() * (student_logp - teacher_logp)
    # log M = log(beta * p_T + (1 - beta) * p_S), formed in log space
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    # beta * KL(p_T || M) + (1 - beta) * KL(p_S || M), entry by entry
    teacher_part = (beta * teacher_logp.exp()) * (teacher_logp - mixture_logp)
    student_part = ((1.0 - beta) * student_logp.exp()) * (student_logp - mixture_logp)
    return teacher_part + student_part


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    clip: float | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    normalizer: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence between student and teacher, per position.

    JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M), M = beta * p_T + (1 - beta) * p_S,
    for 0 < beta < 1; beta = 0 is exactly KL(p_T || p_S) (forward KL, teacher-weighted) and
    beta = 1 exactly KL(p_S || p_T) (reverse KL, student-weighted), TRL's convention. Summed over
    the vocabulary, then reduced over the positions selected by `mask`.

    Args:
        student_logits: (..., V) logits of the student; receives the gradient.
        teacher_logits: (..., V) logits of the teacher for the *same* tokens; always detached.
        beta: interpolation in [0, 1], see above.
        temperature: divides both logits; the result is multiplied by temperature**2.
        top_k: restrict each position to the teacher's top-k ids, renormalising both sides there
            (k >= V: no restriction).
        clip: cap on each per-(position, vocabulary-entry) contribution before the vocabulary sum
            (see the module docstring for exactly what is capped).
        mask: (...) bool, True at scored completion positions; default: all positions. Positions
            outside the mask are replaced by zeros first, so anything there (even NaN) is ignored
            and gets zero gradient.
        reduction: "none" | "token_mean" | "sequence_mean" | "sum" (module docstring).
        normalizer: with "token_mean" / "sequence_mean", the global number of tokens / sequences
            to divide by instead of the local count (see `global_token_count`).
        vocab_size: keep only the first `vocab_size` logits (drop padded head rows; the same as
            setting them to -inf).

    Returns:
        A float32 (float64 for float64 inputs) scalar, or (...) per-position values for "none".
    """
    _check_options(beta, temperature, top_k, clip, reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != logits shape minus vocab {tuple(student_logits.shape[:-1])}"
        )
    teacher_logits = teacher_logits.detach()  # the teacher is a target, never trained through this loss
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]

    if top_k is not None and top_k < student_logits.shape[-1]:
        # the teacher decides the support (its top-k ids, no gradient); temperature > 0 does not
        # change the order, so gathering first keeps every later tensor (..., k)
        top_ids = teacher_logits.topk(top_k, dim=-1).indices
        student_logits = student_logits.gather(-1, top_ids)
        teacher_logits = teacher_logits.gather(-1, top_ids)

    dtype = _compute_dtype(student_logits.dtype)
    student, teacher = student_logits.to(dtype), teacher_logits.to(dtype)
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    if mask is not None:
        mask = mask.to(torch.bool)
        # sanitise discarded positions so that garbage there cannot leak NaN into the backward pass
        student = student.masked_fill(~mask.unsqueeze(-1), 0.0)
        teacher = teacher.masked_fill(~mask.unsqueeze(-1), 0.0)
    else:
        mask = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)

    # -inf -> a finite floor: probability still exactly 0, but no inf - inf or 0 * inf = NaN can
    # appear anywhere, forward or backward (clamp gives those entries zero gradient)
    student, teacher = student.clamp(min=_LOGIT_FLOOR), teacher.clamp(min=_LOGIT_FLOOR)
    entries = _per_entry_divergence(student, teacher, beta)
    if clip is not None:
        entries = entries.clamp(max=clip)
    per_position = entries.sum(-1) * temperature**2
    if _value_is_nonnegative(beta, clip):
        per_position = _clamp_value_keep_grad(per_position)
    per_position = per_position.masked_fill(~mask, 0.0)
    return _reduce(per_position, mask, reduction, normalizer)


# --------------------------------------------------------------------------------------------
# 2. the fused, memory-bounded form from hidden states and the output head


class _ChunkBuffers:
    """Four reusable (rows x columns) work buffers: re-touching warm pages is much cheaper than
    page-faulting a fresh allocation for every intermediate of every chunk, and it fixes the peak."""

    def __init__(self, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> None:
        self.storage = torch.empty(4, rows, columns, dtype=dtype, device=device)

    def views(self, rows: int) -> list[Tensor]:
        return [self.storage[i, :rows] for i in range(4)]


def _log_softmax_and_probs_(logits: Tensor, probs_out: Tensor) -> None:
    """In place: logits <- log_softmax(logits); probs_out <- softmax(logits). Rows must be finite."""
    logits.sub_(logits.amax(-1, keepdim=True))
    torch.exp(logits, out=probs_out)
    total = probs_out.sum(-1, keepdim=True)
    probs_out.div_(total)
    logits.sub_(total.log_())


def _jsd_rows_and_grad_(
    s: Tensor, t: Tensor, ps: Tensor, pt: Tensor, beta: float, clip: float | None, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row divergence and its gradient w.r.t. the (temperature-scaled) student logits.

    `s`, `t` hold student / teacher logits already divided by the temperature; they and the two
    scratch buffers `ps`, `pt` of the same shape are overwritten (no other (rows x columns)
    memory is used, except a bool mask with clip). Returns (rows,) values, not yet multiplied by
    temperature**2 nor clamped at 0, and the gradient (a view of `s` or `t`).

    With g_v = dc_v / d log p_S(v) (the teacher is constant), the log-softmax Jacobian gives
    dL/ds = g - p_S * sum_v g_v, where
      0 < beta < 1: g_v = (1 - beta) * p_S(v) * (log p_S(v) - log M(v))
      beta = 0 (KL(p_T || p_S)): g_v = -p_T(v)
      beta = 1 (KL(p_S || p_T)): g_v = p_S(v) * (log p_S(v) - log p_T(v) + 1)
    and g_v = 0 wherever clip caps c_v (torch.clamp passes the gradient at equality; so do we).
    """
    _log_softmax_and_probs_(s, ps)  # s <- log p_S
    _log_softmax_and_probs_(t, pt)  # t <- log p_T
    if beta == 0.0:
        # c = p_T * (log p_T - log p_S), the entries of KL(p_T || p_S)
        entries = t.sub_(s).mul_(pt)
        grad = torch.neg(pt, out=s) if want_grad else None
    elif beta == 1.0:
        # c = p_S * (log p_S - log p_T), the entries of KL(p_S || p_T)
        s.sub_(t)
        grad = torch.add(s, 1.0, out=t).mul_(ps) if want_grad else None
        entries = s.mul_(ps)
    else:
        # With d = log p_T - log p_S and r = log M - log p_S = log((1 - beta) + beta * e^d):
        #   c = beta p_T (d - r) - (1 - beta) p_S r,   g = -(1 - beta) p_S r
        d = t.sub_(s)
        r = torch.add(d, math.log(beta), out=s)
        torch.logaddexp(r, r.new_tensor(math.log1p(-beta)), out=r)
        d.sub_(r).mul_(pt).mul_(beta)  # beta p_T (d - r)
        q = r.mul_(ps).mul_(1.0 - beta)  # (1 - beta) p_S r
        entries = d.sub_(q)
        grad = q.neg_() if want_grad else None
    if clip is not None:
        if grad is not None:
            grad.masked_fill_(entries > clip, 0.0)
        entries.clamp_(max=clip)
    rows = entries.sum(-1)
    if grad is not None:
        grad.addcmul_(ps, grad.sum(-1, keepdim=True), value=-1.0)  # log-softmax Jacobian
    return rows, grad


def _auto_chunk_size(n_rows: int, vocab: int) -> int:
    rows = max(16, min(1024, 2 ** round(math.log2(max(1.0, _CHUNK_ELEMENTS / vocab)))))  # a power of 2
    return max(1, min(n_rows, rows))


def _matmul_into(out: Tensor, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """out <- h @ w.T (+ b), without allocating."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _fused_pass(
    hs: Tensor,
    ht: Tensor,
    w: Tensor,
    b: Tensor | None,
    wt: Tensor,
    bt: Tensor | None,
    row_weights: Tensor | None,
    *,
    beta: float,
    temperature: float,
    top_k: int | None,
    clip: float | None,
    chunk_size: int | None,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row losses, and (if `need`) gradients of sum_n row_weights[n] * loss[n] w.r.t. the
    student hidden states, head weight and head bias. Never holds more than one chunk of logits.

    Three paths: full vocabulary (student and teacher logits of a chunk, dense gradients);
    dense top-k (full student logits gathered at the teacher's top-k, gradient scattered back);
    sparse top-k (k << V: only the k head rows per position are gathered on the student side).
    """
    dtype = _compute_dtype(hs.dtype)
    hs, ht = hs.to(dtype), ht.to(dtype)
    w, wt = w.to(dtype), wt.to(dtype)  # no copy for float32 heads; one (V, H) copy for bf16 heads
    b = None if b is None else b.to(dtype)
    bt = None if bt is None else bt.to(dtype)
    n, hidden = hs.shape
    vocab = w.shape[0]
    need_h, need_w, need_b = need
    want_grad = need_h or need_w or need_b

    losses = hs.new_zeros(n)
    grad_h = hs.new_zeros(n, hidden) if need_h else None
    grad_w = w.new_zeros(vocab, hidden) if need_w else None
    grad_b = w.new_zeros(vocab) if need_b else None
    if n == 0:
        return losses, grad_h, grad_w, grad_b

    k = None if top_k is None else min(top_k, vocab)
    sparse = k is not None and k * _SPARSE_TOPK_RATIO <= vocab
    chunk = min(n, chunk_size or _auto_chunk_size(n, vocab))
    bufs = _ChunkBuffers(chunk, vocab if k is None else k, dtype, hs.device)
    if k is not None:  # full-vocabulary teacher logits, needed to find the top-k
        teacher_buf = torch.empty(chunk, vocab, dtype=dtype, device=hs.device)
        student_buf = None if sparse else torch.empty_like(teacher_buf)
    if sparse:
        # rows per gather so that the (rows, k, hidden) slice of the head stays about a quarter of
        # one (chunk, vocab) logit buffer (gathers run at memory speed: small blocks cost nothing)
        sub_rows = max(1, min(chunk, (chunk * vocab) // (4 * k * hidden)))
        gathered = torch.empty(sub_rows * k, hidden, dtype=dtype, device=hs.device)
    t2 = temperature**2

    def kernel(s: Tensor, t: Tensor, ps: Tensor, pt: Tensor, lo: int, hi: int) -> Tensor | None:
        """Loss rows into `losses[lo:hi]`; returns d(weighted loss)/d(raw student logits)."""
        if temperature != 1.0:
            s.div_(temperature)
            t.div_(temperature)
        rows, grad = _jsd_rows_and_grad_(s, t, ps, pt, beta, clip, want_grad)
        losses[lo:hi] = rows * t2
        if grad is not None:
            # temperature**2 from the loss, 1 / temperature from logits / temperature
            assert row_weights is not None
            grad.mul_(row_weights[lo:hi].unsqueeze(-1) * temperature)
        return grad

    def dense_grads(dense: Tensor, h_c: Tensor, lo: int, hi: int) -> None:
        if grad_h is not None:
            torch.mm(dense, w, out=grad_h[lo:hi])
        if grad_w is not None:
            grad_w.addmm_(dense.t(), h_c)
        if grad_b is not None:
            grad_b.add_(dense.sum(0))

    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = stop - start
        h_c, ht_c = hs[start:stop], ht[start:stop]
        s, t, ps, pt = bufs.views(rows)

        if k is None:
            _matmul_into(t, ht_c, wt, bt)
            _matmul_into(s, h_c, w, b)
            grad = kernel(s, t, ps, pt, start, stop)
            if grad is not None:
                dense_grads(grad, h_c, start, stop)
            continue

        t_full = _matmul_into(teacher_buf[:rows], ht_c, wt, bt)
        top_vals, ids = t_full.topk(k, dim=-1)  # the teacher's top-k ids; no gradient anywhere
        t.copy_(top_vals)

        if not sparse:
            s_full = _matmul_into(student_buf[:rows], h_c, w, b)
            torch.gather(s_full, 1, ids, out=s)
            grad = kernel(s, t, ps, pt, start, stop)
            if grad is not None:
                dense_grads(s_full.zero_().scatter_(1, ids, grad), h_c, start, stop)
            continue

        for lo in range(0, rows, sub_rows):
            hi = min(rows, lo + sub_rows)
            flat_ids = ids[lo:hi].reshape(-1)
            w_sel = torch.index_select(w, 0, flat_ids, out=gathered[: flat_ids.numel()])
            w_sel = w_sel.view(hi - lo, k, hidden)
            s_sub = s[lo:hi]
            torch.bmm(w_sel, h_c[lo:hi].unsqueeze(-1), out=s_sub.unsqueeze(-1))
            if b is not None:
                s_sub.add_(b[ids[lo:hi]])
            grad = kernel(s_sub, t[lo:hi], ps[lo:hi], pt[lo:hi], start + lo, start + hi)
            if grad is None:
                continue
            if grad_h is not None:
                torch.bmm(grad.unsqueeze(1), w_sel, out=grad_h[start + lo : start + hi].unsqueeze(1))
            # index_put_(accumulate=True) rather than index_add_: the same sums, and on CPU
            # several times faster for many short rows
            if grad_b is not None:
                grad_b.index_put_((flat_ids,), grad.reshape(-1), accumulate=True)
            if grad_w is not None:
                # w_sel is no longer needed: reuse it for the per-(row, id) outer products
                torch.mul(grad.unsqueeze(-1), h_c[lo:hi].unsqueeze(1), out=w_sel)
                grad_w.index_put_((flat_ids,), w_sel.view(-1, hidden), accumulate=True)
    return losses, grad_h, grad_w, grad_b


def _grad_to(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


class _FusedJSDScalar(torch.autograd.Function):
    """sum_n row_weights[n] * loss[n]; gradients are computed chunk-wise in the forward pass and
    only the (N, H), (V, H), (V,) results are kept, so the backward pass is a rescale."""

    @staticmethod
    def forward(ctx, hs, ht, w, b, wt, bt, row_weights, options):  # type: ignore[override]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], b is not None and ctx.needs_input_grad[3])
        losses, grad_h, grad_w, grad_b = _fused_pass(hs, ht, w, b, wt, bt, row_weights, need=need, **options)
        if _value_is_nonnegative(options["beta"], options["clip"]):
            losses = losses.clamp(min=0.0)  # value only: grads above are of the unclamped loss
        ctx.grads = (_grad_to(grad_h, hs), _grad_to(grad_w, w), _grad_to(grad_b, b))
        return (losses * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.grads  # freed with the graph (kept for retain_graph=True)
        if not torch.equal(grad_out, torch.ones_like(grad_out)):  # skip a full copy in the usual case
            grad_h, grad_w, grad_b = (None if g is None else g * grad_out for g in (grad_h, grad_w, grad_b))
        return grad_h, None, grad_w, grad_b, None, None, None, None


class _FusedJSDPerPosition(torch.autograd.Function):
    """Per-position losses (reduction="none"); the backward pass recomputes the logits chunk by
    chunk with the incoming per-position gradients as row weights."""

    @staticmethod
    def forward(ctx, hs, ht, w, b, wt, bt, options):  # type: ignore[override]
        losses, _, _, _ = _fused_pass(hs, ht, w, b, wt, bt, None, need=(False, False, False), **options)
        if _value_is_nonnegative(options["beta"], options["clip"]):
            losses = losses.clamp(min=0.0)
        ctx.save_for_backward(hs, ht, w, b, wt, bt)
        ctx.options = options
        return losses

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hs, ht, w, b, wt, bt = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], b is not None and ctx.needs_input_grad[3])
        row_weights = grad_out.to(_compute_dtype(hs.dtype))
        _, grad_h, grad_w, grad_b = _fused_pass(hs, ht, w, b, wt, bt, row_weights, need=need, **ctx.options)
        return _grad_to(grad_h, hs), None, _grad_to(grad_w, w), _grad_to(grad_b, b), None, None, None


def _row_weights(mask: Tensor, reduction: str, normalizer: int | float | Tensor | None, dtype: torch.dtype) -> Tensor:
    """Weights w (same shape as mask) with reduction(losses) == sum(w * losses)."""
    weights = mask.to(dtype)
    if reduction == "sum":
        if normalizer is not None:
            raise ValueError("normalizer only applies to reduction='token_mean' or 'sequence_mean'")
        return weights
    if reduction == "token_mean":
        denominator = mask.sum() if normalizer is None else normalizer
        return weights / _as_denominator(denominator, weights)
    time_steps = mask.shape[-1]
    per_seq = weights.reshape(-1, time_steps)
    lengths = per_seq.sum(-1, keepdim=True)
    denominator = (lengths > 0).sum() if normalizer is None else normalizer
    per_seq = per_seq / lengths.clamp(min=1.0) / _as_denominator(denominator, weights)
    return per_seq.reshape(mask.shape)


def fused_linear_generalized_jsd(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    clip: float | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    normalizer: int | float | Tensor | None = None,
    vocab_size: int | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """`generalized_jsd` of the logits `hidden @ weight.T + bias`, never materialising them.

    Same objective, options and directions as `generalized_jsd` (beta = 0: KL(p_T || p_S),
    beta = 1: KL(p_S || p_T), otherwise beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)).
    Positions are processed `chunk_size` rows at a time, so the extra memory is
    O(chunk_size x vocab) (plus O(chunk_size x top_k x hidden) on the sparse top-k path and the
    (V, H) weight gradient), never O(tokens x vocab).

    For the scalar reductions the gradients are computed chunk by chunk during the forward pass
    (the logits are needed there anyway) and kept as (N, H) / (V, H) tensors; the backward pass
    only rescales them. For reduction="none" the backward pass recomputes the logits instead.
    With top_k much smaller than the vocabulary (k * 32 <= V), only the k gathered head rows are
    used on the student side, so its cost no longer scales with the vocabulary; the teacher side
    always needs the full logits to find its top-k.

    Args:
        student_hidden: (B, T, H) or (N, H) final hidden states of the student; gets gradient.
        teacher_hidden: the teacher's hidden states at the same positions; never gets gradient.
        weight: (V, H) output head; gets gradient. bias: optional (V,), gets gradient.
        teacher_weight, teacher_bias: the teacher's head if it differs (e.g. an EMA teacher);
            default: the student's, detached.
        mask: bool of the hidden states' shape minus H, True at scored positions; positions
            outside it are not computed at all. For "sequence_mean" the last axis is time
            ((N, H) inputs are one sequence).
        reduction, normalizer, beta, temperature, top_k, clip, vocab_size: as `generalized_jsd`.
        chunk_size: rows per chunk; default: the power of two nearest 2**25 / V, in [16, 1024]
            (256 for V = 151,936: about 0.6 GiB of float32 work buffers).

    Returns:
        A scalar, or per-position values of the leading shape for "none". Computed in float32
        (float64 for float64 inputs); logits are never rounded to the input dtype.
    """
    _check_options(beta, temperature, top_k, clip, reduction)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden shapes differ: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    lead_shape = student_hidden.shape[:-1]
    hidden = student_hidden.shape[-1]
    if mask is None:
        mask = torch.ones(lead_shape, dtype=torch.bool, device=student_hidden.device)
    elif mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != hidden shape minus H {tuple(lead_shape)}")
    mask = mask.to(torch.bool)

    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias given without teacher_weight")
        teacher_weight, teacher_bias = weight, bias  # one shared head (self / live teacher)
    if teacher_weight.shape != weight.shape:
        raise ValueError(f"teacher head {tuple(teacher_weight.shape)} != student head {tuple(weight.shape)}")
    if vocab_size is not None:  # slicing the head == logit -inf for the padded rows
        weight, teacher_weight = weight[:vocab_size], teacher_weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]
    t_weight = teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()

    rows = mask.reshape(-1).nonzero().squeeze(1)  # only scored positions are ever computed
    hs = student_hidden.reshape(-1, hidden).index_select(0, rows)
    ht = teacher_hidden.detach().reshape(-1, hidden).index_select(0, rows)
    options = dict(beta=beta, temperature=temperature, top_k=top_k, clip=clip, chunk_size=chunk_size)

    if reduction == "none":
        if normalizer is not None:
            raise ValueError("normalizer only applies to reduction='token_mean' or 'sequence_mean'")
        losses = _FusedJSDPerPosition.apply(hs, ht, weight, bias, t_weight, t_bias, options)
        out = losses.new_zeros(mask.numel()).index_copy(0, rows, losses)
        return out.reshape(lead_shape)
    weights = _row_weights(mask, reduction, normalizer, _compute_dtype(student_hidden.dtype))
    return _FusedJSDScalar.apply(
        hs, ht, weight, bias, t_weight, t_bias, weights.reshape(-1).index_select(0, rows), options
    )


# --------------------------------------------------------------------------------------------
# 3. the sampled-token estimator


def sampled_token_reverse_kl(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "token_mean",
    normalizer: int | float | Tensor | None = None,
) -> Tensor:
    """Sampled-token estimator of the reverse KL(p_S || p_T) ("on-policy distillation as reward").

    Inputs are the log-probabilities of the *sampled* tokens y_t ~ p_S only, (B, T) each, so no
    vocabulary-sized tensor is needed. With the per-token advantage
        A_t = log p_T(y_t) - log p_S(y_t)        (detached: a reward, not a path for gradients)
    each position contributes the surrogate
        loss_t = -A_t * log p_S(y_t)   in gradient   (REINFORCE with reward A_t),
        loss_t = log p_S(y_t) - log p_T(y_t)   in value.
    The value is the single-sample (k1) estimate of KL(p_S || p_T) at that position, and since
    E_{y ~ p_S}[-A(y) grad log p_S(y)] = grad sum_y p_S(y) (log p_S(y) - log p_T(y)), the gradient
    is an unbiased estimate of the gradient of the per-position reverse KL(p_S || p_T). It is the
    per-token ("discount 0") estimator: each token is credited with its own advantage only, not
    with the advantages of the tokens it leads to, so it follows the token-level reverse KL at the
    visited prefixes rather than the sequence-level one. The tokens must have been sampled from
    the current student (on-policy) for the expectation to hold. The teacher never gets gradient.

    Args:
        student_logprobs: (..., T) log p_S of the sampled tokens; receives the gradient.
        teacher_logprobs: (..., T) log p_T of the same tokens under the teacher's context.
        mask: (..., T) bool, True at scored completion positions; default: all.
        reduction, normalizer: as `generalized_jsd`.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError("student and teacher log-prob shapes differ")
    dtype = _compute_dtype(student_logprobs.dtype)
    student = student_logprobs.to(dtype)
    teacher = teacher_logprobs.detach().to(dtype)
    mask = torch.ones_like(student, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    student = student.masked_fill(~mask, 0.0)
    teacher = teacher.masked_fill(~mask, 0.0)
    advantage = (teacher - student).detach()
    # value: log p_S - log p_T; gradient: -A * grad log p_S (the detached terms carry no gradient)
    per_token = (student - teacher).detach() - advantage * (student - student.detach())
    per_token = per_token.masked_fill(~mask, 0.0)
    return _reduce(per_token, mask, reduction, normalizer)


# --------------------------------------------------------------------------------------------
# 4. normalisation across micro-batches and data-parallel ranks


def _all_reduce_sum(count: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count


def global_token_count(masks: Sequence[Tensor] | Tensor) -> Tensor:
    """Number of scored tokens in the whole optimizer step: summed over the micro-batches of the
    gradient-accumulation window (`masks`, one per micro-batch) and over all processes when
    torch.distributed is initialised (an all-reduce; every rank must call it).

    Use it as the `normalizer` of each micro-batch loss (reduction="token_mean", equivalently
    reduction="sum" divided by it) and sum the gradients: the result is then the token mean over
    the whole step, whatever the split. Note that DDP / FSDP *average* gradients over ranks, so
    with a count taken over all ranks multiply each rank's loss by the world size (or the
    gradient ends up divided by it twice).

    Returns a 0-dim int64 tensor on the masks' device (no host synchronisation).
    """
    if isinstance(masks, Tensor):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("global_token_count needs at least one mask")
    count = torch.zeros((), dtype=torch.int64, device=masks[0].device)
    for m in masks:
        count = count + m.to(torch.bool).sum()
    return _all_reduce_sum(count)


def global_sequence_count(masks: Sequence[Tensor] | Tensor) -> Tensor:
    """Number of sequences with at least one scored token over the gradient-accumulation window
    and all processes: the `normalizer` for reduction="sequence_mean" (last mask axis = time).
    Same conventions as `global_token_count`."""
    if isinstance(masks, Tensor):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("global_sequence_count needs at least one mask")
    count = torch.zeros((), dtype=torch.int64, device=masks[0].device)
    for m in masks:
        count = count + m.to(torch.bool).reshape(-1, m.shape[-1]).any(-1).sum()
    return _all_reduce_sum(count)
