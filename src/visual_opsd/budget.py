"""Resource budgets checked before a run allocates anything large: sequence length and memory.

`limits.max_sequence_tokens` bounds context + completion tokens of any scored row (the longest
teacher context of the training set plus `rollout.max_new_tokens`); `limits.max_memory_gb` bounds
an estimate of one process's peak: weights, gradients, AdamW state, the teacher's shadow copy,
the logits of one micro-batch (student with gradient + teacher + loss temporaries, or one chunk
with `loss.fused`) and the activations kept for backward. A run over budget stops with a
`BudgetError` that prints every term, so the user sees which knob to turn. Both are off (null) by
default; the estimate is rough by design (within a small factor), see docs/scale.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from visual_opsd.errors import BudgetError

GIB = 1024**3
ACTIVATION_FLOATS_PER_TOKEN_LAYER = 16  # x d_model: q, k, v, attention out, MLP in/out, norms (rough)
LOGIT_COPIES = 4  # student logits, their gradient, teacher logits, JSD temporaries (fp32)


@dataclass
class LimitsConfig:
    max_sequence_tokens: int | None = field(
        default=None, metadata={"help": "fail early if context + completion tokens of a row could exceed this"}
    )
    max_memory_gb: float | None = field(
        default=None, metadata={"help": "fail early if the estimated peak memory of one process exceeds this (GiB)"}
    )

    def __post_init__(self) -> None:
        if self.max_sequence_tokens is not None and self.max_sequence_tokens < 1:
            raise ValueError(f"limits.max_sequence_tokens must be >= 1 or null, got {self.max_sequence_tokens}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ValueError(f"limits.max_memory_gb must be > 0 or null, got {self.max_memory_gb}")


def model_dims(model: torch.nn.Module) -> tuple[int, int, int]:
    """(vocabulary rows, width, layers) of a causal LM, read from its output head and config."""
    head = None
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    head = head if head is not None else getattr(model, "lm_head", None)
    vocab, width = tuple(head.weight.shape) if head is not None else (0, 0)
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    layers = getattr(config, "n_layers", None) or getattr(config, "num_hidden_layers", None) or 1
    return int(vocab), int(width), int(layers)


def longest_sequence(backend: Any, samples: list, max_new_tokens: int) -> tuple[int, str]:
    """An upper bound of context + completion tokens over `samples` and its worst sample id.

    Teacher contexts are built with the sample's own VTs; for the `shuffled` control another
    sample's VTs may be longer, so the bound adds the largest teacher-over-student excess."""
    worst_student, worst_excess, worst_id = 0, 0, ""
    for s in samples:
        n_student = backend.build_context(s, "student").num_tokens
        n_teacher = backend.build_context(s, "teacher", "data").num_tokens
        if n_student > worst_student:
            worst_student, worst_id = n_student, s.id
        worst_excess = max(worst_excess, n_teacher - n_student)
    return worst_student + worst_excess + max_new_tokens, worst_id


def memory_estimate(model: torch.nn.Module, rows: int, seq: int, completion: int, teacher_copy: bool,
                    fused: bool) -> dict[str, float]:
    """Estimated bytes of one process's peak, per term (rows = completions per micro-batch)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    t_bytes = sum(p.numel() * p.element_size() for p in trainable)
    vocab, width, layers = model_dims(model)
    terms = {
        "weights": n_bytes,
        "gradients": t_bytes,
        "optimizer (AdamW, 2 states)": 2 * t_bytes,
        "teacher shadow": t_bytes if teacher_copy else 0,
        "activations": rows * seq * width * layers * ACTIVATION_FLOATS_PER_TOKEN_LAYER * 4,
    }
    if fused:  # one chunk of rows x vocab at a time; hidden states of both sides kept
        terms["logits (fused, chunked)"] = 2 * rows * completion * width * 4 + LOGIT_COPIES * 1024 * vocab * 4
    else:
        terms["logits"] = LOGIT_COPIES * rows * completion * vocab * 4
    return {k: float(v) for k, v in terms.items()}


def check_budget(cfg: Any, backend: Any, samples: list, rows: int) -> None:
    """Raise `BudgetError` with the numbers if `cfg.limits` would be exceeded (no-op when unset)."""
    limits = cfg.limits
    if limits.max_sequence_tokens is None and limits.max_memory_gb is None:
        return
    seq, worst = longest_sequence(backend, samples, cfg.rollout.max_new_tokens)
    if limits.max_sequence_tokens is not None and seq > limits.max_sequence_tokens:
        raise BudgetError(
            f"sequence budget exceeded: up to {seq} tokens per row (longest context, sample {worst!r}, plus "
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}) > limits.max_sequence_tokens="
            f"{limits.max_sequence_tokens}. Lower rollout.max_new_tokens, shrink images, or filter long samples."
        )
    if limits.max_memory_gb is not None:
        terms = memory_estimate(backend.model, rows, seq, cfg.rollout.max_new_tokens,
                                teacher_copy=cfg.teacher.mode != "live", fused=cfg.loss.fused)
        total = sum(terms.values())
        if total > limits.max_memory_gb * GIB:
            detail = ", ".join(f"{k} {_size(v)}" for k, v in terms.items())
            raise BudgetError(
                f"memory budget exceeded: estimated peak {_size(total)} per process > limits.max_memory_gb="
                f"{limits.max_memory_gb} GiB ({detail}; {rows} completions per micro-batch, {seq} tokens per row). "
                "Raise optim.grad_accum or use more processes, set loss.fused=true, or lower rollout.max_new_tokens."
            )


def memory_gib(device: torch.device) -> dict[str, float]:
    """This process's memory for the metrics: resident set now and its peak so far (host) and, on a
    GPU, the CUDA allocator's now and peak."""
    import resource
    import sys

    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"memory/rss_gib": psutil.Process().memory_info().rss / GIB,
           "memory/peak_rss_gib": peak / (GIB if sys.platform == "darwin" else 1024**2)}
    if device.type == "cuda":
        out["memory/cuda_gib"] = torch.cuda.memory_allocated(device) / GIB
        out["memory/peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def _size(n_bytes: float) -> str:
    """Bytes in the largest unit that keeps 3 significant digits readable (KiB .. GiB)."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes / 1024:.1f} KiB"
