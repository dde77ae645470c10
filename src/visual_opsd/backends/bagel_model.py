"""The BAGEL / ThinkMorph-7B network, written from its architecture description (no upstream code).

    Qwen2 decoder with q/k RMSNorm and a mixture of transformers: every attention / MLP / norm
    weight exists twice, the understanding expert (text, markers, ViT rows) and the generation
    expert (`*_moe_gen`: VAE latent rows); rows are routed by type.
    SigLIP NaViT (last layer dropped) -> connector MLP -> + fixed 2-D sin-cos table: understanding images.
    VAE latents (2x2 patches) -> vae2llm + timestep embedding + 2-D sin-cos table: generation rows;
    llm2vae reads the rectified-flow velocity (noise - data) back out.

Parameter names are the checkpoint's (`ema.safetensors`), so `load_state_dict` takes the file as is.
`visual_gen=False` builds the understanding-only subset (no generation expert, no latent side).

Numerics follow the official inference cast points (tests/data/bagel-golden/README.md): bf16
weights and residual stream, RMSNorm in fp32 cast back before the weight, RoPE tables in fp32
rounded to the hidden dtype (the inverse frequencies are recomputed in fp32 on every call, so a
blanket `model.to(bfloat16)` cannot round them), attention softmax in fp32, and q/k norm + RoPE
in fp32 for inference calls that contain latent rows (`fp32_qk`).

A forward call appends rows to a sequence: `forward_llm(embeds, positions, gen, self_mask, cache)`
attends to every valid cache row plus the call's own rows through `self_mask`; a causal text call
therefore gets the bottom-right aligned causal mask by construction (query i sees the whole cache
and its own rows 0..i), never SDPA's top-left `is_causal`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class BagelConfig:
    """Geometry of the whole model; `from_json_files` reads the checkpoint's llm/vit configs."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    vit_hidden_size: int = 1152
    vit_layers: int = 26  # built layers: the json's num_hidden_layers minus 1 (the last one is dropped)
    vit_heads: int = 16
    vit_intermediate_size: int = 4304
    vit_patch_size: int = 14
    vit_layer_norm_eps: float = 1e-6
    vit_max_patches_per_side: int = 70
    visual_gen: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    z_channels: int = 16
    vae_downsample: int = 8
    timestep_dim: int = 256
    bos_id: int = 151644  # <|im_start|>
    eos_id: int = 151645  # <|im_end|>
    vision_start_id: int = 151652  # <|vision_start|>
    vision_end_id: int = 151653  # <|vision_end|>

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (VAE downsample x latent patch)."""
        return self.vae_downsample * self.latent_patch_size

    @classmethod
    def from_json_files(cls, llm: dict, vit: dict, extra: dict | None = None) -> BagelConfig:
        """From the checkpoint's llm_config.json / vit_config.json dicts; `extra` overrides the rest
        (latent sizes, special ids, visual_gen...) with BagelConfig field names."""
        cfg = cls(
            vocab_size=llm["vocab_size"],
            hidden_size=llm["hidden_size"],
            num_layers=llm["num_hidden_layers"],
            num_heads=llm["num_attention_heads"],
            num_kv_heads=llm["num_key_value_heads"],
            intermediate_size=llm["intermediate_size"],
            rope_theta=float(llm.get("rope_theta", 1e6)),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
            vit_hidden_size=vit["hidden_size"],
            vit_layers=vit["num_hidden_layers"] - 1,  # BAGEL drops the last SigLIP layer
            vit_heads=vit["num_attention_heads"],
            vit_intermediate_size=vit["intermediate_size"],
            vit_patch_size=vit["patch_size"],
            vit_layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
        )
        for k, v in (extra or {}).items():
            if k not in cls.__dataclass_fields__:
                raise ValueError(f"unknown BAGEL config field {k!r}")
            setattr(cfg, k, v)
        return cfg

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> BagelConfig:
        """llm_config.json + vit_config.json (+ our optional bagel_config.json) of a checkpoint folder."""
        folder = Path(folder)
        llm = json.loads((folder / "llm_config.json").read_text())
        vit = json.loads((folder / "vit_config.json").read_text())
        extra = {}
        if (folder / "bagel_config.json").is_file():
            extra = json.loads((folder / "bagel_config.json").read_text()).get("model", {})
        return cls.from_json_files(llm, vit, {**extra, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# fixed tables and small pieces, from their mathematical definitions


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos table; row r*grid + c. Channels [0, dim/2) encode the
    column c, [dim/2, dim) the row r; inside each half sin(p*w_k) then cos(p*w_k) with
    w_k = 10000^(-k/(dim/4)). Computed in float64."""
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")

    def half(p: torch.Tensor) -> torch.Tensor:
        a = p.reshape(-1, 1) * omega[None]  # (G*G, dim/4)
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([half(c), half(r)], dim=1).float()  # (G*G, dim)


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """(N, dim) fp32 features of flow times t (N,) in [0, 1] (no x1000): [cos(t f_k), sin(t f_k)],
    f_k = exp(-ln(10000) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=-1)


class PositionTable(nn.Module):
    """A fixed 2-D sin-cos table stored like the checkpoint (`<name>.pos_embed`, not trained)."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_2d_table(dim, grid), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


