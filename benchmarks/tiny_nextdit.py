"""A compact NextDiT (Lumina Image 2.0 / Z-Image) in plain torch, written for
this project.

It has the architecture and state-dict layout of ComfyUI's NextDiT
(`comfy.ldm.lumina.model`): a caption refiner and a noise refiner, then one
stream of joint caption+image blocks, each with sandwich RMS norms around
attention and a SwiGLU feed-forward, a tanh-gated adaLN scale (no shift), QK
RMSNorm and 3-axis RoPE. `z_image_modulation` gives Z-Image's variant (the
adaLN input is a 256-wide timestep embedding taken without SiLU, and the
timestep is scaled by `time_scale`). A host test checks it against
ComfyUI's class on the bundled weights.

NextDiT has no `patches_replace`, so the pack reaches its main layers by
replacing each block's `forward` (an object patch in ComfyUI); the blocks
here take the same argument names so the same patch runs on them.

Timesteps follow ComfyUI's convention: the model is called with the flow
sigma (1 is pure noise), runs on t = 1 - sigma internally, and returns the
velocity noise - clean, as ComfyUI's NextDiT does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .tiny_flux import ASSETS, LABEL_TOKENS_KEY, LabelEncoder, apply_rope, rope, simple_schedule

BUNDLED_NEXTDIT_WEIGHTS = ASSETS / "tiny_nextdit_skimage.safetensors"
# ComfyUI's Z-Image sampling: ModelSamplingAuraFlow-style shift 3.0.
ZIMAGE_SHIFT = 3.0


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float | None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, weight=self.weight.to(x.dtype), eps=self.eps)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, output: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, output))

    def forward(self, t, dtype):
        return self.mlp(sinusoidal_embedding(t, 256).to(dtype))


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        # eps None: torch's default for the dtype, as ComfyUI's q/k norms.
        self.q_norm = RMSNorm(self.head_dim, None)
        self.k_norm = RMSNorm(self.head_dim, None)

    def forward(self, x, freqs_cis):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        # (B, tokens, heads, head_dim) to (B, heads, tokens, head_dim); RoPE per token.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def ffn_hidden(dim: int, multiplier: float, multiple_of: int) -> int:
    hidden = int(multiplier * dim)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class JointTransformerBlock(nn.Module):
    def __init__(self, config: dict, modulation: bool):
        super().__init__()
        dim, eps = config["dim"], config["norm_eps"]
        self.attention = JointAttention(dim, config["n_heads"])
        self.feed_forward = FeedForward(dim, ffn_hidden(dim, config["ffn_dim_multiplier"], config["multiple_of"]))
        self.attention_norm1, self.attention_norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.modulation = modulation
        if modulation:
            if config["z_image_modulation"]:
                self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, 256), 4 * dim))
            else:
                self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim))

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, timestep_zero_index=None, transformer_options=None):
        """The argument names of ComfyUI's block: the pack's object patch binds by them."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs_cis))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        attended = self.attention(self.attention_norm1(x) * (1 + scale_msa.unsqueeze(1)), freqs_cis)
        x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(attended)
        fed = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
        return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(fed)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_features: int, modulation_width: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(modulation_width, dim))

    def forward(self, x, c):
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c).unsqueeze(1)))


