"""Whole-model caching of the ComfyUI v0.31 families the pack deliberately
leaves without a block adapter: the APPLY_MODEL call is the cached module.

* HiDreamO1: any block patch turns off its prefix K/V cache, so every step
  would run the full-length cold path.
* StableAudio3: its block patch point drops `local_add_cond`, so even a
  pass-through block patch changes the output.
* SeedVR2: NaViT-packed tokens without a batch dim, and no DIFFUSION_MODEL
  wrapper.
* PixelDiTT2I and PiD: two block stacks in pixel space (patch tokens, then
  pixel tokens), and PiD adds an LQ injection before each patch block.
* CogVideoX_T2V: no block patch point; its blocks would need object patches
  of a (hidden, encoder) pair the pack has no adapter for.
* ACEStep15: no block patch point, no DIFFUSION_MODEL wrapper, and no
  transformer_options reach its layers.
* Boogu: no block patch point, no DIFFUSION_MODEL wrapper, and two block
  stacks after three refiners.

The families do not exist in older ComfyUI; `tiny_models.build` skips there.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, FamilyContract, FamilySpec, forced_full_evaluations, rfc
from tiny_models import build


def _text(width: int, tokens: int = 8, **extras):
    """Seeded text conditioning of `width`, with `extras` (callables get
    (batch, generator))."""
    def make(batch: int, seed: int) -> list:
        generator = torch.Generator().manual_seed(seed)
        cross = torch.randn(batch, tokens, width, generator=generator)
        values = {key: value(batch, generator) if callable(value) else value for key, value in extras.items()}
        return [[cross, values]]
    return make


def _fill_inv_freq(diffusion_model) -> None:
    """Standard RoPE values for `inv_freq` buffers a checkpoint would supply
    (left empty, they give NaN)."""
    with torch.no_grad():
        for name, buffer in diffusion_model.named_buffers():
            if name.endswith("inv_freq") and buffer.ndim == 1:
                half = buffer.shape[0]
                buffer.copy_(1.0 / (10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half))))


# --- HiDreamO1 -------------------------------------------------------------

TMS_TOKEN = 151673  # <|tms|>, the token whose embedding carries the timestep


def hidream_o1_text(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(300, 5000, (3,), generator=generator).tolist()
    ids = torch.tensor([[151644, 872, 198, *prompt, 151645, 198, 151644, 77091, 198, 151670, TMS_TOKEN]])
    # The cross_attn slot is a surrogate the model ignores; the ids drive it.
    return [[ids.unsqueeze(-1).float().expand(batch, -1, -1), {"text_input_ids": ids}]]


HIDREAM_O1 = FamilySpec(
    name="HiDreamO1Transformer", config_class="HiDreamO1", granularity="model",
    unet_config={
        "image_model": "hidream_o1",
        "text_config_overrides": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                                  "rope_dims": [6, 5, 5]},
        "vision_config_overrides": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "depth": 1,
                                    "num_position_embeddings": 64},
    },
    latent_shape=(3, 64, 64), conditioning=hidream_o1_text,
    # one pass of the decoder layers per forward, cold (full) or hot (K/V cached prefix)
    counted_modules=lambda dm: [dm.language_model.layers[0]],
)


# --- StableAudio3 ----------------------------------------------------------

STABLE_AUDIO3 = FamilySpec(
    name="AudioDiffusionTransformer", config_class="StableAudio3", granularity="model",
    unet_config={"audio_model": "dit1.0", "global_cond_shared_embed": True, "global_cond_type": "adaLN",
                 "global_cond_dim": 768, "embed_dim": 64, "num_heads": 2, "depth": 2, "io_channels": 256,
                 "cond_token_dim": 768, "project_cond_tokens": True, "timestep_features_type": "expo",
                 "local_add_cond_dim": 257, "num_memory_tokens": 4, "input_concat_dim": 0},
    latent_shape=(256, 32), conditioning=_text(768, seconds_total=3),
    counted_modules=lambda dm: [dm.transformer.layers[0]], prepare=_fill_inv_freq,
)


def seconds_total_weights() -> dict:
    """The seconds_total embedder weights Stable Audio 3's model loads
    strictly while it is built; zeros, the random fill replaces them."""
    import comfy.ldm.audio.embedders

    embedder = comfy.ldm.audio.embedders.NumberConditioner(768, min_val=0, max_val=384,
                                                           fourier_features_type="expo")
    return {f"conditioner.conditioners.seconds_total.{key}": torch.zeros_like(value)
            for key, value in embedder.state_dict().items()}


# --- SeedVR2 ---------------------------------------------------------------

SEEDVR2 = FamilySpec(
    name="NaDiT", config_class="SeedVR2", granularity="model",
    unet_config={"vid_dim": 64, "heads": 2, "head_dim": 32, "num_layers": 2, "mm_layers": 1, "norm_eps": 1e-5,
                 "mlp_type": "swiglu", "txt_in_dim": 32, "rope_dim": 16, "vid_out_norm": True},
    latent_shape=(16, 2, 8, 8),
    conditioning=_text(32, condition=lambda batch, generator: torch.randn(batch, 17, 2, 8, 8, generator=generator)),
    counted_modules=lambda dm: [dm.blocks[0]],
)


# --- PixelDiTT2I and PiD ---------------------------------------------------

PIXELDIT_CONFIG = {"in_channels": 3, "num_groups": 2, "hidden_size": 64, "pixel_hidden_size": 8,
                   "pixel_attn_hidden_size": 32, "pixel_num_groups": 2, "patch_depth": 2, "pixel_depth": 1,
                   "patch_size": 8, "txt_embed_dim": 32, "txt_max_length": 16}

PIXELDIT = FamilySpec(
    name="PixDiT_T2I", config_class="PixelDiTT2I", granularity="model",
    unet_config=PIXELDIT_CONFIG, latent_shape=(3, 32, 32), conditioning=_text(32),
    counted_modules=lambda dm: [dm.patch_blocks[0]],
)

PID = FamilySpec(
    name="PidNet", config_class="PiD", granularity="model",
    unet_config={**PIXELDIT_CONFIG, "lq_latent_channels": 16, "lq_hidden_dim": 32, "lq_num_res_blocks": 1,
                 "lq_interval": 1, "sr_scale": 4, "latent_spatial_down_factor": 8},
    latent_shape=(3, 64, 64),
    conditioning=_text(32, lq_latent=lambda batch, generator: torch.randn(batch, 16, 2, 2, generator=generator),
                       degrade_sigma=lambda batch, generator: torch.full((batch,), 0.1)),
    counted_modules=lambda dm: [dm.patch_blocks[0]],
)


# --- CogVideoX_T2V, ACEStep15, Boogu ---------------------------------------

COGVIDEOX = FamilySpec(
    name="CogVideoXTransformer3DModel", config_class="CogVideoX_T2V", granularity="model",
    unet_config={"num_attention_heads": 2, "attention_head_dim": 32, "time_embed_dim": 32, "text_embed_dim": 32,
                 "num_layers": 2, "in_channels": 16, "out_channels": 16, "patch_size": 2,
                 "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False},
    latent_shape=(16, 2, 8, 8), conditioning=_text(32),
    counted_modules=lambda dm: [dm.blocks[0]],
    # Its v-prediction schedule starts at sigma 4519 and is at 64 one step
    # later: the noisy latent, its whole-model module input, changes 69-fold.
    second_evaluation_computed=True,
)

ACESTEP15 = FamilySpec(
    name="AceStepConditionGenerationModel", config_class="ACEStep15", granularity="model",
    unet_config={"audio_model": "ace1.5", "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                 "num_kv_heads": 2, "head_dim": 32, "encoder_hidden_size": 64, "encoder_num_heads": 2,
                 "encoder_intermediate_size": 128, "num_dit_layers": 2, "num_lyric_layers": 1,
                 "num_timbre_layers": 1, "num_tokenizer_layers": 1, "text_hidden_dim": 32, "fsq_dim": 64},
    latent_shape=(64, 24),
    conditioning=_text(32, conditioning_lyrics=lambda batch, generator: torch.randn(batch, 6, 32,
                                                                                     generator=generator)),
    counted_modules=lambda dm: [dm.decoder.layers[0]],
)

BOOGU = FamilySpec(
    name="BooguTransformer2DModel", config_class="Boogu", granularity="model",
    unet_config={"image_model": "boogu", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 2,
                 "num_double_stream_layers": 2, "num_refiner_layers": 1, "num_attention_heads": 2,
                 "num_kv_heads": 1, "multiple_of": 16, "axes_dim_rope": (8, 12, 12), "axes_lens": (64, 64, 64),
                 "instruction_feat_dim": 32},
    latent_shape=(16, 8, 8),
    # ComfyUI counts `num_tokens` from the mask of one prompt: batch 1 whatever the latent batch
    conditioning=_text(32, attention_mask=torch.ones(1, 8, dtype=torch.long)),
    counted_modules=lambda dm: [dm.double_stream_layers[0]],
)


# --- the contract ----------------------------------------------------------

class TestHiDreamO1(FamilyContract):
    spec = HIDREAM_O1

    def test_whole_model_caching_keeps_the_prefix_kv_cache(self, model, nodes):
        """What a block patch would lose: under the cache, steps after the
        first still feed the layers only the tokens after the cached prefix."""
        diffusion_model = model.model.diffusion_model
        diffusion_model.clear_kv_cache()
        tokens = []
        handle = diffusion_model.language_model.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: tokens.append(kwargs["x"].shape[1]), with_kwargs=True)
        try:
            self.run(model, rfc(nodes, model, **FORCED), steps=6)
        finally:
            handle.remove()
        assert diffusion_model._kv_cache_entries
        assert len(tokens) == forced_full_evaluations(6)
        assert tokens[0] > tokens[1] == tokens[-1]


class TestStableAudio3(FamilyContract):
    spec = STABLE_AUDIO3

    @pytest.fixture(scope="class")
    def model(self, comfy):
        patcher = build(self.spec.config_class, self.spec.unet_config, checkpoint=seconds_total_weights)
        self.spec.prepare(patcher.model.diffusion_model)
        return patcher


class TestSeedVR2(FamilyContract):
    spec = SEEDVR2


class TestPixelDiTT2I(FamilyContract):
    spec = PIXELDIT


class TestPiD(FamilyContract):
    spec = PID


class TestCogVideoXT2V(FamilyContract):
    spec = COGVIDEOX


class TestACEStep15(FamilyContract):
    spec = ACESTEP15


class TestBoogu(FamilyContract):
    spec = BOOGU