class TimestepEmbedder(nn.Module):
    """Flow time -> hidden: fp32 sinusoidal features, then Linear-SiLU-Linear in the weights' dtype."""

    def __init__(self, hidden: int, dim: int = 256):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.dim).to(self.mlp[0].weight.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back to the input dtype, then the weight (Qwen2 order)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def fp32_layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in fp32 (as autocast runs it), result in the input dtype."""
    w = None if ln.weight is None else ln.weight.float()
    b = None if ln.bias is None else ln.bias.float()
    return F.layer_norm(x.float(), ln.normalized_shape, w, b, ln.eps).to(x.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, N, L) fp32 attention weights, for diagnostics (same inputs as `attention`)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, N, d), k/v (B, Hkv, L, d), mask (B, N, L) bool (True = may attend) -> (B, H, N, d).

    Query head h reads KV head h // (H / Hkv). On CPU the inputs are upcast so softmax and
    accumulation run in fp32 (the reference's stand-in); on GPU SDPA takes them as they are."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = mask | ~mask.any(-1, keepdim=True)  # rows that see nothing (padding) see everything: no NaN
    dtype = q.dtype
    if not q.is_cuda:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return out.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, N, head_dim) for RoPE position ids (B, N): fp32 math, rounded to `dtype`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, N, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------
# mixture-of-transformers decoder


def routed(x: torch.Tensor, gen: torch.Tensor | None, und_fn, gen_fn) -> torch.Tensor:
    """Apply `und_fn` to rows where `gen` is False and `gen_fn` where it is True (x: (..., D))."""
    if gen is None or not bool(gen.any()):
        return und_fn(x)
    if bool(gen.all()):
        return gen_fn(x)
    a, b = und_fn(x[~gen]), gen_fn(x[gen])
    out = a.new_zeros(*x.shape[:-1], a.shape[-1])
    out[~gen] = a
    out[gen] = b
    return out


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        D, H, Hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        experts = ["", "_moe_gen"] if cfg.visual_gen else [""]
        for s in experts:
            setattr(self, f"q_proj{s}", nn.Linear(D, H * d))
            setattr(self, f"k_proj{s}", nn.Linear(D, Hkv * d))
            setattr(self, f"v_proj{s}", nn.Linear(D, Hkv * d))
            setattr(self, f"o_proj{s}", nn.Linear(H * d, D, bias=False))
            setattr(self, f"q_norm{s}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{s}", RMSNorm(d, cfg.rms_norm_eps))

    def _mod(self, name: str, gen: bool) -> nn.Module:
        return getattr(self, name + ("_moe_gen" if gen else ""))

    def _route(self, name: str, x: torch.Tensor, gen: torch.Tensor | None) -> torch.Tensor:
        return routed(x, gen, self._mod(name, False), lambda y: self._mod(name, True)(y))

    def forward(self, x, positions, gen, self_mask, layer_cache, fp32_qk: bool, need_weights: bool = False):
        B, N, _ = x.shape
        cfg, d = self.cfg, self.cfg.head_dim
        q = self._route("q_proj", x, gen).view(B, N, cfg.num_heads, d)
        k = self._route("k_proj", x, gen).view(B, N, cfg.num_kv_heads, d)
        v = self._route("v_proj", x, gen).view(B, N, cfg.num_kv_heads, d)
        if fp32_qk:  # inference calls with latent rows: q/k norm and RoPE on fp32 projections
            q, k = q.float(), k.float()
        q = self._route("q_norm", q, gen)
        k = self._route("k_norm", k, gen)
        cos, sin = rope_tables(positions, d, cfg.rope_theta, x.dtype)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, N, 1, d): broadcast over heads
        q = (q * cos + rotate_half(q) * sin).to(x.dtype)
        k = (k * cos + rotate_half(k) * sin).to(x.dtype)
        mask = self_mask
        if layer_cache is not None and layer_cache[0] is not None:
            ck, cv, valid = layer_cache
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            mask = torch.cat([valid[:, None, :].expand(B, N, -1), self_mask], dim=2)
        new_kv = (k, v)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, cfg.num_heads * d)
        probs = attention_probs(q.transpose(1, 2), k.transpose(1, 2), mask) if need_weights else None
        return self._route("o_proj", out, gen), new_kv, probs


class MoTLayer(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        if cfg.visual_gen:
            self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, gen, self_mask, layer_cache, fp32_qk, need_weights=False):
        h = routed(x, gen, self.input_layernorm, lambda y: self.input_layernorm_moe_gen(y))
        a, new_kv, probs = self.self_attn(h, positions, gen, self_mask, layer_cache, fp32_qk, need_weights)
        x = x + a
        h = routed(x, gen, self.post_attention_layernorm, lambda y: self.post_attention_layernorm_moe_gen(y))
        return x + routed(h, gen, self.mlp, lambda y: self.mlp_moe_gen(y)), new_kv, probs


class Qwen2MoT(nn.Module):
    """`language_model.model`: embeddings, MoT layers, routed final norm."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.visual_gen:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.model = Qwen2MoT(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class KVCache:
    """Post-RoPE keys and values per layer, (B, L, Hkv, d) each, and `valid` (B, L): which cache
    rows exist (False for left padding in a batch, or for rows appended while a row was idle)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def layer(self, i: int):
        return (self.keys[i], self.values[i], self.valid) if self.keys[i] is not None else None

    def expand(self, n: int) -> KVCache:
        """A batch-1 cache seen by n rows (views, no copy: gradients still reach the prefix)."""
        out = KVCache(len(self.keys))
        out.keys = [k.expand(n, *k.shape[1:]) for k in self.keys]
        out.values = [v.expand(n, *v.shape[1:]) for v in self.values]
        out.valid = self.valid.expand(n, -1)
        return out

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """Batch-1 caches of different lengths -> one left-padded batch cache."""
        L = max(len(c) for c in caches)
        out = KVCache(len(caches[0].keys))
        for i in range(len(out.keys)):
            out.keys[i] = torch.cat([F.pad(c.keys[i], (0, 0, 0, 0, L - len(c), 0)) for c in caches])
            out.values[i] = torch.cat([F.pad(c.values[i], (0, 0, 0, 0, L - len(c), 0)) for c in caches])
        out.valid = torch.cat([F.pad(c.valid, (L - len(c), 0), value=False) for c in caches])
        return out

    def repeat_interleave(self, n: int) -> KVCache:
        out = KVCache(len(self.keys))
        out.keys = [k.repeat_interleave(n, 0) for k in self.keys]
        out.values = [v.repeat_interleave(n, 0) for v in self.values]
        out.valid = self.valid.repeat_interleave(n, 0)
        return out


# ---------------------------------------------------------------------------------------------
# SigLIP NaViT (understanding images)


class _VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, D = x.shape
        q, k, v = (p(x).view(N, self.heads, D // self.heads).transpose(0, 1)[None]
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (1, h, N, d)
        out = attention(q, k, v, torch.ones(1, N, N, dtype=torch.bool, device=x.device))
        return self.out_proj(out[0].transpose(0, 1).reshape(N, D))


class _VitMLP(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _VitLayer(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        D = cfg.vit_hidden_size
        self.self_attn = _VitAttention(D, cfg.vit_heads)
        self.layer_norm1 = nn.LayerNorm(D, eps=cfg.vit_layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(D, eps=cfg.vit_layer_norm_eps)
        self.mlp = _VitMLP(D, cfg.vit_intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(fp32_layer_norm(self.layer_norm1, x))
        return x + self.mlp(fp32_layer_norm(self.layer_norm2, x))


class _VitEmbeddings(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        p = cfg.vit_patch_size
        # stored as a Linear over (p, q, c)-flattened patches, as the checkpoint has it
        self.patch_embedding = nn.Linear(p * p * 3, cfg.vit_hidden_size)
        self.position_embedding = nn.Embedding(cfg.vit_max_patches_per_side**2, cfg.vit_hidden_size)


class _VitEncoder(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.layers = nn.ModuleList(_VitLayer(cfg) for _ in range(cfg.vit_layers))


class _VisionModel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.embeddings = _VitEmbeddings(cfg)
        self.encoder = _VitEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vit_hidden_size, eps=cfg.vit_layer_norm_eps)


class SiglipNaViT(nn.Module):
    """`vit_model`: one image at a time, patches (N, p*p*3) at 2-D position ids r*70 + c."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.vision_model = _VisionModel(cfg)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        emb = vm.embeddings
        x = emb.patch_embedding(patches.to(emb.patch_embedding.weight.dtype)) + emb.position_embedding(position_ids)
        for layer in vm.encoder.layers:
            x = layer(x)
        return fp32_layer_norm(vm.post_layernorm, x)


class Connector(nn.Module):
    def __init__(self, vit_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(vit_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# the whole model


class BagelModel(nn.Module):
    """BAGEL's trainable network (the VAE lives outside: it is frozen and kept in fp32)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = LanguageModel(cfg)
        self.vit_model = SiglipNaViT(cfg)
        self.connector = Connector(cfg.vit_hidden_size, cfg.hidden_size)
        self.vit_pos_embed = PositionTable(cfg.hidden_size, cfg.vit_max_patches_per_side)
        if cfg.visual_gen:
            self.time_embedder = TimestepEmbedder(cfg.hidden_size, cfg.timestep_dim)
            self.vae2llm = nn.Linear(cfg.latent_dim, cfg.hidden_size)
            self.llm2vae = nn.Linear(cfg.hidden_size, cfg.latent_dim)
            self.latent_pos_embed = PositionTable(cfg.hidden_size, cfg.max_latent_size)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def forward(self, fn, *args, **kwargs):
        """Runs `fn(*args, **kwargs)` (which calls this model's parts) inside the module's forward:
        the one entry point through which wrappers such as FSDP2 see a computation, gathering the
        weights before it and reducing the gradients of everything it produced."""
        return fn(*args, **kwargs)

    # inputs ------------------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def vit_features(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.vit_model(patches, position_ids)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(N, D) LLM rows of one image: connector(ViT(patches)) + vit_pos_embed[ids]."""
        feats = self.vit_features(patches, position_ids).to(self.dtype)
        return self.connector(feats) + self.vit_pos_embed(position_ids).to(self.dtype)

    def embed_latent(self, tokens: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(N, D) LLM rows of latent tokens (N, latent_dim) at flow times t (N,) or (): summed in the
        model dtype as (vae2llm(x) + time_embed(t)) + pos."""
        if not self.cfg.visual_gen:
            raise RuntimeError("this BAGEL model was loaded understanding-only: it has no generation side")
        t = t.reshape(-1).expand(tokens.shape[0]) if t.numel() == 1 else t
        return (self.vae2llm(tokens.to(self.dtype)) + self.time_embedder(t)) + self.latent_pos_embed(position_ids).to(
            self.dtype
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)

    # the decoder -------------------------------------------------------------------------------

    def forward_llm(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        gen: torch.Tensor | None,
        self_mask: torch.Tensor,
        cache: KVCache | None = None,
        update_cache: bool = False,
        fp32_qk: bool = False,
        valid: torch.Tensor | None = None,
        attentions: list | None = None,
    ) -> torch.Tensor:
        """New rows embeds (B, N, D) at RoPE positions (B, N), routed by gen (B, N) bool, attending to
        the valid cache rows and to each other through self_mask (B, N, N). Returns the hidden
        states after the routed final norm (B, N, D). With `update_cache`, the rows' K/V are
        appended to `cache`, marked valid where `valid` (B, N) is True (default: all). A list passed
        as `attentions` receives each layer's attention weights (B, H, N, cache + N)."""
        if gen is not None and bool(gen.any()) and not self.cfg.visual_gen:
            raise RuntimeError("latent rows need the generation expert (loaded understanding-only)")
        lm = self.language_model.model
        x = embeds
        new = []
        for i, layer in enumerate(lm.layers):
            lc = cache.layer(i) if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv, _ = checkpoint(layer, x, positions, gen, self_mask, lc, fp32_qk, use_reentrant=False)
            else:
                x, kv, probs = layer(x, positions, gen, self_mask, lc, fp32_qk, attentions is not None)
                if attentions is not None:
                    attentions.append(probs)
            new.append(kv)
        if update_cache and cache is not None:
            B, N = embeds.shape[:2]
            v = torch.ones(B, N, dtype=torch.bool, device=embeds.device) if valid is None else valid
            for i, (k, vv) in enumerate(new):
                cache.keys[i], cache.values[i] = k, vv  # the layer already concatenated the old rows
            cache.valid = v if cache.valid is None else torch.cat([cache.valid, v], dim=1)
        return routed(x, gen, lm.norm, lambda y: lm.norm_moe_gen(y))

    def und_parameters(self) -> list[nn.Parameter]:
        """The understanding-side parameters (what Visual-OPSD trains)."""
        return [p for n, p in self.named_parameters() if not is_generation_param(n)]


GEN_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


def is_generation_param(name: str) -> bool:
    """Checkpoint keys of the generation side (left out in understanding-only mode)."""
    return "_moe_gen" in name or name.startswith(GEN_PREFIXES)


def block_mask(splits: list[tuple[int, str]], device=None) -> torch.Tensor:
    """(L, L) bool attention mask of one packed sequence made of splits (length, mode):
    "causal" (text), "full" (an image block), "noise" (a noised latent block: it sees itself and
    everything earlier, and no later row may attend to it). Every split sees all earlier ones."""
    L = sum(n for n, _ in splits)
    mask = torch.zeros(L, L, dtype=torch.bool, device=device)
    start = 0
    hidden_cols = torch.zeros(L, dtype=torch.bool, device=device)
    for n, mode in splits:
        end = start + n
        mask[start:end, :start] = ~hidden_cols[:start]
        if mode == "causal":
            mask[start:end, start:end] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        elif mode in ("full", "noise"):
            mask[start:end, start:end] = True
        else:
            raise ValueError(f"unknown attention mode {mode!r}")
        if mode == "noise":
            hidden_cols[start:end] = True
        start = end
    return mask