class TinyNextDiT(nn.Module):
    """NextDiT with ComfyUI's parameter names; `config` takes the keys of
    ComfyUI's NextDiT constructor. Not implemented: GQA, caption masks,
    pad tokens, pooled text (NewBie), reference latents (Z-Image Omni)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        dim, heads = config["dim"], config["n_heads"]
        if config.get("n_kv_heads") not in (None, heads):
            raise ValueError("TinyNextDiT does not implement grouped-query attention")
        if config.get("pad_tokens_multiple") is not None:
            raise ValueError("TinyNextDiT does not implement pad tokens")
        if sum(config["axes_dims"]) != dim // heads:
            raise ValueError(f"axes_dims {config['axes_dims']} must sum to the head width {dim // heads}")
        self.patch_size = config["patch_size"]
        self.in_channels = config["in_channels"]
        z_image = config["z_image_modulation"]
        # Z-Image's timestep embedding is 256 wide whatever the width (so
        # its variant needs dim >= 256); Lumina 2's is min(dim, 1024).
        modulation_width = 256 if z_image else min(dim, 1024)
        self.x_embedder = nn.Linear(self.patch_size ** 2 * self.in_channels, dim)
        self.noise_refiner = nn.ModuleList(JointTransformerBlock(config, True)
                                           for _ in range(config["n_refiner_layers"]))
        self.context_refiner = nn.ModuleList(JointTransformerBlock(config, False)
                                             for _ in range(config["n_refiner_layers"]))
        self.t_embedder = TimestepEmbedder(min(dim, 1024), modulation_width)
        self.cap_embedder = nn.Sequential(RMSNorm(config["cap_feat_dim"], config["norm_eps"]),
                                          nn.Linear(config["cap_feat_dim"], dim))
        self.layers = nn.ModuleList(JointTransformerBlock(config, True) for _ in range(config["n_layers"]))
        self.final_layer = FinalLayer(dim, self.patch_size ** 2 * self.in_channels, modulation_width)

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, tokens, 3) positions to (B, 1, tokens, head_dim / 2, 2, 2) rotations."""
        axes, theta = self.config["axes_dims"], self.config["rope_theta"]
        rotations = torch.cat([rope(positions[..., i], axes[i], theta) for i in range(3)], dim=-3)
        return rotations[:, None]

    def forward(self, x, sigma, context, transformer_options: dict | None = None):
        """x: (B, C, H, W) latent; sigma: (B,) flow sigma; context: (B, L,
        cap_feat_dim) caption features. Returns the velocity, (B, C, H, W)."""
        batch, channels, height, width = x.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        adaln_input = self.t_embedder((1.0 - sigma) * self.config["time_scale"], dtype=x.dtype)
        caption = self.cap_embedder(context)
        caption_tokens = caption.shape[1]
        # Caption tokens sit at 1..L on the first axis and image tokens at
        # L + 1 with their row and column, as ComfyUI places them (older
        # ComfyUI starts at 0: RoPE is relative, so the output is the same).
        caption_positions = torch.zeros(batch, caption_tokens, 3, device=x.device)
        caption_positions[..., 0] = torch.arange(caption_tokens, device=x.device, dtype=torch.float32) + 1
        image_positions = torch.zeros(batch, rows * cols, 3, device=x.device)
        image_positions[..., 0] = caption_tokens + 1
        image_positions[..., 1] = torch.arange(rows, device=x.device, dtype=torch.float32).repeat_interleave(cols)
        image_positions[..., 2] = torch.arange(cols, device=x.device, dtype=torch.float32).repeat(rows)
        caption_rope, image_rope = self.rope(caption_positions), self.rope(image_positions)

        for layer in self.context_refiner:
            caption = layer(caption, None, caption_rope)
        patches = x.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        image = self.x_embedder(patches)
        for layer in self.noise_refiner:
            image = layer(image, None, image_rope, adaln_input)

        joint = torch.cat((caption, image), dim=1)
        joint_rope = torch.cat((caption_rope, image_rope), dim=2)
        options = transformer_options if transformer_options is not None else {}
        for layer in self.layers:
            joint = layer(joint, None, joint_rope, adaln_input, transformer_options=options)
        out = self.final_layer(joint, adaln_input)[:, caption_tokens:]
        out = out.view(batch, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return -out.reshape(batch, channels, height, width)


def shifted_flow_sigmas(steps: int, shift: float = ZIMAGE_SHIFT) -> torch.Tensor:
    """ComfyUI's "simple" schedule on ModelSamplingDiscreteFlow(shift):
    steps+1 sigmas from 1 to 0 (Lumina 2 uses shift 6, Z-Image 3)."""
    return simple_schedule(steps, 1000, lambda t: shift * t / (1 + (shift - 1) * t))


def load_bundled_nextdit(path: Path = BUNDLED_NEXTDIT_WEIGHTS, dtype=torch.float32):
    """The trained NextDiT, its label encoder (tokens only) and its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
    model = TinyNextDiT(json.loads(metadata["nextdit_config"]))
    labels = LabelEncoder(state.pop(LABEL_TOKENS_KEY), None, json.loads(metadata["labels"]))
    model.load_state_dict(state)
    return model.eval(), labels, metadata
