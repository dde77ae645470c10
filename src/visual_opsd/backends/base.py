"""The backend interface: what every model family provides to the generic Visual-OPSD code.

A backend turns samples into contexts and runs one network on them. Generic code (rollouts, the
distillation loop, diagnostics, evaluation) sees contexts as opaque objects and completions as
lists of token ids; it never re-tokenises text, so the teacher scores exactly the student's ids.

    build_context(sample, role, vt_mode)   -> Context    student: question + problem images;
                                                          teacher: + framing + VT images + transition
    score(contexts, completions)           -> Scores     logits (or hidden + head) per completion token
    sample(contexts, n, ...)               -> [Completion] on-policy rollouts, image-skip injection
    generate_interleaved(contexts, ...)    -> [Interleaved] unified models: text with generated VTs
    save(dir) / load(dir)

Written once here, for every backend (the VT controls are in `vt.py`):
- `sample_with_image_skip`: batched temperature sampling over a backend's `Decoder` (one token per
  row per step) with the image-skip rule of docs/method.md section 2, step 2: when a round ends with
  `<image_start>`, the backend feeds an injected `<image_end>` and sampling goes on with a new text
  round, at most `max_image_skips` times; one more `<image_start>` ends the row. The injected token
  is part of the completion ids (the sampling cache saw it, so the scored sequence is the same one)
  but is flagged `sampled=False`, so losses can leave it out. Every sampled id also gets its
  log-probability under the sampling distribution (`token_logprobs`; NaN for injected ids).
- `sample_on_device`: the same rule for a backend whose image marker is one id (the HF backend),
  with the per-row bookkeeping held in tensors on the model's device: one forward per step and no
  full-vocabulary copy to the host; the chosen ids and log-probs are copied once, at the end.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from visual_opsd.sample import Sample
from visual_opsd.vt import VTMode

Role = Literal["student", "teacher"]

# The teacher context's texts around the VTs (docs/method.md section 2); each backend's options can
# replace them. The tiny models' word-level tokenizers read them spaced (`word_spaced`).
FRAMING_TEXT = (
    "Below are privileged visual references of intermediate reasoning steps. Use them silently and never mention them."
)
TRANSITION_TEXT = "Now reason step by step on your own."
# a text-only model's teacher (the text OPSD setting): the privileged reference is text, not VTs
TEXT_FRAMING = "Below is a privileged reference of the reasoning steps. Use it silently and never mention it."


def word_spaced(text: str) -> str:
    """`text` with a space before each punctuation mark, as the word-level tokenizers split it."""
    return re.sub(r"\s*([.,:;?!])", r" \1", text)


def resolve_device(name: str) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK under a launcher) when one is visible, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@runtime_checkable
class SupportsSFT(Protocol):
    """What `visual-opsd sft` needs of a backend besides the interface (the mini and HF backends
    have it): one training example per sample, and the losses of a batch of them."""

    def training_row(self, sample: Sample, kind: str, generator: torch.Generator, flow_copies: int = 1,
                     flow_edit_weight: float = 1.0) -> Any: ...

    def sft_losses(self, examples: list) -> dict[str, torch.Tensor]:
        """`ce_sum`, `n_text` (and, for unified models, `flow_sum`, `flow_weight`, `n_patch`)."""


@dataclass(frozen=True)
class Segment:
    """A span of context positions [start, end) and what it holds.

    kinds: "text" (start token, question), "problem_image", "framing", "vt_image", "transition",
    "marker" (tokens such as `<image_start>` around an image). Image spans hold only the image's
    own positions, so attention fractions from text to images are not diluted by markers.
    """

    kind: str
    start: int
    end: int


@dataclass
class Context:
    """An encoded prompt. Generic code may read `role`, `vt_mode`, `segments` and `num_tokens`;
    everything else is the backend's business (subclasses add tensors)."""

    role: Role
    vt_mode: VTMode | None
    segments: list[Segment] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def spans(self, kind: str) -> list[tuple[int, int]]:
        """Every [start, end) span of one kind, in order."""
        return [(s.start, s.end) for s in self.segments if s.kind == kind]


