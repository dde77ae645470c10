"""The miniature unified model: one causal transformer over text tokens and image-patch blocks.

A sequence is a list of items of three kinds (plus padding):
- TEXT: a token id -> token embedding;
- UND (understanding patch): an image patch (pixels in [-1, 1]) -> `und_in` linear;
- GEN (generation patch): a *noised* patch x_t of a VT being generated, with its flow time t ->
  `gen_in` linear + an MLP of a sinusoidal embedding of t.
Image items also get a learned row and column embedding (2-D position) and every item a type
embedding. Attention is rotary: by default half of each head's rotary pairs turn with explicit 1-D
position ids (so left padding, KV caches and blocks that share positions need no special cases),
a quarter with the patch row and a quarter with the column (2-D rotary, zero for text), which
makes "the same cell in another image" (a VT copying the map) easy to attend to. Text location
tokens (`( r , c )`, one token each) sit at their cell the same way (`MiniUMM.cells`). Measured after
1000 SFT steps: VT fidelity 0.61 -> 0.83, accuracy with the ground-truth VT inserted 37% -> 55%.

Attention (`attention_mask`): causal across the sequence, bidirectional inside an image block, and
GEN items are visible only to their own block. That last rule lets one SFT forward hold both the
noised copy of a VT (flow loss) and its clean UND copy (what the later text reads): the clean copy
and the text never see the noise, exactly as at inference, where GEN blocks never enter the cache.
The noised copy sits before its clean twin and shares its position ids.

Generation expert (mixture-of-transformers, lite, as BAGEL's): GEN items have their own layer norms
and MLPs in every layer and their own output head (velocity); attention weights are shared. With
`gen_expert=False` all items share the MLPs.

Rectified flow convention: x_t = t * x_data + (1 - t) * noise, t in [0, 1] (t = 1 is data); the
model predicts the velocity x_data - noise; sampling is Euler from t = 0 to 1. (Predicting the clean
patch instead, with the velocity loss, made the text loss markedly worse at the demo budget.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PAD, TEXT, UND, GEN = 0, 1, 2, 3


@dataclass
class MiniConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 8
    channels: int = 3
    max_grid: int = 8  # most patches per image side
    gen_expert: bool = True  # separate norms + MLPs + head for GEN items
    rope_base: float = 10000.0
    # rotary pairs per head turned by the patch row, and as many by the column; None: a quarter of
    # the head's pairs each (head_dim 32: 4 + 4 of 16 pairs), the other half turn with 1-D positions
    rope_2d_pairs: int | None = None
    # location tokens (tokenizer `( r , c )` pieces) as [id, row, column]: such a text token sits at
    # its cell like an image patch (2-D rotary angles and row/column embeddings), see `MiniUMM.cells`
    cell_tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) / n_heads ({self.n_heads}) must be an even integer")
        for name in ("n_layers", "patch_size", "channels", "max_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rope_2d_pairs is None:
            self.rope_2d_pairs = (self.d_model // self.n_heads) // 8
        if not 0 <= 2 * self.rope_2d_pairs < (self.d_model // self.n_heads) // 2:
            raise ValueError(f"rope_2d_pairs ({self.rope_2d_pairs}) must leave rotary pairs for 1-D positions")

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2


@dataclass
class Tokens:
    """A padded batch of sequence items; every field is (B, T) unless noted."""

    kind: torch.Tensor  # PAD / TEXT / UND / GEN
    ids: torch.Tensor  # token id for TEXT, 0 elsewhere
    patches: torch.Tensor  # (B, T, P) pixels for UND / GEN, 0 elsewhere
    rowcol: torch.Tensor  # (B, T, 2) patch row / column for image items, 0 elsewhere
    t: torch.Tensor  # flow time for GEN, 0 elsewhere
    block: torch.Tensor  # image block id (unique within a row) or -1 for text / pad
    pos: torch.Tensor  # rotary position id

    @property
    def valid(self) -> torch.Tensor:
        return self.kind != PAD


class KVCache:
    """Keys / values of every layer for the positions seen so far, with a validity mask so that
    padded or paused rows leave holes instead of shifting positions. GEN items never enter it."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers  # (B, H, S, Dh)
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.valid: torch.Tensor | None = None  # (B, S) bool

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of the given rows only (a copy)."""
        out = KVCache(len(self.k))
        out.k = [k.index_select(0, rows) for k in self.k]
        out.v = [v.index_select(0, rows) for v in self.v]
        out.valid = self.valid.index_select(0, rows)
        return out

    def repeat_interleave(self, n: int) -> KVCache:
        """Each row repeated n times, consecutively (row b -> rows b*n .. b*n+n-1)."""
        out = KVCache(len(self.k))
        out.k = [k.repeat_interleave(n, 0) for k in self.k]
        out.v = [v.repeat_interleave(n, 0) for v in self.v]
        out.valid = self.valid.repeat_interleave(n, 0)
        return out


def attention_mask(x: Tokens, cache_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, S + T) bool, True = may attend. Queries are the T new items; keys are the S cached
    positions (all earlier: allowed where valid) followed by the new items.

    New keys: valid, and (earlier-or-same position in the chunk, or same image block), and GEN keys
    only from their own block. Every query may see itself, so padded rows never give NaNs.
    """
    B, T = x.kind.shape
    idx = torch.arange(T, device=x.kind.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key j <= query i
    same_block = (x.block[:, :, None] == x.block[:, None, :]) & (x.block[:, :, None] >= 0)  # (B, T, T)
    key_gen = (x.kind == GEN)[:, None, :]  # (B, 1, T)
    new = x.valid[:, None, :] & (causal[None] | same_block) & (~key_gen | same_block)
    new |= torch.eye(T, dtype=torch.bool, device=x.kind.device)[None]
    if cache_valid is None:
        return new
    return torch.cat([cache_valid[:, None, :].expand(B, T, cache_valid.shape[1]), new], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h, cos, sin, mask, past: tuple | None, want_weights: bool):
        B, T, D = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # (B, T, 3D) -> 3 x (B, H, T, Dh)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_new, v_new = k, v
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S+T, Dh)
        m = mask[:, None]  # (B, 1, T, S+T)
        if want_weights:  # explicit path: the same math, with the weights kept for diagnostics
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            weights = scores.masked_fill(~m, float("-inf")).softmax(-1)  # (B, H, T, S+T)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, H, T, Dh) -> (B, T, D)
        return self.proj(out), (k_new, v_new), weights


