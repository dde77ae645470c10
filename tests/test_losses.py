"""Properties of the divergences in visual_opsd.losses, on CPU with tiny tensors.

Checklist: zero for identical inputs, symmetry and the ln 2 bound at beta = 0.5, the beta
endpoints against hand-computed KLs (and the documented jump), temperature, masks, reductions,
top-k, clip, agreement with TRL's GKD loss (dev-only reference), fused == plain in values and
gradients, bf16 safety, no teacher gradient, padded vocabularies, -inf logits, gradient-accumulation
invariance, the sampled-token estimator, argument checks.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings

import pytest
import torch

from visual_opsd.losses import (
    fused_linear_generalized_jsd,
    generalized_jsd,
    global_sequence_count,
    global_token_count,
    sampled_token_reverse_kl,
)

REDUCTIONS = ("none", "token_mean", "sequence_mean", "sum")


# These tensors are tiny; on a busy 2-core machine OpenMP threads only wait for each other (the
# module runs ~4x faster single-threaded).
pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _logit_pair(*shape: int, seed: int = 0, scale: float = 2.0, dtype=torch.float32):
    return _randn(*shape, seed=seed, scale=scale, dtype=dtype), _randn(*shape, seed=seed + 1, scale=scale, dtype=dtype)


def _lengths_mask(lengths: list[int], time_steps: int) -> torch.Tensor:
    """Completion masks built from lengths (never from token values: pad may equal EOS)."""
    return torch.arange(time_steps)[None, :] < torch.tensor(lengths)[:, None]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max abs difference within rtol of the largest magnitude of `expected` (scale-relative)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _kl_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)), in float64 from probabilities."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


def _jsd_by_hand(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    p_s = torch.softmax(student_logits.double(), -1)
    p_t = torch.softmax(teacher_logits.double(), -1)
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


# ------------------------------------------------------------------------------------------
# basic properties of the plain function


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_zero_for_identical_inputs(beta, top_k, clip):
    logits, _ = _logit_pair(3, 4, 50)
    out = generalized_jsd(logits, logits.clone(), beta=beta, top_k=top_k, clip=clip, reduction="none")
    assert out.abs().max() < 1e-6


def test_symmetric_at_half():
    s, t = _logit_pair(4, 6, 40)
    a = generalized_jsd(s, t, beta=0.5, reduction="none")
    b = generalized_jsd(t, s, beta=0.5, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bounded_by_ln2_at_half():
    s, t = _logit_pair(8, 16, 30, scale=40.0)  # nearly one-hot, mostly disjoint: close to the bound
    out = generalized_jsd(s, t, beta=0.5, reduction="none")
    assert out.max() <= math.log(2) + 1e-6
    assert out.max() > 0.69  # the bound is attained up to round-off for disjoint supports
    assert (out >= 0).all()


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.5, 0.9])
def test_generalized_formula_by_hand(beta):
    s, t = _logit_pair(5, 3, 20)
    out = generalized_jsd(s, t, beta=beta, reduction="none")
    torch.testing.assert_close(out.double(), _jsd_by_hand(s, t, beta), rtol=1e-5, atol=1e-7)


def test_endpoints_are_the_two_kls():
    s, t = _logit_pair(5, 3, 20)
    forward = generalized_jsd(s, t, beta=0.0, reduction="none")  # KL(p_T || p_S)
    reverse = generalized_jsd(s, t, beta=1.0, reduction="none")  # KL(p_S || p_T)
    torch.testing.assert_close(forward.double(), _kl_by_hand(t, s), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reverse.double(), _kl_by_hand(s, t), rtol=1e-5, atol=1e-7)
    assert (forward - reverse).abs().max() > 1e-2  # the data is asymmetric enough to tell them apart


def test_endpoints_are_special_cased_and_approached_from_inside_after_scaling():
    """JSD_beta -> 0 at both ends, like beta * KL(T||S) and (1 - beta) * KL(S||T); beta = 0 and 1
    are special-cased to the KLs themselves (TRL's convention): a documented jump."""
    s, t = _logit_pair(4, 30, seed=3, dtype=torch.float64)
    kl_ts, kl_st = _kl_by_hand(t, s), _kl_by_hand(s, t)
    for eps in (1e-3, 1e-4):
        near_zero = generalized_jsd(s, t, beta=eps, reduction="none")
        near_one = generalized_jsd(s, t, beta=1 - eps, reduction="none")
        torch.testing.assert_close(near_zero / eps, kl_ts, rtol=5 * eps * 10, atol=0)
        torch.testing.assert_close(near_one / eps, kl_st, rtol=5 * eps * 10, atol=0)
    tiny = generalized_jsd(s, t, beta=1e-6, reduction="none")
    at_zero = generalized_jsd(s, t, beta=0.0, reduction="none")
    assert (tiny < 1e-4 * at_zero).all()  # the jump at beta = 0


def test_temperature_divides_logits_and_scales_by_its_square():
    s, t = _logit_pair(3, 5, 25)
    for beta in (0.0, 0.5, 1.0):
        hot = generalized_jsd(s, t, beta=beta, temperature=2.5, reduction="none")
        by_hand = 2.5**2 * generalized_jsd(s / 2.5, t / 2.5, beta=beta, reduction="none")
        torch.testing.assert_close(hot, by_hand, rtol=1e-5, atol=1e-7)


def test_masked_positions_contribute_nothing_and_get_no_gradient():
    s, t = _logit_pair(3, 6, 20)
    mask = _lengths_mask([6, 2, 4], 6)
    s_garbage = s.clone()
    s_garbage[~mask] = float("nan")  # anything outside the mask is ignored, even NaN
    t_garbage = t.clone()
    t_garbage[~mask] = float("inf")
    s_garbage.requires_grad_()
    out = generalized_jsd(s_garbage, t_garbage, mask=mask, reduction="none", top_k=7, clip=0.1)
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    out.sum().backward()
    assert torch.isfinite(s_garbage.grad).all()
    assert (s_garbage.grad[~mask] == 0).all()
    clean = generalized_jsd(s, t, reduction="none", top_k=7, clip=0.1)
    torch.testing.assert_close(out[mask], clean[mask])


def test_reductions():
    s, t = _logit_pair(4, 5, 12)
    mask = _lengths_mask([5, 1, 0, 3], 5)
    per = generalized_jsd(s, t, mask=mask, reduction="none")
    assert (per[~mask] == 0).all()
    torch.testing.assert_close(generalized_jsd(s, t, mask=mask, reduction="sum"), per.sum())
    torch.testing.assert_close(generalized_jsd(s, t, mask=mask, reduction="token_mean"), per.sum() / 9)
    seq_mean = (per[0].sum() / 5 + per[1].sum() / 1 + per[3].sum() / 3) / 3  # the empty sequence is skipped
    torch.testing.assert_close(generalized_jsd(s, t, mask=mask, reduction="sequence_mean"), seq_mean)
    torch.testing.assert_close(generalized_jsd(s, t, mask=mask, reduction="token_mean", normalizer=20), per.sum() / 20)
    empty = torch.zeros(4, 5, dtype=torch.bool)
    s_leaf = s.clone().requires_grad_()
    for reduction in ("token_mean", "sequence_mean", "sum"):
        out = generalized_jsd(s_leaf, t, mask=empty, reduction=reduction)
        assert out.item() == 0.0
        out.backward()
        assert (s_leaf.grad == 0).all()


def test_top_k_equal_to_vocabulary_is_no_top_k():
    s, t = _logit_pair(3, 4, 30)
    for beta in (0.0, 0.5, 1.0):
        full = generalized_jsd(s, t, beta=beta, reduction="none")
        torch.testing.assert_close(generalized_jsd(s, t, beta=beta, top_k=30, reduction="none"), full)
        torch.testing.assert_close(generalized_jsd(s, t, beta=beta, top_k=1000, reduction="none"), full)


def test_top_k_gathers_teacher_top_ids_and_renormalises():
    s, t = _logit_pair(3, 4, 30)
    ids = t.topk(6, dim=-1).indices
    by_hand = generalized_jsd(s.gather(-1, ids), t.gather(-1, ids), reduction="none")
    torch.testing.assert_close(generalized_jsd(s, t, top_k=6, reduction="none"), by_hand)
    # the student's own ranking plays no part: shuffling its values outside the teacher's top-k changes nothing
    s2 = s.clone()
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(-1, ids, False)
    s2[outside] = 50.0
    torch.testing.assert_close(generalized_jsd(s2, t, top_k=6, reduction="none"), by_hand)


def test_clip_large_is_no_clip_and_small_clip_reduces():
    s, t = _logit_pair(3, 4, 30, scale=4.0)
    for beta in (0.0, 0.5, 1.0):
        free = generalized_jsd(s, t, beta=beta, reduction="none")
        torch.testing.assert_close(generalized_jsd(s, t, beta=beta, clip=float("inf"), reduction="none"), free)
        torch.testing.assert_close(generalized_jsd(s, t, beta=beta, clip=1e9, reduction="none"), free)
        clipped = generalized_jsd(s, t, beta=beta, clip=0.01, reduction="none")
        assert (clipped <= free + 1e-7).all()
        assert clipped.sum() < 0.9 * free.sum()


def test_clip_caps_each_per_entry_contribution_before_the_vocabulary_sum():
    # one position, two entries; hand-computed per-entry contributions
    p_t = torch.tensor([0.9, 0.1], dtype=torch.float64)
    p_s = torch.tensor([0.1, 0.9], dtype=torch.float64)
    s, t = p_s.log()[None], p_t.log()[None]
    clip = 0.05
    # beta = 0.5: c_v = 0.5 p_T (log p_T - log M) + 0.5 p_S (log p_S - log M) >= 0, each capped
    m = 0.5 * p_t + 0.5 * p_s
    c = 0.5 * p_t * (p_t / m).log() + 0.5 * p_s * (p_s / m).log()
    out = generalized_jsd(s, t, beta=0.5, clip=clip, reduction="sum")
    torch.testing.assert_close(out, c.clamp(max=clip).sum())
    assert c.min() > clip  # both entries were capped: the clipped value is exactly 2 * clip
    # beta = 0: c_v = p_T (log p_T - log p_S) = [1.98, -0.22]; capping the positive entry only
    # makes the clipped forward KL negative (reference behaviour, documented)
    c0 = p_t * (p_t / p_s).log()
    out0 = generalized_jsd(s, t, beta=0.0, clip=clip, reduction="sum")
    torch.testing.assert_close(out0, c0.clamp(max=clip).sum())
    assert out0 < 0


def test_clip_gradient_comes_only_from_uncapped_entries():
    s, t = _logit_pair(2, 3, 10, scale=3.0, dtype=torch.float64)
    s = s.requires_grad_()
    generalized_jsd(s, t, beta=0.5, clip=1e-3, reduction="sum").backward()
    capped_grad = s.grad.clone()
    s.grad = None
    generalized_jsd(s, t, beta=0.5, reduction="sum").backward()
    assert not torch.allclose(capped_grad, s.grad)
    assert capped_grad.abs().sum() < s.grad.abs().sum()


# ------------------------------------------------------------------------------------------
# TRL's GKD loss as a dev-only reference


@pytest.fixture(scope="module")
def trl_jsd():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for module in ("trl.trainer.gkd_trainer", "trl.experimental.gkd.gkd_trainer"):  # it moved in TRL 1.x
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module(module).GKDTrainer.generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    pytest.skip("TRL's GKDTrainer.generalized_jsd_loss not found")


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_matches_trl_per_token(trl_jsd, beta):
    s, t = _logit_pair(3, 5, 64)
    ours = generalized_jsd(s, t, beta=beta, reduction="none")
    theirs = trl_jsd(s, t, beta=beta, reduction="none").sum(-1)  # TRL's "none" is per (token, vocab entry)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # TRL divides by the temperature but does not multiply by its square
    hot = generalized_jsd(s, t, beta=beta, temperature=2.0, reduction="none") / 4.0
    torch.testing.assert_close(
        hot, trl_jsd(s, t, beta=beta, temperature=2.0, reduction="none").sum(-1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_gradient_and_top_k(trl_jsd, beta):
    s, t = _logit_pair(12, 64, seed=5)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = generalized_jsd(s1, t, beta=beta, reduction="token_mean")
    theirs = trl_jsd(s2, t, beta=beta, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    assert_rel_close(s1.grad, s2.grad)
    # top-k: TRL applied to logits gathered at the teacher's top-k ids (the reference code's way)
    ids = t.topk(8, dim=-1).indices
    theirs_k = trl_jsd(s.gather(-1, ids), t.gather(-1, ids), beta=beta, reduction="none").sum(-1)
    torch.testing.assert_close(
        generalized_jsd(s, t, beta=beta, top_k=8, reduction="none"), theirs_k, rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------------
# fused == plain


def _head_problem(seed: int = 0, b: int = 3, t: int = 7, h: int = 16, v: int = 128, with_bias: bool = True):
    hs = _randn(b, t, h, seed=seed)
    ht = hs + _randn(b, t, h, seed=seed + 1, scale=0.7)
    w = _randn(v, h, seed=seed + 2, scale=0.6)
    bias = _randn(v, seed=seed + 3) if with_bias else None
    mask = _lengths_mask([7, 3, 5][:b], t)
    return hs, ht, w, bias, mask


FUSED_CONFIGS = [
    dict(),
    dict(beta=0.25, clip=0.01),
    dict(top_k=3),  # sparse student side (3 * 32 <= 128)
    dict(top_k=40, clip=0.05),  # dense top-k path
    dict(beta=0.0, clip=0.05, top_k=4),
    dict(beta=1.0, top_k=40),
    dict(beta=0.0),
    dict(beta=1.0, clip=0.02),
    dict(temperature=2.0, top_k=3, clip=0.02),
    dict(temperature=0.7, separate_teacher_head=True),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fused_matches_plain_values_and_gradients(reduction, config):
    config = dict(config)
    separate = config.pop("separate_teacher_head", False)
    hs, ht, w, bias, mask = _head_problem()
    w_t = w + _randn(*w.shape, seed=9, scale=0.1) if separate else w
    b_t = bias + 0.1 if separate else bias
    upstream = _randn(*mask.shape, seed=11) if reduction == "none" else torch.tensor(1.0)

    def run(fused: bool):
        leaves = [x.clone().requires_grad_() for x in (hs, w, bias)]
        h_, w_, b_ = leaves
        if fused:
            out = fused_linear_generalized_jsd(
                h_,
                ht,
                w_,
                b_,
                mask=mask,
                reduction=reduction,
                chunk_size=4,
                **config,
                **(dict(teacher_weight=w_t, teacher_bias=b_t) if separate else {}),
            )
        else:
            teacher_logits = ht @ (w_t if separate else w).T + (b_t if separate else bias)
            out = generalized_jsd(h_ @ w_.T + b_, teacher_logits, mask=mask, reduction=reduction, **config)
        (out * upstream).sum().backward()
        return out.detach(), [x.grad for x in leaves]

    value, grads = run(fused=True)
    ref_value, ref_grads = run(fused=False)
    assert_rel_close(value, ref_value)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_rel_close(g, ref)


def test_fused_flat_inputs_top_k_vocabulary_and_chunk_sizes():
    hs, ht, w, bias, _ = _head_problem(seed=4)
    hs, ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])  # (N, H) = (21, 16)
    reference = generalized_jsd(hs @ w.T + bias, ht @ w.T + bias, reduction="none")
    for chunk in (1, 5, 21, 100, None):
        for top_k in (None, 128):  # top_k = V takes the dense gather / scatter path
            out = fused_linear_generalized_jsd(hs, ht, w, bias, reduction="none", top_k=top_k, chunk_size=chunk)
            assert_rel_close(out, reference)


def test_fused_bf16_inputs_never_negative_and_close_to_float32():
    hs, ht, w, _, mask = _head_problem(seed=6, v=256)
    ht = hs + 0.01 * ht  # nearly identical distributions: where round-off could go negative
    for beta in (0.0, 0.5, 1.0):
        for top_k in (None, 4):
            out = fused_linear_generalized_jsd(
                hs.bfloat16(), ht.bfloat16(), w.bfloat16(), beta=beta, top_k=top_k, mask=mask, reduction="none"
            )
            assert out.dtype == torch.float32 and (out >= 0).all()
            ref = fused_linear_generalized_jsd(
                hs.bfloat16().float(),
                ht.bfloat16().float(),
                w.bfloat16().float(),
                beta=beta,
                top_k=top_k,
                mask=mask,
                reduction="none",
            )
            torch.testing.assert_close(out, ref)  # logits are formed in float32, not rounded to bf16


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [None, 8])
def test_plain_bf16_inputs_never_negative(beta, top_k):
    for seed in range(5):
        s = _randn(4, 9, 300, seed=seed, scale=3.0)
        t = s + _randn(4, 9, 300, seed=seed + 50, scale=1e-3 * seed)
        out = generalized_jsd(s.bfloat16(), t.bfloat16(), beta=beta, top_k=top_k, reduction="none")
        assert out.dtype == torch.float32
        assert (out >= 0).all()


def test_teacher_never_gets_gradient():
    s, t = _logit_pair(2, 3, 20)
    s.requires_grad_()
    t.requires_grad_()
    for beta in (0.0, 0.5, 1.0):
        generalized_jsd(s, t, beta=beta, top_k=5, clip=0.1).backward()
    assert t.grad is None and s.grad is not None

    hs, ht, w, bias, mask = _head_problem()
    hs, ht, w = hs.requires_grad_(), ht.requires_grad_(), w.requires_grad_()
    w_t, b_t = w.detach().clone().requires_grad_(), bias.clone().requires_grad_()
    for reduction in ("none", "token_mean"):
        out = fused_linear_generalized_jsd(
            hs, ht, w, mask=mask, reduction=reduction, teacher_weight=w_t, teacher_bias=b_t
        )
        out.sum().backward()
    assert ht.grad is None and w_t.grad is None and b_t.grad is None
    assert hs.grad is not None and w.grad is not None


def test_padded_vocabulary_rows_are_excluded():
    s, t = _logit_pair(2, 4, 30)
    pad = torch.full((2, 4, 6), 25.0)  # padded head rows with large logits: must not count as logit 0 or 25
    s_pad = torch.cat([s, pad], -1).requires_grad_()
    t_pad = torch.cat([t, pad - 3.0], -1)
    for kw in (dict(), dict(top_k=5), dict(beta=0.0, clip=0.05)):
        ref = generalized_jsd(s, t, reduction="none", **kw)
        out = generalized_jsd(s_pad, t_pad, vocab_size=30, reduction="none", **kw)
        torch.testing.assert_close(out, ref)
        s_inf, t_inf = s_pad.detach().clone(), t_pad.clone()
        s_inf[..., 30:] = -float("inf")
        t_inf[..., 30:] = -float("inf")
        torch.testing.assert_close(generalized_jsd(s_inf, t_inf, reduction="none", **kw), ref)
        out.sum().backward()
        assert (s_pad.grad[..., 30:] == 0).all()
        s_pad.grad = None

    hs, ht, w, bias, mask = _head_problem(v=64)
    w_pad = torch.cat([w, torch.full((8, w.shape[1]), 3.0)]).requires_grad_()
    b_pad = torch.cat([bias, torch.full((8,), 10.0)])
    ref = generalized_jsd(hs @ w.T + bias, ht @ w.T + bias, mask=mask)
    out = fused_linear_generalized_jsd(hs, ht, w_pad, b_pad, mask=mask, vocab_size=64)
    assert_rel_close(out, ref)
    out.backward()
    assert (w_pad.grad[64:] == 0).all() and (w_pad.grad[:64] != 0).any()


def test_minus_inf_logits_are_probability_zero_without_nan():
    s, t = _logit_pair(2, 3, 12, dtype=torch.float64)
    banned = torch.zeros(12, dtype=torch.bool)
    banned[[2, 7]] = True
    for beta in (0.0, 0.5, 1.0):
        # -inf at the same entries on both sides == those entries do not exist
        s_inf = s.masked_fill(banned, -float("inf")).requires_grad_()
        t_inf = t.masked_fill(banned, -float("inf"))
        out = generalized_jsd(s_inf, t_inf, beta=beta, reduction="none")
        torch.testing.assert_close(out, generalized_jsd(s[..., ~banned], t[..., ~banned], beta=beta, reduction="none"))
        out.sum().backward()
        assert torch.isfinite(s_inf.grad).all() and (s_inf.grad[..., banned] == 0).all()
    # -inf on the student side only: the JSD stays finite with finite gradients
    s_only = s.masked_fill(banned, -float("inf")).requires_grad_()
    out = generalized_jsd(s_only, t, beta=0.5, reduction="none")
    assert torch.isfinite(out).all() and (out <= math.log(2)).all()
    out.sum().backward()
    assert torch.isfinite(s_only.grad).all()
    # KL(p_T || p_S) with teacher mass where the student has none: infinite in exact arithmetic,
    # a huge finite value here; clip bounds it with finite gradients
    assert (generalized_jsd(s_only.detach(), t, beta=0.0, reduction="none") > 1e20).all()
    s_only.grad = None
    clipped = generalized_jsd(s_only, t, beta=0.0, clip=0.05, reduction="none")
    assert torch.isfinite(clipped).all()
    clipped.sum().backward()
    assert torch.isfinite(s_only.grad).all()


# ------------------------------------------------------------------------------------------
# normalisation across micro-batches and ranks


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_gradient_is_independent_of_the_micro_batch_split(fused, reduction):
    b, t, h, v = 6, 5, 8, 48
    hs = _randn(b, t, h, seed=1)
    ht = hs + _randn(b, t, h, seed=2, scale=0.5)
    w0 = _randn(v, h, seed=3)
    mask = _lengths_mask([5, 1, 3, 0, 4, 2], t)
    count = global_token_count if reduction == "token_mean" else global_sequence_count

    def grads(splits: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
        hs_leaf, w = hs.clone().requires_grad_(), w0.clone().requires_grad_()
        normalizer = count([mask[sl] for sl in splits])
        for sl in splits:  # gradient accumulation: one backward per micro-batch
            if fused:
                loss = fused_linear_generalized_jsd(
                    hs_leaf[sl], ht[sl], w, mask=mask[sl], reduction=reduction, normalizer=normalizer, top_k=6
                )
            else:
                loss = generalized_jsd(
                    hs_leaf[sl] @ w.T, ht[sl] @ w.T, mask=mask[sl], reduction=reduction, normalizer=normalizer, top_k=6
                )
            loss.backward()
        return hs_leaf.grad, w.grad

    whole = grads([slice(0, 6)])
    split = grads([slice(0, 1), slice(1, 4), slice(4, 6)])
    for a, c in zip(whole, split, strict=True):
        assert_rel_close(a, c, rtol=1e-6)
    # and "token_mean" with the global count is exactly "sum" / count
    if reduction == "token_mean" and not fused:
        n = global_token_count(mask)
        torch.testing.assert_close(
            generalized_jsd(hs @ w0.T, ht @ w0.T, mask=mask, normalizer=n),
            generalized_jsd(hs @ w0.T, ht @ w0.T, mask=mask, reduction="sum") / n,
        )


def test_global_counts_local():
    masks = [_lengths_mask([3, 0], 4), _lengths_mask([4, 1, 2], 4)]
    assert global_token_count(masks).item() == 10
    assert global_sequence_count(masks).item() == 4
    assert global_token_count(masks[1]).item() == 7
    with pytest.raises(ValueError):
        global_token_count([])


def test_global_counts_all_reduce_when_distributed(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        masks = [_lengths_mask([3, 0], 4), _lengths_mask([4, 1], 4)]
        assert global_token_count(masks).item() == 8  # summed over the one rank
        assert global_sequence_count(masks).item() == 3
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# sampled-token estimator of the reverse KL


def test_sampled_token_value_and_gradient_per_token():
    ls = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]])).requires_grad_()
    lt = torch.log(torch.tensor([[0.4, 0.4, 0.8], [0.3, 0.1, 0.5]])).requires_grad_()
    mask = _lengths_mask([3, 2], 3)
    out = sampled_token_reverse_kl(ls, lt, mask, reduction="sum")
    torch.testing.assert_close(out, ((ls - lt) * mask).sum())  # value: log p_S - log p_T on the sampled tokens
    out.backward()
    advantage = (lt - ls).detach()
    torch.testing.assert_close(ls.grad, -advantage * mask)  # gradient: REINFORCE with reward A
    assert lt.grad is None


def test_sampled_token_gradient_is_unbiased_for_reverse_kl():
    """E_{y ~ p_S}[grad of the surrogate at y] == grad KL(p_S || p_T), by exact enumeration."""
    theta = _randn(6, seed=7, dtype=torch.float64).requires_grad_()
    teacher_logp = torch.log_softmax(_randn(6, seed=8, dtype=torch.float64), -1)
    student_logp = torch.log_softmax(theta, -1)
    expected_grad, expected_value = torch.zeros_like(theta), 0.0
    for y in range(6):
        loss = sampled_token_reverse_kl(student_logp[y].view(1, 1), teacher_logp[y].view(1, 1), reduction="sum")
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        weight = student_logp[y].exp().detach()
        expected_grad += weight * g
        expected_value += weight * loss.detach()
    reverse_kl = (student_logp.exp() * (student_logp - teacher_logp)).sum()
    (true_grad,) = torch.autograd.grad(reverse_kl, theta)
    torch.testing.assert_close(expected_grad, true_grad)
    torch.testing.assert_close(expected_value, reverse_kl.detach())


# ------------------------------------------------------------------------------------------
# argument checks


def test_bad_arguments_fail_loudly():
    s, t = _logit_pair(2, 3, 10)
    for kwargs in (
        dict(beta=-0.1),
        dict(beta=1.5),
        dict(temperature=0.0),
        dict(top_k=0),
        dict(clip=0.0),
        dict(reduction="mean"),
        dict(reduction="sum", normalizer=4),
        dict(reduction="none", normalizer=4),
        dict(mask=torch.ones(3, 2, dtype=torch.bool)),
    ):
        with pytest.raises(ValueError):
            generalized_jsd(s, t, **kwargs)
    with pytest.raises(ValueError):
        generalized_jsd(s, t[..., :9])
    hs, ht, w, bias, _ = _head_problem()
    with pytest.raises(ValueError):
        fused_linear_generalized_jsd(hs, ht, w, chunk_size=0)
    with pytest.raises(ValueError):
        fused_linear_generalized_jsd(hs, ht, w, teacher_bias=bias)
    with pytest.raises(ValueError):
        fused_linear_generalized_jsd(hs, ht, w, teacher_weight=w[:10])


def test_fused_under_no_grad_computes_the_value_only():
    hs, ht, w, bias, mask = _head_problem()
    hs, w = hs.requires_grad_(), w.requires_grad_()
    with_grad = fused_linear_generalized_jsd(hs, ht, w, bias, mask=mask, top_k=3)
    with torch.no_grad():
        value = fused_linear_generalized_jsd(hs, ht, w, bias, mask=mask, top_k=3)
    assert not value.requires_grad
    torch.testing.assert_close(value, with_grad.detach())