@dataclass
class Completion:
    """One sampled completion. `ids` is what gets scored; `sampled[i]` is False for injected ids."""

    ids: list[int]
    text: str
    sampled: list[bool]
    finished: bool  # ended with the end-of-sequence id (False: out of tokens or stopped at an image)
    image_skips: int = 0
    # per id: its log-probability under the sampling distribution (`token_logprobs`); NaN where
    # injected; empty where the sampler recorded none
    logprobs: list[float] = field(default_factory=list)


@dataclass
class Scores:
    """Per-completion-token outputs of `score`, right-padded to the longest completion T.

    Position t holds the prediction *of* completion token t (made at the position before it), so
    the last valid position predicts the end-of-sequence id when the completion ends with it.
    """

    mask: torch.Tensor  # (B, T) bool, from lengths (never from token values: pad may equal eos)
    logits: torch.Tensor | None = None  # (B, T, V)  with output="logits"
    hidden: torch.Tensor | None = None  # (B, T, D)  with output="hidden": logits = hidden @ head_weight.T
    head_weight: torch.Tensor | None = None  # (V, D)
    # output_attentions=True: attentions[b][layer] is (H, S_b, S_b) over row b's context followed by
    # its completion (S_b = context tokens + completion tokens; the context's segments index it).
    attentions: list[list[torch.Tensor]] | None = None


@dataclass
class Interleaved:
    """One interleaved generation: the text (VTs written as `<image_start><image_end>`), its ids,
    and the VT images that were fed back, in order."""

    text: str
    ids: list[int]
    images: list[Image.Image]
    finished: bool


class Decoder(ABC):
    """A batch of contexts being decoded one token per row per step (a KV cache, typically).

    `logits` (B, V) always holds every row's next-token logits; `step(ids, active)` feeds one id per
    row and refreshes them. Rows with `active[b] == False` must be left unchanged in effect.
    """

    logits: torch.Tensor

    @abstractmethod
    def step(self, ids: torch.Tensor, active: torch.Tensor) -> None:
        """Feed `ids` (B,) for the rows where `active` (B,) is True."""


