"""BAGEL's image side outside the transformer: the FLUX VAE (diffusers), latent patches, the
rectified-flow schedule and classifier-free guidance, and the official image resize rule.

Conventions (tests/data/bagel-golden/README.md): encode = scale * (z - shift) with z a *sample*
mean + exp(logvar / 2) * eps; decode = decoder(latent / scale + shift); images (x / 2 + 0.5)
clamped, * 255, truncated to uint8. v predicts noise - data; x_t = (1 - t) x_0 + t eps; Euler
steps go from t = 1 to 0 on a shifted linspace. The VAE runs in fp32 (84M parameters; an fp32
decode matches the reference to 2e-6), the velocities and the CFG arithmetic in the model dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ---------------------------------------------------------------------------------------------
# VAE


def diffusers_vae_config(ae: dict) -> dict:
    """The diffusers AutoencoderKL config of a BFL-layout VAE given its AutoEncoderParams fields
    (ch, ch_mult, num_res_blocks, z_channels, scale_factor, shift_factor, resolution)."""
    n = len(ae["ch_mult"])
    return dict(
        in_channels=ae.get("in_channels", 3),
        out_channels=ae.get("out_ch", 3),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[ae["ch"] * m for m in ae["ch_mult"]],
        layers_per_block=ae["num_res_blocks"],
        latent_channels=ae["z_channels"],
        norm_num_groups=32,
        sample_size=ae.get("resolution", 256),
        scaling_factor=ae["scale_factor"],
        shift_factor=ae["shift_factor"],
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


FLUX_AE = dict(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
               z_channels=16, scale_factor=0.3611, shift_factor=0.1159)


class FluxVAE:
    """The generation autoencoder: diffusers' AutoencoderKL with BAGEL's scale / shift, frozen, fp32."""

    def __init__(self, vae, scale: float, shift: float):
        self.vae, self.scale, self.shift = vae, scale, shift

    @classmethod
    def load(cls, path: str | Path, ae: dict | None = None, device: str | torch.device = "cpu") -> FluxVAE:
        """`ae.safetensors` in the BFL layout, converted to diffusers names on load."""
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        from safetensors.torch import load_file

        ae = ae or FLUX_AE
        vae = AutoencoderKL.from_config(diffusers_vae_config(ae))
        state = convert_ldm_vae_checkpoint(load_file(str(path)), dict(vae.config))
        vae.load_state_dict(state, strict=True)
        vae.requires_grad_(False).eval().to(device)  # built in fp32 by from_config
        return cls(vae, ae["scale_factor"], ae["shift_factor"])

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2z, H/d, W/d): mean channels, then logvar."""
        return self.vae.encoder(pixels.float())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, eps: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent of a sample from the posterior (BAGEL samples even at inference)."""
        mean, logvar = self.moments(pixels).chunk(2, dim=1)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return self.scale * (mean + torch.exp(0.5 * logvar) * eps - self.shift)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, z, h, w) scaled latent -> (B, 3, H, W) pixels (about [-1, 1])."""
        return self.vae.decoder(latent.float() / self.scale + self.shift)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) decoder output -> (H, W, 3) uint8, truncating (no rounding) as the reference does."""
    return ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)


# ---------------------------------------------------------------------------------------------
# latent tokens


def patchify_latent(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(z, 2h, 2w) -> (h*w, p*p*z): p x p patches in (p, q, c) order, row-major over patches."""
    z, H, W = latent.shape
    x = latent.reshape(z, H // p, p, W // p, p)  # (z, h, p, w, q)
    return x.permute(1, 3, 2, 4, 0).reshape((H // p) * (W // p), p * p * z)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, z: int, p: int = 2) -> torch.Tensor:
    """(h*w, p*p*z) -> (z, p*h, p*w); the inverse of `patchify_latent`."""
    x = tokens.reshape(h, w, p, p, z)  # (h, w, p, q, z)
    return x.permute(4, 0, 2, 1, 3).reshape(z, h * p, w * p)


def patchify_image(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """(3, H, W) -> (H/p * W/p, p*p*3) ViT patches in (p, q, c) order."""
    return patchify_latent(pixels, p)


def grid_position_ids(h: int, w: int, side: int) -> torch.Tensor:
    """Ids r * side + c of an h x w grid (row-major): the 2-D tables' indexing."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (r * side + c).reshape(-1)


# ---------------------------------------------------------------------------------------------
# flow schedule and guidance


def flow_schedule(num_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation times t[0..N-2] and steps dt (N-1,): t = linspace(1, 0, N), t <- s t / (1 + (s-1) t)."""
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    return t[:-1], t[:-1] - t[1:]


def cfg_combine(v: torch.Tensor, v_text_uncond: torch.Tensor, v_img_uncond: torch.Tensor | None,
                text_scale: float, img_scale: float, renorm: str = "global", renorm_min: float = 0.0) -> torch.Tensor:
    """Combine the conditional and unconditional velocities (tokens, dim), in their dtype.

    v_t = v_tu + s_txt (v - v_tu). global / channel: v' = v_iu + s_img (v_t - v_iu), rescaled by
    clamp(|v| / (|v'| + 1e-8), renorm_min, 1) with norms over everything / per row. text_channel:
    rescale v_t per row that way first, then image CFG without renorm. s_img = 1 skips the image branch."""
    vt = v_text_uncond + text_scale * (v - v_text_uncond)
    if renorm == "text_channel":
        scale = (v.norm(dim=-1, keepdim=True) / (vt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
        vt = vt * scale
        return vt if img_scale == 1.0 else v_img_uncond + img_scale * (vt - v_img_uncond)
    out = vt if img_scale == 1.0 else v_img_uncond + img_scale * (vt - v_img_uncond)
    if renorm == "global":
        scale = (v.norm() / (out.norm() + 1e-8)).clamp(renorm_min, 1.0)
    elif renorm == "channel":
        scale = (v.norm(dim=-1, keepdim=True) / (out.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
    else:
        raise ValueError(f"unknown cfg renorm type {renorm!r}")
    return out * scale


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """x <- x - v dt with x in fp32 and v dt rounded once to v's dtype (the reference's order)."""
    return x - (v * dt.to(torch.float32)).to(v.dtype).float()


# ---------------------------------------------------------------------------------------------
# image preprocessing


def resize_size(w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int = 14 * 14 * 9216,
                img_num: int = 1) -> tuple[int, int]:
    """The official resize rule: fit max / min sides, snap to the stride (Python round: half to
    even), cap the pixel count at max_pixels / img_num by the pixel ratio, re-cap the long side."""

    def snap(v: float) -> int:
        return max(stride, round(v / stride) * stride)

    scale = min(max_size / max(w, h), 1.0)
    scale = max(scale, min_size / min(w, h))
    nw, nh = snap(round(w * scale)), snap(round(h * scale))
    cap = max_pixels / img_num
    if nw * nh > cap:
        r = cap / (nw * nh)
        nw, nh = snap(round(nw * r)), snap(round(nh * r))
    if max(nw, nh) > max_size:
        r = max_size / max(nw, nh)
        nw, nh = snap(round(nw * r)), snap(round(nh * r))
    return nw, nh


def transform_image(image: Image.Image, max_size: int, min_size: int, stride: int, max_pixels: int = 1806336,
                    img_num: int = 1) -> torch.Tensor:
    """PIL image -> (3, H', W') in [-1, 1]: the resize rule, PIL bicubic, (x/255 - 0.5) / 0.5."""
    image = image.convert("RGB")
    size = resize_size(*image.size, max_size, min_size, stride, max_pixels, img_num)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def to_pil(image_u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(image_u8.cpu().numpy(), "RGB")


def load_ae_params(folder: Path) -> dict:
    """AutoEncoderParams of a checkpoint folder: our `bagel_config.json` `ae` entry, else FLUX's."""
    f = folder / "bagel_config.json"
    if f.is_file():
        return json.loads(f.read_text()).get("ae", FLUX_AE)
    return FLUX_AE