def _mlp(cfg: MiniConfig) -> nn.Sequential:
    hidden = int(cfg.mlp_ratio * cfg.d_model)
    return nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))


class Layer(nn.Module):
    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = _mlp(cfg)
        if cfg.gen_expert:
            self.gen_norm1, self.gen_norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
            self.gen_mlp = _mlp(cfg)
        self.gen_expert = cfg.gen_expert

    def _per_expert(self, x, is_gen, und_fn, gen_fn):
        """und_fn on non-GEN items, gen_fn on GEN items (only the items each expert owns)."""
        if not self.gen_expert or not bool(is_gen.any()):
            return und_fn(x)
        und, gen = und_fn(x[~is_gen]), gen_fn(x[is_gen])  # (B, T, D)[mask] -> (N, D)
        out = x.new_empty(x.shape, dtype=und.dtype)  # (autocast may change the dtype)
        out[~is_gen] = und
        out[is_gen] = gen
        return out

    def forward(self, x, is_gen, cos, sin, mask, past, want_weights):
        h = self._per_expert(x, is_gen, self.norm1, lambda y: self.gen_norm1(y))
        a, kv, weights = self.attn(h, cos, sin, mask, past, want_weights)
        x = x + a
        x = x + self._per_expert(
            x, is_gen, lambda y: self.mlp(self.norm2(y)), lambda y: self.gen_mlp(self.gen_norm2(y))
        )
        return x, kv, weights


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of flow time t in [0, 1] (scaled by 1000, as diffusion models do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[..., None] * 1000.0 * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MiniUMM(nn.Module):
    """The network. `forward` returns final hidden states; `logits` / `velocity` are the heads."""

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.und_in = nn.Linear(cfg.patch_dim, d)
        self.gen_in = nn.Linear(cfg.patch_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.row_emb = nn.Embedding(cfg.max_grid, d)
        self.col_emb = nn.Embedding(cfg.max_grid, d)
        self.type_emb = nn.Embedding(4, d)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.gen_norm = nn.LayerNorm(d)
        self.vel_head = nn.Linear(d, cfg.patch_dim)
        # Rotary frequencies: n1 pairs turn with the 1-D sequence position; 2 * rope_2d_pairs pairs
        # turn with the patch row / column (0 for text), at frequencies 2 pi k / (2 max_grid), k = 1..,
        # so that a patch attending to the same cell of another image (the VT copying the map, the
        # clean VT read at a cell named in text) sees zero relative rotation there whatever the
        # distance between the images in the sequence.
        n1 = (d // cfg.n_heads) // 2 - 2 * cfg.rope_2d_pairs
        k = torch.arange(1, cfg.rope_2d_pairs + 1, dtype=torch.float32)
        self.register_buffer(
            "inv_freq", cfg.rope_base ** (-torch.arange(n1, dtype=torch.float32) / n1), persistent=False
        )
        self.register_buffer("freq_2d", 2 * math.pi * k / (2 * cfg.max_grid), persistent=False)
        # id -> cell of the location tokens inside the grid (row -1: not a location token)
        cell_of = torch.full((cfg.vocab_size, 2), -1, dtype=torch.long)
        for i, r, c in cfg.cell_tokens:
            if i < cfg.vocab_size and r < cfg.max_grid and c < cfg.max_grid:
                cell_of[i] = torch.tensor([r, c])
        self.register_buffer("cell_of", cell_of, persistent=False)
        cells = [(i, r, c) for i, r, c in cfg.cell_tokens if i < cfg.vocab_size and max(r, c) < cfg.max_grid]
        self.register_buffer("cell_ids", torch.tensor([i for i, _, _ in cells], dtype=torch.long), persistent=False)
        self.register_buffer("cell_rc", torch.tensor([[r, c] for _, r, c in cells], dtype=torch.long).reshape(-1, 2),
                             persistent=False)
        if cells:
            # factorised output rows of the location tokens: naming cell (r, c) = a row part + a column
            # part (+ the token's own row), as two digits were; one 64-way choice learnt from scratch
            # collapsed onto a single cell at the demo budget
            self.cell_row_out = nn.Parameter(torch.zeros(cfg.max_grid, d))
            self.cell_col_out = nn.Parameter(torch.zeros(cfg.max_grid, d))
        self.apply(self._init)
        # Image inputs start at unit scale (fan-in init) with strong 2-D positions. At the 0.02 scale of
        # the text embeddings they were drowned out, and the text -> patch lookup every maze thought
        # needs ("the elf is at ( r , c )") sat on a long plateau: on a synthetic find-the-red-cell
        # task this init reached 100% in ~300 steps where the 0.02 init was at ~60% after 400.
        for emb in (self.row_emb, self.col_emb):
            nn.init.normal_(emb.weight, std=0.5)
        for proj in (self.und_in, self.gen_in):
            nn.init.normal_(proj.weight, std=cfg.patch_dim**-0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def cells(self, x: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 2) grid cell of every item and (B, T) whether it has one: image patches, and text
        location tokens, which name a cell and so sit at it (zero relative 2-D rotation to that
        cell's patches in every image): reading "the path at ( 2 , 3 )" is then a fixed lookup
        instead of one the network must assemble from separate digit tokens."""
        text_cell = self.cell_of[x.ids]  # (B, T, 2); row -1 for ordinary tokens
        is_cell = (x.kind == TEXT) & (text_cell[..., 0] >= 0)
        is_img = (x.kind == UND) | (x.kind == GEN)
        rowcol = torch.where(is_cell[..., None], text_cell, x.rowcol)
        return rowcol, is_img | is_cell

    def embed(self, x: Tokens, rowcol: torch.Tensor, has_cell: torch.Tensor) -> torch.Tensor:
        """(B, T, D) input vectors; every branch is computed densely and selected by kind."""
        kind = x.kind[..., None]  # (B, T, 1)
        e = torch.where(kind == TEXT, self.tok_emb(x.ids), 0.0)
        e = e + torch.where(kind == UND, self.und_in(x.patches), 0.0)
        gen = self.gen_in(x.patches) + self.time_mlp(timestep_embedding(x.t, self.cfg.d_model))
        e = e + torch.where(kind == GEN, gen, 0.0)
        e = e + torch.where(has_cell[..., None], self.row_emb(rowcol[..., 0]) + self.col_emb(rowcol[..., 1]), 0.0)
        return e + self.type_emb(x.kind)

    def forward(
        self,
        x: Tokens,
        cache: KVCache | None = None,
        update_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Final hidden states (B, T, D) after the shared final norm (GEN items: after `gen_norm`),
        and per-layer attention weights (B, H, T, S+T) when asked. With `update_cache` the new
        items' keys / values (and validity) are appended to `cache`."""
        mask = attention_mask(x, cache.valid if cache is not None and cache.valid is not None else None)
        rowcol, has_cell = self.cells(x)
        rc = rowcol.float()
        angles = torch.cat(  # (B, T, Dh/2): 1-D pairs, then row pairs, then column pairs
            [x.pos.float()[..., None] * self.inv_freq, rc[..., :1] * self.freq_2d, rc[..., 1:] * self.freq_2d], -1
        )
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]  # (B, 1, T, Dh)
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
        is_gen = x.kind == GEN
        h = self.embed(x, rowcol, has_cell)
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            past = None
            if cache is not None and cache.k[i] is not None:
                past = (cache.k[i], cache.v[i])
            h, (k, v), w = layer(h, is_gen, cos, sin, mask, past, output_attentions)
            if update_cache:
                cache.k[i] = k if past is None else torch.cat([past[0], k], dim=2)
                cache.v[i] = v if past is None else torch.cat([past[1], v], dim=2)
            if output_attentions:
                attentions.append(w)
        if update_cache:
            cache.valid = x.valid if cache.valid is None else torch.cat([cache.valid, x.valid], dim=1)
        out = torch.where(is_gen[..., None], self.gen_norm(h), self.norm(h))
        return out, attentions

    def head_weight(self) -> torch.Tensor:
        """(V, D) output matrix: `lm_head` plus the factorised row / column parts of location tokens."""
        w = self.lm_head.weight
        if not len(self.cell_ids):
            return w
        rows, cols = self.cell_rc[:, 0], self.cell_rc[:, 1]
        return w.index_add(0, self.cell_ids, self.cell_row_out[rows] + self.cell_col_out[cols])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight())

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vel_head(hidden)