class Backend(ABC):
    """A model family behind the interface. `model` is the nn.Module the optimizer trains; every
    method that runs the network takes `model=` to run another copy instead (an EMA or frozen
    teacher), which must have the same architecture."""

    model: nn.Module
    eos_id: int
    image_start_id: int
    image_end_id: int
    suppressed_ids: tuple[int, ...] = ()  # ids never sampled (pad, bos, unk, image placeholders)
    # FSDP2 may shard `model` (distributed.py): every gradient-carrying network call goes through
    # `model`'s forward (or `distributed.in_forward`), so FSDP gathers the weights for it and
    # reduces what it computes
    supports_sharding: bool = False
    # LoRA backends: a context manager factory in which the model is its base model (adapters off),
    # the frozen teacher without a copy (`teacher.py`); None for the others
    adapters_disabled: Any = None

    @property
    @abstractmethod
    def cell_px(self) -> int:
        """Pixels per maze cell that give the model one image patch / token per cell (tasks render
        their images at this size for this backend)."""

    @abstractmethod
    def build_context(
        self,
        sample: Sample,
        role: Role = "student",
        vt_mode: VTMode = "data",
        shuffled_from: Sample | None = None,
        generator: torch.Generator | None = None,
    ) -> Context:
        """The student context (question + problem images) or the teacher context (student context
        + framing text + VT images per `vt_mode` + transition text). The completion follows either
        directly, with identical ids. `generator` draws the noise of `vt_mode="noise"`."""

    @abstractmethod
    def score(
        self,
        contexts: list[Context],
        completions: list[list[int]],
        *,
        model: nn.Module | None = None,
        output: Literal["logits", "hidden"] = "logits",
        output_attentions: bool = False,
    ) -> Scores:
        """Score completions under contexts. `len(completions)` is a multiple g of `len(contexts)`:
        completions [i*g, (i+1)*g) belong to context i. The mini and BAGEL backends encode each
        context's prefix once and reuse it for its g completions; the HF backend does so without
        gradient (the teacher) and runs every context + completion row in full with gradient. Gradient
        flows when called under grad mode (student) and not under torch.no_grad (teacher)."""

    def completion_room(self, context: Context) -> int | None:
        """Most completion tokens `score` takes after `context` (None: no limit); a backend with a
        length limit cuts the rest. Training cuts every completion once to the room of its longest
        context (the teacher's), so that both sides score the very same ids (`rollout.fit_rollout`)."""
        return None

    def disable_dropout(self) -> None:
        """Turn dropout off in `model` for good (p = 0 in every dropout layer). Visual-OPSD scores the
        student with gradients and must score the policy that sampled (sampling runs without
        dropout); a switch for the forward alone would not reach gradient checkpointing's
        recomputation in backward. (The mini and BAGEL models have no dropout layers.)"""
        for module in self.model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0

    @abstractmethod
    def decoder(self, contexts: list[Context], n: int = 1, model: nn.Module | None = None) -> Decoder:
        """A `Decoder` over `len(contexts) * n` rows, context-major (row i*n + j is context i);
        each context's prefix is encoded once."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Token ids to text (markers kept, pad/bos/eos dropped)."""

    @abstractmethod
    def encode_completion(self, text: str) -> list[int]:
        """A completion text (e.g. a data trace) as the ids a sampler would have produced, ending
        with end-of-sequence: the deterministic rollout mode scores these."""

    def sample(
        self,
        contexts: list[Context],
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        max_image_skips: int = 1,
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
    ) -> list[Completion]:
        """`n` completions per context, context-major (index i*n + j), with image-skip injection.
        temperature 0 is greedy decoding."""
        dec = self.decoder(contexts, n, model)
        return sample_with_image_skip(self, dec, max_new_tokens, temperature, max_image_skips, generator=generator)

    def generate_interleaved(
        self,
        contexts: list[Context],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        vt_steps: int = 50,
        max_images: int = 1,
        given_vts: list[list[Image.Image]] | None = None,
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
    ) -> list[Interleaved]:
        """Unified models only: decode text; at each `<image_start>` generate a VT (`vt_steps`
        denoising steps), feed it back and go on. `given_vts[i]` instead inserts those images (the
        ground-truth-VT condition)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate images")

    def build_trace_context(self, sample: Sample, ids: list[int], images: list[Image.Image]) -> Context:
        """Unified models only, for diagnostics: the student context followed by an interleaved trace
        prefix, as one context that a completion (the rest of the trace) can be scored under.

        `ids` are trace ids as `generate_interleaved` writes them (a VT is `<image_start><image_end>`);
        the k-th such pair holds `images[k]` as an understanding image block, exactly as the model saw
        it while generating; pairs beyond `len(images)` (image skips) stay empty. Segments: the student
        context's, then "trace_text" for runs of generated text, "marker" for the image markers and
        "vt_image" for each VT's own positions."""
        raise NotImplementedError(f"{type(self).__name__} cannot build interleaved trace contexts")

    @abstractmethod
    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Weights (safetensors) + config/tokenizer (JSON) into `directory`. `state`: whole weights
        to write instead of the module's own (gathered from an FSDP2-sharded run; only backends
        with `supports_sharding` get one)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> Backend:
        """The inverse of `save`; never unpickles."""


def completions_per_context(contexts: Sequence, completions: Sequence) -> int:
    """`score`'s layout check: completions come in equal groups, one group per context, in order."""
    k, m = len(contexts), len(completions)
    if k == 0 or m % k:
        raise ValueError(f"{m} completions do not split evenly over {k} contexts")
    return m // k


def next_token(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    suppressed_ids: tuple[int, ...] = (),
) -> torch.Tensor:
    """One id per row from logits (B, V): argmax at temperature 0, else softmax(logits / T) sampling
    (no top-k / top-p, as in the paper). Suppressed ids get probability 0."""
    logits = logits.float()
    if suppressed_ids:
        logits = logits.clone()
        logits[:, list(suppressed_ids)] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B, 1) -> (B,)


