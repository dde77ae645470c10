"""The built-in miniature unified model behind the backend interface (the network: `mini_model.py`).

Images. RGB images whose sides are multiples of `patch_size` (at most `max_grid` patches a side);
a larger image whose patch grid shrinks by a power of two to fit is box-downscaled by it (a maze
rendered at 64 px per cell becomes one patch per cell). Pixels are scaled to [-1, 1]. One patch
per maze cell is the intended use: render mazes with `cell_px == patch_size`.

Sequences (one `Row` each). A context is
    <bos> {<image_start> [problem image] <image_end>}* question
and the teacher's adds
    framing {<image_start> [VT image] <image_end>}* transition
after which the completion (`<think>...`) follows in both roles with identical ids. Segments name
every span (text / marker / problem_image / framing / vt_image / transition) for diagnostics.

Interleaved generation. Text is decoded with a KV cache. When `<image_start>` is emitted (and the
image budget allows), the VT is generated on the patch grid of the first problem image by rectified
flow: `vt_steps` Euler steps, each a forward of the whole GEN block (bidirectional inside) against
the cache, which it never enters. The clean image is quantised to 8-bit (as any saved image is),
fed back as an UND block followed by `<image_end>`, and text decoding goes on. Past the budget, an
`<image_start>` is treated by image skip: an injected `<image_end>` and more text.

SFT examples (`training_row`): "interleaved" = student context + the interleaved-mode instruction
(`interleaved_prompt`, which `generate_interleaved` feeds too) + interleaved trace, each VT present
as noised copies (GEN, flow loss; `flow_copies` of them, each with its own t) then clean (UND, read
by the text after it), see mini_model.py;
"text_only" = student context + text-only completion; "teacher_context" = teacher context (GT VTs)
+ text-only completion; "vt_caption" (pretraining) = the VT image alone + `CAPTION_PROMPT` +
text-only completion. Cross-entropy covers completion text only (never context or framing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from visual_opsd.backends.base import (
    FRAMING_TEXT,
    TRANSITION_TEXT,
    Backend,
    Context,
    Decoder,
    Interleaved,
    Role,
    Scores,
    Segment,
    completions_per_context,
    next_token,
    word_spaced,
)
from visual_opsd.backends.mini_model import GEN, PAD, TEXT, UND, KVCache, MiniConfig, MiniUMM, Tokens
from visual_opsd.sample import IMAGE_END, IMAGE_START, Sample
from visual_opsd.tokenizer import Tokenizer
from visual_opsd.vt import NoiseVT, VTMode, pick_vt_images

FORMAT = "visual_opsd.mini"
DEFAULT_FRAMING, DEFAULT_TRANSITION = word_spaced(FRAMING_TEXT), word_spaced(TRANSITION_TEXT)
# The mode switch of the unified model: a plain context asks for a text-only answer (the student's
# mode); this instruction after the question asks for interleaved reasoning with a drawn VT. Without
# a switch, greedy decoding could not have both modes (docs/miniature.md).
DEFAULT_INTERLEAVED_PROMPT = "Think by drawing the path on the map ."
# Pretraining (the BAGEL analogue, sft.py): describe a map with a drawn path, from the image alone
CAPTION_PROMPT = "Describe this map and the red path drawn on it ."
IGNORE = -100  # label of positions without a cross-entropy target


@dataclass
class MiniOptions:
    """How a run opens a mini-model folder (a config's `backend:` section): nothing to choose, the
    folder holds the whole model."""

    kind: Literal["mini"] = field(default="mini", metadata={"help": "backend family"})


def open_folder(path: Path, options: MiniOptions, resume: bool = False) -> MiniBackend:
    """The registry's entry (`backends/__init__.py`)."""
    return MiniBackend.load(path)


# ---------------------------------------------------------------------------------------------
# images


def fit_image(image: Image.Image, patch_size: int, max_grid: int, cells: int | None = None) -> Image.Image:
    """`image` as RGB with sides that are multiples of `patch_size`, at most `max_grid` patches a side.

    A larger image is box-downscaled by the smallest power of two that makes it fit. That gives one
    patch per cell only when the cell count allows it (a 3x3 map at 64 px per cell, 48 patches a side
    at patch_size 4, fits after halving three times, as 6x6 patches). With `cells` (the image is a
    `cells` x `cells` map, e.g. a VSP image of a level-`cells` map) each cell is instead resized on
    its own to one patch (`maze.resize_cells`, area-averaging), whatever the image's size. Any other
    image (a benchmark file's photo) is resized, aspect kept, to fit `max_grid` patches a side, each
    side a whole number of patches."""
    if cells is not None:
        from visual_opsd.tasks.maze import resize_cells  # the maze task is not needed otherwise

        if not 1 <= cells <= max_grid:
            raise ValueError(f"a {cells}x{cells} map does not fit {max_grid}x{max_grid} patches at one patch per cell")
        return resize_cells(image, cells, patch_size)
    image = image.convert("RGB")
    w, h = image.size
    if w % patch_size == 0 and h % patch_size == 0:  # our renders: exact halvings keep cells whole
        gw, gh, f = w // patch_size, h // patch_size, 1
        while gw % f == 0 and gh % f == 0:
            if gw // f <= max_grid and gh // f <= max_grid:
                return image if f == 1 else image.reduce(f)
            f *= 2
    scale = min(max_grid * patch_size / max(w, h), 1.0)
    gw, gh = (max(1, min(max_grid, round(side * scale / patch_size))) for side in (w, h))
    return image.resize((gw * patch_size, gh * patch_size), Image.Resampling.BOX)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def to_image(pixels: torch.Tensor) -> Image.Image:
    """The 8-bit image of (3, H, W) pixels in [-1, 1] (clamped)."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(arr.numpy(), "RGB")


def patchify(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, C*p*p), patches in row-major order."""
    C, H, W = pixels.shape
    x = pixels.reshape(C, H // p, p, W // p, p)  # (C, gh, p, gw, p)
    return x.permute(1, 3, 0, 2, 4).reshape((H // p) * (W // p), C * p * p)  # (gh*gw, C*p*p)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], p: int, channels: int = 3) -> torch.Tensor:
    """(gh*gw, C*p*p) -> (C, gh*p, gw*p); the inverse of `patchify`."""
    gh, gw = grid
    x = patches.reshape(gh, gw, channels, p, p)  # (gh, gw, C, p, p)
    return x.permute(2, 0, 3, 1, 4).reshape(channels, gh * p, gw * p)  # (C, gh*p, gw*p)


# ---------------------------------------------------------------------------------------------
# sequences


@dataclass
class Row:
    """One unpadded sequence; `patches` holds the pixels of its image items (UND / GEN) in order."""

    kind: torch.Tensor  # (S,)
    ids: torch.Tensor  # (S,)
    rowcol: torch.Tensor  # (S, 2)
    t: torch.Tensor  # (S,)
    block: torch.Tensor  # (S,)
    pos: torch.Tensor  # (S,)
    patches: torch.Tensor  # (N_img, P)

    def __len__(self) -> int:
        return self.kind.shape[0]


@dataclass
class RowBuilder:
    """Appends text and image blocks to a sequence, tracking positions, blocks and segments."""

    patch_size: int
    patch_dim: int
    kind: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    rowcol: list[tuple[int, int]] = field(default_factory=list)
    t: list[float] = field(default_factory=list)
    block: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    patches: list[torch.Tensor] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    next_pos: int = 0
    n_blocks: int = 0

    def text(self, ids: list[int], segment: str | None = "text") -> None:
        start = len(self.kind)
        for i in ids:
            self._item(TEXT, i, (0, 0), 0.0, -1, self.next_pos)
            self.next_pos += 1
        if segment is not None and ids:
            self.segments.append(Segment(segment, start, len(self.kind)))

    def image(
        self, pixels: torch.Tensor, kind: int = UND, t: float = 0.0, segment: str | None = None, advance: bool = True
    ) -> None:
        """An image block. `advance=False` gives the block the positions of the next one (the noised
        GEN copy of a VT sits before its clean UND twin and shares its positions)."""
        _, H, W = pixels.shape
        p = self.patch_size
        start = len(self.kind)
        for n in range((H // p) * (W // p)):
            self._item(kind, 0, divmod(n, W // p), t, self.n_blocks, self.next_pos + n)
        self.patches.append(patchify(pixels, p))
        self.n_blocks += 1
        if advance:
            self.next_pos += (H // p) * (W // p)
        if segment is not None:
            self.segments.append(Segment(segment, start, len(self.kind)))

    def _item(self, kind, tok, rc, t, block, pos) -> None:
        self.kind.append(kind)
        self.ids.append(tok)
        self.rowcol.append(rc)
        self.t.append(t)
        self.block.append(block)
        self.pos.append(pos)

    def build(self) -> Row:
        S = len(self.kind)
        return Row(
            kind=torch.tensor(self.kind, dtype=torch.long),
            ids=torch.tensor(self.ids, dtype=torch.long),
            rowcol=torch.tensor(self.rowcol, dtype=torch.long).reshape(S, 2),
            t=torch.tensor(self.t, dtype=torch.float32),
            block=torch.tensor(self.block, dtype=torch.long),
            pos=torch.tensor(self.pos, dtype=torch.long),
            patches=torch.cat(self.patches) if self.patches else torch.zeros(0, self.patch_dim),
        )


def collate(rows: list[Row], patch_dim: int, left_pad: bool) -> Tokens:
    """Pad rows to one batch (left padding for prompts that decoding continues, right otherwise)."""
    B, T = len(rows), max(1, max(len(r) for r in rows))
    out = Tokens(
        kind=torch.full((B, T), PAD, dtype=torch.long),
        ids=torch.zeros(B, T, dtype=torch.long),
        patches=torch.zeros(B, T, patch_dim),
        rowcol=torch.zeros(B, T, 2, dtype=torch.long),
        t=torch.zeros(B, T),
        block=torch.full((B, T), -1, dtype=torch.long),
        pos=torch.zeros(B, T, dtype=torch.long),
    )
    for b, r in enumerate(rows):
        s = slice(T - len(r), T) if left_pad else slice(0, len(r))
        out.kind[b, s], out.ids[b, s], out.rowcol[b, s] = r.kind, r.ids, r.rowcol
        out.t[b, s], out.block[b, s], out.pos[b, s] = r.t, r.block, r.pos
        is_img = (out.kind[b] == UND) | (out.kind[b] == GEN)
        out.patches[b, is_img] = r.patches
    return out


def text_tokens(ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, patch_dim: int) -> Tokens:
    """A batch of text items (B, T) at positions `pos` (B, T); invalid items become padding."""
    B, T = ids.shape
    return Tokens(
        kind=torch.where(valid, TEXT, PAD),
        ids=torch.where(valid, ids, 0),
        patches=torch.zeros(B, T, patch_dim),
        rowcol=torch.zeros(B, T, 2, dtype=torch.long),
        t=torch.zeros(B, T),
        block=torch.full((B, T), -1, dtype=torch.long),
        pos=pos,
    )


def _common_text_prefix(x: Tokens) -> int:
    """Length of the run of text items, from the start, that is identical in every row (at most
    T - 1, so that every row keeps an item of its own)."""
    same = (x.kind == TEXT) & (x.ids == x.ids[:1]) & (x.pos == x.pos[:1])  # (B, T)
    run = same.all(0).long().cumprod(0)  # 1 while every row still agrees
    return min(int(run.sum()), x.kind.shape[1] - 1)


def _slice(x: Tokens, rows: slice, cols: slice) -> Tokens:
    return Tokens(**{f: getattr(x, f)[rows, cols] for f in Tokens.__dataclass_fields__})


class TrainingExample(NamedTuple):
    """One SFT example: its sequence, next-token labels, and the flow targets of its GEN items."""

    row: Row
    labels: torch.Tensor  # (S,) next text id, IGNORE where no loss
    flow_target: torch.Tensor  # (N_gen, P) velocity x_data - noise of each GEN item, in order
    flow_weight: torch.Tensor  # (N_gen,) loss weight of each GEN item


def _row_mask(n: int, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    return mask


# ---------------------------------------------------------------------------------------------
# the backend


@dataclass
class MiniContext(Context):
    """A mini-backend context: its sequence, and the patch grid (rows, cols) a generated VT gets."""

    row: Row | None = None
    grid: tuple[int, int] = (0, 0)
    next_pos: int = 0  # the position id of the first completion token


class MiniDecoder(Decoder):
    """Batched text decoding over a KV cache: one text item per row per step, per-row positions."""

    def __init__(self, model: MiniUMM, cache: KVCache, last_hidden: torch.Tensor, next_pos: torch.Tensor):
        self.model, self.cache, self.next_pos = model, cache, next_pos
        self.logits = model.logits(last_hidden)  # (B, V)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, active: torch.Tensor) -> None:
        x = text_tokens(ids[:, None], self.next_pos[:, None], active[:, None], self.model.cfg.patch_dim)
        hidden, _ = self.model(x, cache=self.cache, update_cache=True)  # (B, 1, D)
        self.logits = torch.where(active[:, None], self.model.logits(hidden[:, 0]), self.logits)
        self.next_pos = self.next_pos + active.long()


class MiniBackend(Backend):
    """The miniature unified model (see the module docstring)."""

    # FSDP2 can shard it (distributed.py): scoring and decoding enter through MiniUMM.forward, and the
    # heads read after it see the weights FSDP keeps gathered until the train loop reshards them
    supports_sharding = True

    @property
    def cell_px(self) -> int:
        return int(self.cfg.patch_size)  # one patch per maze cell

    def __init__(
        self,
        model: MiniUMM,
        tokenizer: Tokenizer,
        framing_text: str = DEFAULT_FRAMING,
        transition_text: str = DEFAULT_TRANSITION,
        max_vt_images: int = 8,
        interleaved_prompt: str = "",
    ):
        if model.cfg.vocab_size != len(tokenizer):
            raise ValueError(f"model vocab_size {model.cfg.vocab_size} != tokenizer size {len(tokenizer)}")
        self.model, self.tokenizer = model, tokenizer
        self.framing_text, self.transition_text = framing_text, transition_text
        self.max_vt_images = max_vt_images
        self.interleaved_prompt = interleaved_prompt  # "" (checkpoints before the switch): no mode text
        self.eos_id = tokenizer.eos_id
        self.image_start_id = tokenizer.id_of(IMAGE_START)
        self.image_end_id = tokenizer.id_of(IMAGE_END)
        self.suppressed_ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id)

    @classmethod
    def new(cls, tokenizer: Tokenizer, seed: int = 0, **options) -> MiniBackend:
        """A freshly initialised backend; `options` are MiniConfig fields and backend texts, and
        `location_tokens` (default True): place the tokenizer's `( r , c )` tokens at their cells."""
        texts = {k: options.pop(k) for k in ("framing_text", "transition_text", "max_vt_images", "interleaved_prompt")
                 if k in options}
        if options.pop("location_tokens", True):
            options.setdefault("cell_tokens", [list(cell) for cell in tokenizer.cell_tokens()])
        torch.manual_seed(seed)  # weight init only; everything else takes explicit generators
        return cls(MiniUMM(MiniConfig(vocab_size=len(tokenizer), **options)), tokenizer, **texts)

    @property
    def cfg(self) -> MiniConfig:
        return self.model.cfg

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_completion(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) + [self.eos_id]

    def pixels(self, image: Image.Image | NoiseVT, generator: torch.Generator | None = None) -> torch.Tensor:
        """(3, H, W) model input in [-1, 1]; a NoiseVT becomes N(0, 1) at its fitted size."""
        p, g = self.cfg.patch_size, self.cfg.max_grid
        if isinstance(image, NoiseVT):
            w, h = fit_image(Image.new("RGB", (image.width, image.height)), p, g).size
            return torch.randn(3, h, w, generator=generator)
        return to_pixels(fit_image(image, p, g))

    # contexts ----------------------------------------------------------------------------------

    def build_context(
        self,
        sample: Sample,
        role: Role = "student",
        vt_mode: VTMode = "data",
        shuffled_from: Sample | None = None,
        generator: torch.Generator | None = None,
    ) -> MiniContext:
        b, grid = self._context_builder(sample, role, vt_mode, shuffled_from, generator)
        return MiniContext(
            role=role,
            vt_mode=vt_mode if role == "teacher" else None,
            segments=list(b.segments),
            row=b.build(),
            grid=grid,
            next_pos=b.next_pos,
        )

    def _context_builder(self, sample, role, vt_mode, shuffled_from, generator) -> tuple[RowBuilder, tuple]:
        """The context's sequence, still open for a completion, and the VT patch grid."""
        if not sample.problem_images:
            raise ValueError(f"sample {sample.id!r}: the mini model needs at least one problem image")
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        tok = self.tokenizer
        b = RowBuilder(self.cfg.patch_size, self.cfg.patch_dim)
        b.text([tok.bos_id])
        grid = (0, 0)
        for image in sample.problem_images:
            px = self.pixels(image)
            if grid == (0, 0):
                grid = (px.shape[1] // self.cfg.patch_size, px.shape[2] // self.cfg.patch_size)
            self._image_block(b, px, "problem_image")
        b.text(tok.encode(sample.question))
        if role == "teacher":
            b.text(tok.encode(self.framing_text), "framing")
            for image in pick_vt_images(sample, vt_mode, shuffled_from, self.max_vt_images):
                self._image_block(b, self.pixels(image, generator), "vt_image")
            b.text(tok.encode(self.transition_text), "transition")
        return b, grid

    def caption_context(self, sample: Sample) -> MiniContext:
        """The pretraining task's context: the sample's VT image(s) alone, then the caption prompt
        (`CAPTION_PROMPT`); the text-only trace is its answer. Measures how well VTs are read."""
        b = self._caption_builder(sample)
        return MiniContext(role="student", vt_mode=None, segments=list(b.segments), row=b.build(),
                           grid=(0, 0), next_pos=b.next_pos)

    def _caption_builder(self, sample: Sample) -> RowBuilder:
        if not sample.vt_images:
            raise ValueError(f"sample {sample.id!r}: the caption task needs a VT image")
        b = RowBuilder(self.cfg.patch_size, self.cfg.patch_dim)
        b.text([self.tokenizer.bos_id])
        for image in sample.vt_images[: self.max_vt_images]:
            self._image_block(b, self.pixels(image), "vt_image")
        b.text(self.tokenizer.encode(CAPTION_PROMPT))
        return b

    def _image_block(self, b: RowBuilder, px: torch.Tensor, segment: str) -> None:
        b.text([self.image_start_id], "marker")
        b.image(px, UND, segment=segment)
        b.text([self.image_end_id], "marker")

    def _encode_prefix(self, contexts: list[MiniContext], model: MiniUMM):
        """Encode contexts once (left-padded): (cache, last hidden (B, D), next position (B,))."""
        x = collate([c.row for c in contexts], model.cfg.patch_dim, left_pad=True)
        cache = KVCache(model.cfg.n_layers)
        hidden, _ = model(x, cache=cache, update_cache=True)  # (B, S, D)
        next_pos = torch.tensor([c.next_pos for c in contexts])
        return cache, hidden[:, -1], next_pos

    # scoring -----------------------------------------------------------------------------------

    def score(
        self,
        contexts: list[MiniContext],
        completions: list[list[int]],
        *,
        model: nn.Module | None = None,
        output: Literal["logits", "hidden"] = "logits",
        output_attentions: bool = False,
    ) -> Scores:
        model = model or self.model
        m, g = len(completions), completions_per_context(contexts, completions)
        lengths = torch.tensor([len(c) for c in completions])
        T = max(1, int(lengths.max()))
        ids = torch.zeros(m, T, dtype=torch.long)
        for i, c in enumerate(completions):
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask = torch.arange(T)[None] < lengths[:, None]  # (m, T)
        if output_attentions:
            hidden, attentions = self._score_full(contexts, g, ids, lengths, model)
        else:
            cache, last, next_pos = self._encode_prefix(contexts, model)
            cache, last, next_pos = (
                cache.repeat_interleave(g),
                last.repeat_interleave(g, 0),
                next_pos.repeat_interleave(g),
            )
            x = text_tokens(ids, next_pos[:, None] + torch.arange(T)[None], mask, model.cfg.patch_dim)
            h, _ = model(x, cache=cache)  # (m, T, D)
            # position t predicts completion token t: the context's last item, then tokens 0..T-2
            hidden = torch.cat([last[:, None], h[:, :-1]], dim=1)  # (m, T, D)
            attentions = None
        if output == "hidden":
            return Scores(mask=mask, hidden=hidden, head_weight=model.head_weight(), attentions=attentions)
        return Scores(mask=mask, logits=model.logits(hidden), attentions=attentions)

    def _score_full(self, contexts, g, ids, lengths, model):
        """One explicit-attention forward of each context + completion (no prefix reuse), for
        diagnostics. Returns hidden (m, T, D) and attentions[row][layer] (H, S_b, S_b)."""
        rows = []
        for i, comp_len in enumerate(lengths.tolist()):
            ctx = contexts[i // g]
            b = RowBuilder(self.cfg.patch_size, self.cfg.patch_dim)
            b.text(ids[i, :comp_len].tolist(), None)
            tail = b.build()
            r = ctx.row
            rows.append(
                Row(
                    kind=torch.cat([r.kind, tail.kind]),
                    ids=torch.cat([r.ids, tail.ids]),
                    rowcol=torch.cat([r.rowcol, tail.rowcol]),
                    t=torch.cat([r.t, tail.t]),
                    block=torch.cat([r.block, tail.block]),
                    pos=torch.cat([r.pos, tail.pos + ctx.next_pos]),
                    patches=r.patches,
                )
            )
        x = collate(rows, model.cfg.patch_dim, left_pad=False)
        h, weights = model(x, output_attentions=True)  # (m, S, D)
        T = ids.shape[1]
        hidden = torch.zeros(len(rows), T, h.shape[-1], dtype=h.dtype)
        attentions = []
        for i, comp_len in enumerate(lengths.tolist()):
            n_ctx = len(contexts[i // g].row)
            hidden[i, :comp_len] = h[i, n_ctx - 1 : n_ctx - 1 + comp_len]
            S_b = n_ctx + comp_len
            attentions.append([w[i, :, :S_b, :S_b] for w in weights])  # (H, S_b, S_b) per layer
        return hidden, attentions

    # decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decoder(self, contexts: list[MiniContext], n: int = 1, model: nn.Module | None = None) -> MiniDecoder:
        model = model or self.model
        cache, last, next_pos = self._encode_prefix(contexts, model)
        return MiniDecoder(
            model, cache.repeat_interleave(n), last.repeat_interleave(n, 0), next_pos.repeat_interleave(n)
        )

    @torch.no_grad()
    def generate_interleaved(
        self,
        contexts: list[MiniContext],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        vt_steps: int = 50,
        max_images: int = 1,
        given_vts: list[list[Image.Image]] | None = None,
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
    ) -> list[Interleaved]:
        """All contexts as one batch (one context = batch size 1, as the paper times it). Rows that
        emit `<image_start>` in the same step get their VTs generated together."""
        model = model or self.model
        B = len(contexts)
        dec = MiniDecoder(model, *self._encode_prefix(contexts, model))
        self._feed_text(dec, self._mode_ids(), model)
        ids: list[list[int]] = [[] for _ in range(B)]
        images: list[list[Image.Image]] = [[] for _ in range(B)]
        finished = [False] * B
        active = torch.ones(B, dtype=torch.bool)
        while active.any():
            tok = next_token(dec.logits, temperature, generator, self.suppressed_ids)
            for b in torch.nonzero(active).flatten().tolist():
                ids[b].append(int(tok[b]))
                finished[b] = ids[b][-1] == self.eos_id
                if finished[b] or len(ids[b]) >= max_new_tokens:
                    active[b] = False
            dec.step(tok, active)
            want = [b for b in torch.nonzero(active).flatten().tolist() if ids[b][-1] == self.image_start_id]
            make = [b for b in want if len(images[b]) < max_images]
            skip = [b for b in want if len(images[b]) >= max_images]  # over budget: image skip
            if make:
                if given_vts is not None:
                    pixels = [self.pixels(given_vts[b][len(images[b])]) for b in make]
                else:
                    pixels = self.generate_vts(dec, make, [contexts[b].grid for b in make], vt_steps, generator, model)
                for b, px in zip(make, pixels, strict=True):
                    images[b].append(to_image(px))
                # feed back exactly the 8-bit images that are returned
                self._feed_images(dec, make, [to_pixels(images[b][-1]) for b in make], model)
            if skip:
                dec.step(torch.full((B,), self.image_end_id), _row_mask(B, skip))
            for b in want:
                ids[b].append(self.image_end_id)
        return [Interleaved(self.decode(ids[b]), ids[b], images[b], finished[b]) for b in range(B)]

    def generate_vts(
        self,
        dec: MiniDecoder,
        rows: list[int],
        grids: list[tuple[int, int]],
        steps: int,
        generator: torch.Generator | None = None,
        model: MiniUMM | None = None,
    ) -> list[torch.Tensor]:
        """VTs for decoder rows `rows` on patch grids `grids`: Euler integration of the rectified
        flow from N(0, 1) (t = 0) to an image (t = 1); every step one forward of the GEN blocks
        against those rows' cache, which they never enter. Returns (3, H, W) pixels per row."""
        model = model or self.model
        R, P = len(rows), self.cfg.patch_dim
        sizes = [gh * gw for gh, gw in grids]
        n = max(sizes)
        kind = torch.full((R, n), GEN)
        rowcol = torch.zeros(R, n, 2, dtype=torch.long)
        for r, (gh, gw) in enumerate(grids):
            kind[r, sizes[r] :] = PAD
            rc = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1)  # (gh, gw, 2)
            rowcol[r, : sizes[r]] = rc.reshape(-1, 2)
        index = torch.tensor(rows)
        cache = dec.cache.select(index)
        pos = dec.next_pos[index][:, None] + torch.arange(n)[None]  # (R, n)
        x = torch.randn(R, n, P, generator=generator)
        for i in range(steps):
            tokens = Tokens(
                kind=kind,
                ids=torch.zeros(R, n, dtype=torch.long),
                patches=x,
                rowcol=rowcol,
                t=torch.full((R, n), i / steps),
                block=torch.zeros(R, n, dtype=torch.long),
                pos=pos,
            )
            hidden, _ = model(tokens, cache=cache)  # (R, n, D); the cache is not updated
            x = x + model.velocity(hidden) / steps
        p, c = self.cfg.patch_size, self.cfg.channels
        return [unpatchify(x[r, : sizes[r]], grids[r], p, c) for r in range(R)]

    def _mode_ids(self) -> list[int]:
        """Token ids of the interleaved-mode instruction (empty when the model has none)."""
        return self.tokenizer.encode(self.interleaved_prompt) if self.interleaved_prompt else []

    def _feed_text(self, dec: MiniDecoder, ids: list[int], model: MiniUMM) -> None:
        """Append the same context text `ids` to every row of the decoder (cache and logits)."""
        if not ids:
            return
        B = dec.logits.shape[0]
        built = []
        for b in range(B):
            rb = RowBuilder(self.cfg.patch_size, self.cfg.patch_dim, next_pos=int(dec.next_pos[b]))
            rb.text(ids)
            built.append(rb.build())
        x = collate(built, self.cfg.patch_dim, left_pad=False)
        hidden, _ = model(x, cache=dec.cache, update_cache=True)  # (B, len(ids), D)
        dec.logits = model.logits(hidden[:, -1])
        dec.next_pos = dec.next_pos + len(ids)

    def _feed_images(self, dec: MiniDecoder, rows: list[int], pixels: list[torch.Tensor], model: MiniUMM) -> None:
        """Append an UND block and `<image_end>` to the cache of each of `rows` in one forward
        (the other rows get padding, i.e. invalid cache columns) and refresh those rows' logits."""
        B = dec.logits.shape[0]
        built = []
        for b in range(B):
            rb = RowBuilder(self.cfg.patch_size, self.cfg.patch_dim, next_pos=int(dec.next_pos[b]))
            if b in rows:
                rb.image(pixels[rows.index(b)], UND)
                rb.text([self.image_end_id])
            built.append(rb.build())
        x = collate(built, self.cfg.patch_dim, left_pad=False)
        hidden, _ = model(x, cache=dec.cache, update_cache=True)  # (B, T, D)
        lengths = torch.tensor([len(r) for r in built])
        last = hidden[torch.arange(B), (lengths - 1).clamp(min=0)]  # (B, D): each row's <image_end>
        fed = lengths > 0
        dec.logits = torch.where(fed[:, None], model.logits(last), dec.logits)
        dec.next_pos = dec.next_pos + lengths

    # training rows -----------------------------------------------------------------------------

    def training_row(
        self,
        sample: Sample,
        kind: Literal["interleaved", "text_only", "teacher_context", "vt_caption"],
        generator: torch.Generator | None = None,
        flow_copies: int = 1,
        edit_weight: float = 1.0,
    ) -> TrainingExample:
        """One SFT example (module docstring). labels[i] is the id of the next text item after
        position i (GEN items skipped) when that item is in the completion; IGNORE elsewhere.

        Each VT gets `flow_copies` noised GEN copies, each with its own t and noise: they see the
        same prefix but not each other, so extra copies add flow-matching signal at the cost of the
        VT's tokens only, not the whole row's. Patches where the VT differs from the first problem
        image (the drawn path: an edit of the input, as VTs usually are) weigh `edit_weight` in the
        flow loss, the rest 1: otherwise copying the map dominates the loss."""
        if kind == "vt_caption":  # pretraining: the VT image alone, then its description
            b = self._caption_builder(sample)
        else:
            role = "teacher" if kind == "teacher_context" else "student"
            b, _ = self._context_builder(sample, role, "data", None, None)
        if kind == "interleaved":
            b.text(self._mode_ids(), "mode")  # context: no loss
        n_ctx = len(b.kind)
        enc = self.tokenizer.encode
        targets, weights = [], []
        if kind == "interleaved":
            vts = sample.vt_images[: len(sample.thoughts) - 1]
            problem = patchify(self.pixels(sample.problem_images[0]), self.cfg.patch_size)  # (N, P)
            for i, thought in enumerate(sample.thoughts):
                b.text(enc(f"<think>{thought}</think>"))
                if i < len(vts):
                    x1 = self.pixels(vts[i])
                    patches = patchify(x1, self.cfg.patch_size)  # (N, P)
                    edited = torch.ones(len(patches))
                    if patches.shape == problem.shape:
                        edited = 1 + (edit_weight - 1) * ((patches - problem).abs().mean(-1) > 0.05).float()
                    b.text([self.image_start_id])
                    for _ in range(flow_copies):
                        x0 = torch.randn(x1.shape, generator=generator)
                        t = float(torch.rand((), generator=generator))
                        b.image(t * x1 + (1 - t) * x0, GEN, t=t, advance=False)
                        targets.append(patchify(x1 - x0, self.cfg.patch_size))
                        weights.append(edited)
                    b.image(x1, UND)
                    b.text([self.image_end_id])
            b.text(enc(sample.answer_text()) + [self.eos_id])
        else:
            b.text(enc(sample.text_only_completion()) + [self.eos_id])
        row = b.build()
        labels = torch.full((len(row),), IGNORE, dtype=torch.long)
        prev = -1
        for j, k in enumerate(b.kind):
            if k == GEN:
                continue
            if k == TEXT and j >= n_ctx and prev >= 0:
                labels[prev] = b.ids[j]
            prev = j
        P = self.cfg.patch_dim
        return TrainingExample(
            row,
            labels,
            torch.cat(targets) if targets else torch.zeros(0, P),
            torch.cat(weights) if weights else torch.zeros(0),
        )

    def sft_losses(self, examples: list[TrainingExample], share_prefix: bool = True) -> dict[str, torch.Tensor]:
        """Summed cross-entropy over labelled positions and weighted summed squared velocity error
        over GEN items (per patch: mean over its pixels), with what to normalise them by (the number
        of labelled text tokens; the sum of patch weights) and the number of GEN items.

        With `share_prefix`, the text prefix common to all rows (when there is one, such as a shared
        system prompt) runs once and reaches the rows through a KV cache; gradients flow through
        the cache, so the result equals the plain forward."""
        rows = [e.row for e in examples]
        x = collate(rows, self.cfg.patch_dim, left_pad=False)
        lab = torch.full(x.kind.shape, IGNORE, dtype=torch.long)
        for b, e in enumerate(examples):
            lab[b, : len(e.labels)] = e.labels
        n = _common_text_prefix(x) if share_prefix and len(rows) > 1 else 0
        labelled = torch.nonzero((lab != IGNORE).any(0)).flatten()
        n = min(n, int(labelled[0])) if len(labelled) else n  # a shared position must carry no label
        cache = None
        if n > 1:
            cache = KVCache(self.cfg.n_layers)
            self.model(_slice(x, slice(0, 1), slice(0, n)), cache=cache, update_cache=True)
            cache = cache.repeat_interleave(len(rows))
            x, lab = _slice(x, slice(None), slice(n, None)), lab[:, n:]
        hidden, _ = self.model(x, cache=cache)  # (B, S - n, D)
        has = lab != IGNORE
        ce = nn.functional.cross_entropy(self.model.logits(hidden[has]), lab[has], reduction="sum")
        is_gen = x.kind == GEN
        vel = self.model.velocity(hidden[is_gen])  # (N_gen, P): rows in order, items in order
        target = torch.cat([e.flow_target for e in examples])  # (N_gen, P)
        weight = torch.cat([e.flow_weight for e in examples])  # (N_gen,)
        flow = (weight * ((vel - target) ** 2).mean(-1)).sum()
        return {
            "ce_sum": ce,
            "n_text": has.sum(),
            "flow_sum": flow,
            "flow_weight": weight.sum(),
            "n_patch": is_gen.sum(),
        }

    # persistence -------------------------------------------------------------------------------

    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Config, tokenizer and weights (`state`: whole weights gathered from a sharded run)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "model": asdict(self.cfg),
            "framing_text": self.framing_text,
            "transition_text": self.transition_text,
            "max_vt_images": self.max_vt_images,
            "interleaved_prompt": self.interleaved_prompt,
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save(directory / "tokenizer.json")
        state = {k: v.detach().contiguous() for k, v in (state or self.model.state_dict()).items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> MiniBackend:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{directory}: not a mini-model checkpoint (format {config.get('format')!r})")
        model = MiniUMM(MiniConfig(**config["model"]))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))  # safetensors: no pickle
        return cls(
            model,
            Tokenizer.load(directory / "tokenizer.json"),
            config["framing_text"],
            config["transition_text"],
            config["max_vt_images"],
            config.get("interleaved_prompt", ""),
        )

    # diagnostics -------------------------------------------------------------------------------

    def build_trace_context(self, sample: Sample, ids: list[int], images: list[Image.Image]) -> MiniContext:
        """See `Backend.build_trace_context`. The sequence is the one `generate_interleaved` built:
        `<image_start>` as text, the VT as an UND block at the next positions, then `<image_end>`."""
        b, grid = self._context_builder(sample, "student", "data", None, None)
        b.text(self._mode_ids(), "mode")
        markers = (self.image_start_id, self.image_end_id)
        run: list[int] = []
        n_images = 0
        for i in ids:
            if i not in markers:
                run.append(i)
                continue
            b.text(run, "trace_text")
            run = []
            b.text([i], "marker")
            if i == self.image_start_id and n_images < len(images):
                self._image_vt_block(b, images[n_images])
                n_images += 1
        b.text(run, "trace_text")
        return MiniContext(
            role="student", vt_mode=None, segments=list(b.segments), row=b.build(), grid=grid, next_pos=b.next_pos
        )

    def _image_vt_block(self, b: RowBuilder, image: Image.Image) -> None:
        # the fed-back image is 8-bit (generate_interleaved quantises before feeding), as here
        b.image(to_pixels(to_image(self.pixels(image))), UND, segment="vt_image")
