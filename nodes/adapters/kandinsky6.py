"""Kandinsky 6 (`Kandinsky6`, video and audio in one transformer; ComfyUI
after v0.31).

Its fused blocks take the visual and the audio tokens through
`patches_replace["dit"]["double_block"]` (args "visual" and "audio", the time
embeddings "tev" and "tea") and return both. Each stream is cached as a
module of its own, as LTX-2's are: two modalities whose changes differ in
size and timing. The text blocks before them run once per evaluation on the
caption only and have no patch point; they are not cached.

Module input of each stream: what the block feeds that stream's
self-attention, the stream's norm modulated by the first shift and scale of
its `visual_modulation` of the stream's time embedding (the block computes
it in float32; so does this).

The model's own MagCache (`transformer_options["k6_magcache"]`) skips every
block of an evaluation on its own schedule; RFC refuses to run beside it
(nodes.runtime.refuse_other_cache).
"""

from __future__ import annotations

from .base import BlockAdapter, BlockGroup

# stream -> (the block's sub-block for it, its time embedding's argument)
STREAM_PARTS = {"visual": ("videoT", "tev"), "audio": ("audioT", "tea")}


class Kandinsky6Adapter(BlockAdapter):
    family = "kandinsky6"
    model_classes = ("comfy.ldm.kandinsky6.model.Kandinsky6",)
    block_groups = (BlockGroup("double_block", "visual_blocks", ("visual", "audio"), separate_streams=True),)

    def module_input(self, diffusion_model, kind, index, args, stream="visual"):
        part, time_embedding = STREAM_PARTS[stream]
        decoder = getattr(self.block(diffusion_model, kind, index), part)
        modulation = decoder.visual_modulation
        self_attention = modulation.out_layer(modulation.activation(args[time_embedding].float())).float()
        shift, scale, _ = self_attention.chunk(3, dim=-1)[0].unsqueeze(1).chunk(3, dim=-1)
        x = args[stream]
        return (decoder.self_attention_norm(x.float()) * (scale + 1.0) + shift).to(x.dtype)


ADAPTERS = (Kandinsky6Adapter(),)