def _sampling_logits(logits: torch.Tensor, temperature: float, suppressed_ids: tuple[int, ...]) -> torch.Tensor:
    """float32 logits (B, V) of the distribution the samplers draw from: suppressed ids at -inf,
    divided by the temperature (greedy, temperature 0: the model's own, T = 1)."""
    z = logits.float()
    if suppressed_ids:
        z = z.index_fill(-1, torch.tensor(suppressed_ids, device=z.device), float("-inf"))  # a copy
    return z / temperature if temperature > 0 else z


def token_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float, suppressed_ids: tuple[int, ...] = ()
) -> torch.Tensor:
    """(B,) float32: log-probability of `ids` (B,) under the distribution `next_token` draws them
    from (softmax of logits / T without the suppressed ids; at temperature 0, T = 1). What a
    rollout records per sampled token, and what vLLM's `processed_logprobs` are."""
    z = _sampling_logits(logits, temperature, suppressed_ids)
    return z.gather(-1, ids.to(z.device)[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    suppressed_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B,), their log-probs (B,)) drawn on the logits' device from the distribution of
    `next_token`, by inversion: one uniform per row against the cumulative sum (float64) of the
    unnormalised probabilities. Exact, and cheaper than `torch.multinomial`, which draws a random
    number per vocabulary entry (a (B, V) draw per token, most of a CPU step's sampling time).
    `generator` must draw on the logits' device (`device_generator`)."""
    z = _sampling_logits(logits, temperature, suppressed_ids)
    top = z.amax(-1, keepdim=True)  # (B, 1)
    e = torch.exp(z - top)  # (B, V) unnormalised probabilities, 0 at suppressed ids
    lse = top.squeeze(-1) + torch.log(e.sum(-1))  # (B,)
    if temperature == 0:
        ids = z.argmax(-1)
    else:
        cdf = e.cumsum(-1, dtype=torch.float64)  # (B, V)
        total = cdf[:, -1:].contiguous()
        u = torch.rand(total.shape, generator=generator, device=z.device, dtype=torch.float64) * total
        # the first entry whose cumulative mass exceeds u (so never one of probability 0); u * total
        # may round up to total itself: then the last entry of positive probability
        ids = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total)).squeeze(-1)
    return ids, z.gather(-1, ids[:, None]).squeeze(-1) - lse


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`generator` where it draws on `device`; else a generator on `device` seeded by one draw from
    it, so a run stays reproducible from the caller's CPU seed (None: torch's default stream)."""
    if generator is None or torch.device(generator.device) == torch.device(device):
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def sample_with_image_skip(
    backend: Backend,
    dec: Decoder,
    max_new_tokens: int,
    temperature: float,
    max_image_skips: int,
    generator: torch.Generator | None = None,
    *,
    injection: Sequence[int] | None = None,
    ends_round: Callable[[list[int]], bool] | None = None,
) -> list[Completion]:
    """Sample every row of `dec` to end-of-sequence or `max_new_tokens` (injected ids count).

    Per row: when the text round so far `ends_round` (default: its last id is `<image_start>`), the
    row has skips left and goes on after the `injection` ids (default: `<image_end>`), fed one per
    step and flagged sampled=False; with no skips left it stops there. A backend whose image
    marker is plain text spanning several ids (BAGEL) passes its own `ends_round` and `injection`.
    """
    injection = [backend.image_end_id] if injection is None else list(injection)
    if ends_round is None:
        ends_round = lambda round_ids: round_ids[-1] == backend.image_start_id  # noqa: E731
    rows = dec.logits.shape[0]
    ids: list[list[int]] = [[] for _ in range(rows)]
    sampled: list[list[bool]] = [[] for _ in range(rows)]
    pending: list[list[int]] = [[] for _ in range(rows)]  # injected ids still to feed, per row
    round_start = [0] * rows  # where each row's current text round begins
    skips, finished = [0] * rows, [False] * rows
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    active = torch.ones(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        tok = next_token(dec.logits, temperature, generator, backend.suppressed_ids).cpu()
        # computed from the same logits after the draw: the random stream is untouched
        lp = token_logprobs(dec.logits, tok, temperature, backend.suppressed_ids).cpu().tolist()
        for b in torch.nonzero(active).flatten().tolist():
            forced = bool(pending[b])
            t = pending[b].pop(0) if forced else int(tok[b])
            tok[b] = t
            ids[b].append(t)
            sampled[b].append(not forced)
            logprobs[b].append(float("nan") if forced else lp[b])
            if forced:
                if not pending[b]:
                    round_start[b] = len(ids[b])
                continue
            if t == backend.eos_id:
                finished[b] = True
                active[b] = False
            elif ends_round(ids[b][round_start[b] :]):
                if skips[b] < max_image_skips:
                    skips[b] += 1
                    pending[b] = list(injection)
                else:
                    active[b] = False
        if not active.any():
            break
        dec.step(tok, active)
    return [
        Completion(
            ids=ids[b], text=backend.decode(ids[b]), sampled=sampled[b], finished=finished[b], image_skips=skips[b],
            logprobs=logprobs[b],
        )
        for b in range(rows)
    ]


# how often (in steps) `sample_on_device` asks an accelerator whether any row is still active: each
# ask waits for the device, so the host would stop queueing work ahead of it every step
_ACTIVE_CHECK_EVERY = 8


def sample_on_device(
    backend: Backend,
    dec: Decoder,
    max_new_tokens: int,
    temperature: float,
    max_image_skips: int,
    generator: torch.Generator | None = None,
    *,
    injection: Sequence[int] | None = None,
) -> list[Completion]:
    """`sample_with_image_skip` for a backend whose image marker is one id (`image_start_id`), run
    on the device of `dec.logits` (docs/method.md section 2, step 2: the same rule, the same record).

    Every row's state (length, pending injected ids, skips, finished, active) is a tensor: a step is
    one draw (`sample_tokens`), a few element-wise updates and one `dec.step`, with no per-row Python
    and no full-vocabulary copy to the host; ids, flags and log-probs are copied once, at the end.
    `generator` (CPU) seeds a generator on the device (`device_generator`)."""
    logits = dec.logits
    device, rows = logits.device, logits.shape[0]
    inject = torch.tensor([backend.image_end_id] if injection is None else list(injection), device=device)
    k = len(inject)
    gen = device_generator(generator, device)
    ids = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.full((rows, max_new_tokens), float("nan"), device=device)
    forced_at = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
    length = torch.zeros(rows, dtype=torch.long, device=device)
    skips = torch.zeros(rows, dtype=torch.long, device=device)
    pending = torch.full((rows,), k, dtype=torch.long, device=device)  # next injected id's index; k: none
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        tok, lp = sample_tokens(dec.logits, temperature, gen, backend.suppressed_ids)
        forced = pending < k
        tok = torch.where(forced, inject[pending.clamp(max=k - 1)], tok)
        ids[:, t], logprobs[:, t], forced_at[:, t] = tok, torch.where(forced, float("nan"), lp), forced
        length += active.long()
        pending = torch.where(forced & active, pending + 1, pending)
        free = active & ~forced
        eos = free & (tok == backend.eos_id)
        image = free & (tok == backend.image_start_id)
        skip = image & (skips < max_image_skips)
        skips += skip.long()
        pending = torch.where(skip, 0, pending)
        finished |= eos
        active &= ~(eos | (image & ~skip))
        steps = t + 1
        if steps == max_new_tokens:
            break  # the last token is never fed
        if (device.type == "cpu" or steps % _ACTIVE_CHECK_EVERY == 0) and not bool(active.any()):
            break
        dec.step(tok, active)
    # rows stop for good, so each row's ids are the first `length` columns
    ids_h, lp_h, forced_h = (x[:, :steps].cpu().tolist() for x in (ids, logprobs, forced_at))
    length_h, skips_h, finished_h = length.tolist(), skips.tolist(), finished.tolist()
    out = []
    for b in range(rows):
        n = length_h[b]
        out.append(Completion(ids=ids_h[b][:n], text=backend.decode(ids_h[b][:n]),
                              sampled=[not f for f in forced_h[b][:n]], finished=finished_h[b],
                              image_skips=skips_h[b], logprobs=lp_h[b][:n]))
    return out
