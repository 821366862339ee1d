"""LTX-2 (`LTXAVModel`, audio and video in one transformer).

Its blocks take and return the two hidden states as one `(video, audio)`
tuple under "img". Each is cached as a module of its own with its own
module input: what the block feeds that stream's self-attention, the
weightless RMS norm modulated by the stream's first shift and scale (the
block's own `get_ada_values`, which also unpacks per-frame compressed
timesteps). A video-only run has an empty audio stream, which is passed
through untouched.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup
from .ltxv import RMS_NORM_EPS

# stream -> (its block argument's timestep, the block's table for that stream)
STREAM_MODULATION = {"video": ("v_timestep", "scale_shift_table"), "audio": ("a_timestep", "audio_scale_shift_table")}


class LTX2Adapter(BlockAdapter):
    family = "ltx2"
    model_classes = ("comfy.ldm.lightricks.av_model.LTXAVModel",)
    block_groups = (BlockGroup("double_block", "transformer_blocks", ("video", "audio"), separate_streams=True),)

    def read_streams(self, kind, values):
        video, audio = values["img"]
        return {"video": video, "audio": audio}

    def write_streams(self, kind, streams):
        return {"img": (streams["video"], streams["audio"])}

    def module_input(self, diffusion_model, kind, index, args, stream="video"):
        block = self.block(diffusion_model, kind, index)
        x = self.read_streams(kind, args)[stream]
        timestep_key, table_name = STREAM_MODULATION[stream]
        shift, scale = block.get_ada_values(getattr(block, table_name), x.shape[0], args[timestep_key], slice(0, 2))
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=RMS_NORM_EPS) * (1 + scale) + shift


ADAPTERS = (LTX2Adapter(),)
