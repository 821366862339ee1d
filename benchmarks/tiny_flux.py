"""A compact Flux transformer in plain torch, written for this project.

It has ComfyUI's Flux architecture and state-dict layout (double-stream and
single-stream blocks, adaLN modulation, QK RMSNorm, 3-axis RoPE), so the
weights trained here load unchanged into ComfyUI's own Flux class; a host test
checks that both give the same output. Blocks are called through the same
`patches_replace["dit"]` protocol ComfyUI uses, so the pack's `CachedBlock`
runs on this model exactly as it runs inside ComfyUI.

The "VAE" of the bundled model is a pixel unshuffle: a 32x32 RGB image in
[-1, 1] is a 12-channel 16x16 latent, and decoding is the inverse shuffle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_WEIGHTS = ASSETS / "tiny_flux_skimage.safetensors"
# Its few-step student (benchmarks.train_tiny_models --distil), sampled at cfg 1.
DISTILLED_WEIGHTS = ASSETS / "tiny_flux_distilled.safetensors"
# Keys of the label "text encoder": stored beside the Flux weights, outside
# the Flux namespace so ComfyUI's Flux class never sees them.
LABEL_TOKENS_KEY = "labels.tokens"
LABEL_POOLED_KEY = "labels.pooled"
# ComfyUI's Flux default: ModelSamplingFlux(shift=1.15).
FLUX_SHIFT = 1.15


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t)


def rope(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=positions.device)
    omega = 1.0 / (theta ** scale)
    angles = torch.einsum("...n,d->...nd", positions.to(torch.float32), omega)
    rotation = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], dim=-1)
    return rotation.reshape(*rotation.shape[:-1], 2, 2).float()


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


def attention(q, k, v, pe):
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, weight=self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


class ModulationOut:
    def __init__(self, shift, scale, gate):
        self.shift, self.scale, self.gate = shift, scale, gate


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        parts = self.lin(F.silu(vec[:, None, :])).chunk(self.multiplier, dim=-1)
        return ModulationOut(*parts[:3]), (ModulationOut(*parts[3:]) if self.multiplier == 6 else None)


def _split_heads(qkv: torch.Tensor, heads: int):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class DoubleStreamBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(width, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(width, heads, qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", _mlp(width, hidden))

    def _qkv(self, stream: str, x, mod):
        normed = getattr(self, f"{stream}_norm1")(x) * (1 + mod.scale) + mod.shift
        attn = getattr(self, f"{stream}_attn")
        q, k, v = _split_heads(attn.qkv(normed), self.heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, stream: str, x, attn_out, mod1, mod2):
        x = x + mod1.gate * getattr(self, f"{stream}_attn").proj(attn_out)
        normed = getattr(self, f"{stream}_norm2")(x) * (1 + mod2.scale) + mod2.shift
        return x + mod2.gate * getattr(self, f"{stream}_mlp")(normed)

    def forward(self, img, txt, vec, pe):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv("img", img, img_mod1)
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mod1)
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2),
                         torch.cat((txt_v, img_v), 2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        return (self._finish("img", img, img_attn, img_mod1, img_mod2),
                self._finish("txt", txt, txt_attn, txt_mod1, txt_mod2))


class SingleStreamBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.width = width
        self.mlp_hidden = int(width * mlp_ratio)
        self.linear1 = nn.Linear(width, 3 * width + self.mlp_hidden)
        self.linear2 = nn.Linear(width + self.mlp_hidden, width)
        self.norm = QKNorm(width // heads)
        self.pre_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(width, double=False)

    def forward(self, x, vec, pe):
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(self.pre_norm(x) * (1 + mod.scale) + mod.shift),
                               [3 * self.width, self.mlp_hidden], dim=-1)
        q, k, v = _split_heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), 2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, width: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class TinyFlux(nn.Module):
    """Flux with ComfyUI's parameter names; `config` takes the keys of
    ComfyUI's FluxParams. Guidance embedding is not implemented (the bundled
    model is guidance-free and uses real classifier-free guidance)."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("guidance_embed"):
            raise ValueError("TinyFlux does not implement guidance embedding")
        self.config = dict(config)
        width, heads = config["hidden_size"], config["num_heads"]
        if sum(config["axes_dim"]) != width // heads:
            raise ValueError(f"axes_dim {config['axes_dim']} must sum to the head width {width // heads}")
        self.patch_size = config["patch_size"]
        patch_area = self.patch_size ** 2
        self.img_in = nn.Linear(config["in_channels"] * patch_area, width)
        self.time_in = MLPEmbedder(256, width)
        self.vector_in = MLPEmbedder(config["vec_in_dim"], width)
        self.txt_in = nn.Linear(config["context_in_dim"], width)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(width, heads, config["mlp_ratio"], config["qkv_bias"]) for _ in range(config["depth"]))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(width, heads, config["mlp_ratio"]) for _ in range(config["depth_single_blocks"]))
        self.final_layer = LastLayer(width, config["out_channels"] * patch_area)

    def positional_embedding(self, batch: int, txt_tokens: int, height: int, width: int, device) -> torch.Tensor:
        img_ids = torch.zeros(height, width, 3, device=device)
        img_ids[..., 1] = torch.arange(height, device=device, dtype=torch.float32)[:, None]
        img_ids[..., 2] = torch.arange(width, device=device, dtype=torch.float32)[None, :]
        ids = torch.cat([torch.zeros(txt_tokens, 3, device=device), img_ids.reshape(-1, 3)])
        axes = self.config["axes_dim"]
        pe = torch.cat([rope(ids[:, i], axes[i], self.config["theta"]) for i in range(3)], dim=-3)
        return pe[None, None].expand(batch, 1, *pe.shape)

    def forward(self, x, sigma, context, y, transformer_options: dict | None = None):
        """x: (B, C, H, W) latent; sigma: (B,); context: (B, T, context_in_dim);
        y: (B, vec_in_dim). transformer_options may carry
        patches_replace["dit"] entries, called as ComfyUI calls them."""
        transformer_options = transformer_options if transformer_options is not None else {}
        batch, _, height, width = x.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        img = x.reshape(batch, -1, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(sigma, 256).to(img.dtype)) + self.vector_in(y)
        txt = self.txt_in(context)
        pe = self.positional_embedding(batch, txt.shape[1], rows, cols, x.device)

        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": transformer_options}
            if ("double_block", i) in replace:
                def original(a, block=block):
                    out_img, out_txt = block(a["img"], a["txt"], a["vec"], a["pe"])
                    return {"img": out_img, "txt": out_txt}
                out = replace[("double_block", i)](args, {"original_block": original})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, vec, pe)

        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                def original(a, block=block):
                    return {"img": block(a["img"], a["vec"], a["pe"])}
                args = {"img": img, "vec": vec, "pe": pe, "transformer_options": transformer_options}
                img = replace[("single_block", i)](args, {"original_block": original})["img"]
            else:
                img = block(img, vec, pe)
        img = self.final_layer(img[:, txt.shape[1]:], vec)
        out = img.reshape(batch, rows, cols, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, -1, height, width)


def pixels_to_latent(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] to the (B, 12, H/2, W/2) latent."""
    return F.pixel_unshuffle(images, 2)


def latent_to_pixels(latent: torch.Tensor) -> torch.Tensor:
    """The latent back to (B, 3, H, W) RGB in [0, 1]."""
    return ((F.pixel_shuffle(latent.float(), 2) + 1) / 2).clamp(0, 1)


def simple_schedule(steps: int, table_size: int, sigma_at) -> torch.Tensor:
    """ComfyUI's "simple" scheduler: steps evenly strided from the top of a
    model sampling's table of `table_size` timesteps t in (0, 1], each
    mapped by sigma_at(t), then 0: steps+1 sigmas."""
    stride = table_size / steps
    return torch.tensor([sigma_at((table_size - int(i * stride)) / table_size) for i in range(steps)] + [0.0])


def flux_sigmas(steps: int, shift: float = FLUX_SHIFT) -> torch.Tensor:
    """The "simple" schedule on ModelSamplingFlux: steps+1 sigmas from 1 to 0."""
    return simple_schedule(steps, 10000, lambda t: math.exp(shift) / (math.exp(shift) + (1 / t - 1)))


class LabelEncoder:
    """The bundled model's "text encoder": a learned token sequence and
    pooled vector per class label; the last row is the empty (dropped) label."""

    def __init__(self, tokens: torch.Tensor, pooled: torch.Tensor, names: list[str]):
        self.tokens, self.pooled, self.names = tokens, pooled, names

    @property
    def empty(self) -> int:
        return self.tokens.shape[0] - 1

    def __call__(self, labels: torch.Tensor):
        """Token sequences and pooled vectors (None for a model without one)."""
        return self.tokens[labels], None if self.pooled is None else self.pooled[labels]


def bundled_metadata(path: Path = BUNDLED_WEIGHTS) -> dict:
    """The safetensors metadata: Flux config, label names, training settings."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def load_bundled(path: Path = BUNDLED_WEIGHTS, dtype=torch.float32):
    """The trained model, its label encoder and its metadata."""
    from safetensors.torch import load_file

    metadata = bundled_metadata(path)
    state = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
    config = json.loads(metadata["flux_config"])
    model = TinyFlux(config)
    labels = LabelEncoder(state.pop(LABEL_TOKENS_KEY), state.pop(LABEL_POOLED_KEY), json.loads(metadata["labels"]))
    model.load_state_dict(state)
    return model.eval(), labels, metadata
