"""MiniMax H3 (`MiniMaxH3Model`, ComfyUI v0.31 and later): one transformer for
video and audio.

Its blocks run through `patches_replace["dit"][("double_block", i)]` on one
packed sequence of rows without a batch dimension (the model takes batch 1
only, so cond and uncond always come as chunks of their own):

    img  (rows, hidden): the text rows, the conditioning rows (keyframes,
         reference images, videos and audio), then the target audio rows
         and the target video rows;
    t_emb (M, t_dim): one row per distinct timestep of the call;
    mod_segments: [(start, stop, row)] covering `img` in order, where row =
         timestep index * 3 + modality (0 video, 1 text, 2 audio); later
         ComfyUI may give a segment a tensor of rows, one per row of `img`.
         The target audio and video are always its last two segments.

The block returns {"img"} and updates `img` in place.

Streams: `img` is read as three streams, each cached as a module of its own
(its own residuals and RFE step): the target video, the target audio, and
the prefix of text and conditioning rows. Each gets a batch dimension of one
(a view); the block's caller gets the three back as one packed `img`.

Module input: what the block feeds its attention's qkv linear on a stream's
rows, `norm1(x) * (1 + scale) + shift`, every segment with its own
timestep's shift and scale (the block's `_mod_scale_shift`). The video's
and the prefix's cover their own rows, so each keeps its own scale. The
audio's covers the audio and the video rows: the audio, a few hundred rows
beside tens of thousands of video rows, attends mostly to the video.
Measured on the tiny model (`benchmarks.minimax_streams`, random weights, 9
runs at equal compute): against one module input for the whole block, the
video's own rows cut the video error in 8 runs of 9 (up to 3.1 times, 4%
worse in one); the audio's own rows alone raised the audio error 1.3 to 2.9
times over this choice, which stays within 1.65 times of the one-module
audio error.

The first block's video takes each evaluation's decision (RCS): the text
and conditioning rows are left out of its error, as the Flux adapter leaves
out reference tokens (at the first block they move only with the timestep),
and so is the audio, as LTX-2's is.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .base import (BlockAdapter, BlockGroup, SampledRows, _log_rows_unreadable_once, channel_stride, token_stride,
                   weight_rows)

STREAMS = ("video", "audio", "prefix")
# The modulation linear's output per timestep row: for each of the three
# modalities, six chunks of `hidden` (shift, scale, gate for attention, then
# for the MLP); the module input takes the first two.
MODALITIES = 3
CHUNKS = 6


def stream_spans(mod_segments, rows: int) -> dict:
    """Each stream's (start, stop) in the packed rows, from the block's segments."""
    if len(mod_segments) < 2:
        raise ValueError(f"MiniMax H3 blocks got {len(mod_segments)} segments, expected the target audio and video")
    audio_start, audio_stop, _ = mod_segments[-2]
    video_start, video_stop, _ = mod_segments[-1]
    if audio_stop != video_start or video_stop != rows:
        raise ValueError("MiniMax H3's target audio and video are no longer the last two segments of its rows")
    return {"video": (video_start, video_stop), "audio": (audio_start, audio_stop), "prefix": (0, audio_start)}


def stream_segments(mod_segments, span) -> list:
    """The segments within one stream's span, relative to its start."""
    start, stop = span
    return [(a - start, b - start, row) for a, b, row in mod_segments if start <= a and b <= stop and a < b]


class MiniMaxH3Adapter(BlockAdapter):
    family = "minimax_h3"
    model_classes = ("comfy.ldm.minimax.model.MiniMaxH3Model",)
    block_groups = (BlockGroup("double_block", "blocks", STREAMS, separate_streams=True),)
    # The streams whose rows (contiguous, in this order) each stream's module input covers.
    module_input_rows = {"video": ("video",), "audio": ("audio", "video"), "prefix": ("prefix",)}

    def __init__(self):
        # The spans of the block call in progress on this thread: its output
        # ({"img"} alone) is read with the spans its arguments had.
        self._spans = threading.local()

    def read_streams(self, kind, values):
        packed = values["img"]
        if "mod_segments" in values:
            self._spans.current = stream_spans(values["mod_segments"], packed.shape[0])
        spans = self._spans.current
        if packed.shape[0] != spans["video"][1]:
            raise ValueError("a MiniMax H3 block returned another number of rows than it got")
        batched = packed.unsqueeze(0)
        return {name: batched[:, start:stop] for name, (start, stop) in spans.items()}

    def write_streams(self, kind, streams):
        return {"img": torch.cat([streams["prefix"], streams["audio"], streams["video"]], dim=1)[0]}

    def modulation_linear(self, diffusion_model, kind, index):
        return self.block(diffusion_model, kind, index).adaln_proj.linear

    def module_input(self, diffusion_model, kind, index, args, stream="video"):
        block = self.block(diffusion_model, kind, index)
        t_emb = args["t_emb"]
        self.prepare_sampled_rows(diffusion_model, t_emb)
        shift, scale = block.adaln_proj(t_emb)[:2]
        return self._modulated(block, args, stream, shift, 1 + scale, tokens_step=None)

    def sampled_module_input(self, diffusion_model, kind, index, args, stream="video"):
        block = self.block(diffusion_model, kind, index)
        t_emb, hidden = args["t_emb"], args["img"].shape[-1]
        step = channel_stride(hidden)
        stack = self._attention_rows(diffusion_model, t_emb, step, hidden)
        if stack is not None:
            shift, gain = (rows.reshape(rows.shape[0] * MODALITIES, -1) for rows in stack.rows_for((kind, index), t_emb))
        else:
            shift, scale = block.adaln_proj(t_emb)[:2]
            shift, gain = shift[:, ::step], 1 + scale[:, ::step]
        return self._modulated(block, args, stream, shift, gain, tokens_step=True, channels_step=step)

    def _modulated(self, block, args, stream, shift, gain, tokens_step, channels_step=1):
        """The stream's rows as the block modulates them for its attention,
        (1, rows, hidden); with tokens_step, on every token_stride-th row and
        every channels_step-th channel (shift and gain already strided)."""
        packed, mod_segments = args["img"], args["mod_segments"]
        spans = stream_spans(mod_segments, packed.shape[0])
        covered = self.module_input_rows[stream]
        span = (spans[covered[0]][0], spans[covered[-1]][1])
        rows = packed[span[0]:span[1]]
        step = token_stride(rows.shape[0]) if tokens_step else 1
        normed = block.norm1(rows[::step])
        if channels_step > 1:
            normed = normed[..., ::channels_step]
        segments = stream_segments(mod_segments, span)
        if len(segments) == 1 and not isinstance(segments[0][2], torch.Tensor):
            row = segments[0][2]
            modulated = torch.addcmul(shift[row].to(normed.dtype), normed, gain[row].to(normed.dtype))
        else:
            per_row = torch.cat([row.to(shift.device) if isinstance(row, torch.Tensor)
                                 else torch.full((b - a,), row, dtype=torch.long, device=shift.device)
                                 for a, b, row in segments])[::step]
            modulated = torch.addcmul(shift[per_row].to(normed.dtype), normed, gain[per_row].to(normed.dtype))
        return modulated.unsqueeze(0)

    def _attention_rows(self, diffusion_model, t_emb, stride: int, hidden: int) -> SampledRows | None:
        """This run's stacked attention shift and scale rows of every block,
        every stride-th channel, for all three modalities; None where the
        stride keeps every channel or a block's rows cannot be read (the
        block's modulation layer is run instead)."""
        if stride == 1:
            return None
        stacks = self.__dict__.setdefault("_sampled_rows", weakref.WeakKeyDictionary())
        stack = stacks.get(diffusion_model, False)
        if stack is False or (stack is not None and not stack.is_current_for(t_emb)):
            layers, rows = {}, {}
            width = hidden // stride
            # chunk c of modality m starts at row (m * CHUNKS + c) * hidden, at (m * CHUNKS + c) * width once strided
            picks = [slice((m * CHUNKS + c) * width, (m * CHUNKS + c + 1) * width)
                     for c in (0, 1) for m in range(MODALITIES)]
            for kind, index in self.block_keys(diffusion_model):
                layer = self.modulation_linear(diffusion_model, kind, index)
                found = weight_rows(layer, slice(0, MODALITIES * CHUNKS * hidden, stride), t_emb)
                if isinstance(found, str):
                    _log_rows_unreadable_once(self.family, type(layer).__name__, found)
                    layers = None
                    break
                weight, bias = found
                layers[(kind, index)] = layer
                rows[(kind, index)] = (torch.cat([weight[pick] for pick in picks]),
                                       None if bias is None else torch.cat([bias[pick] for pick in picks]))
            activate = getattr(self.block(diffusion_model, "double_block", 0).adaln_proj, "apply_silu", True)
            stack = stacks[diffusion_model] = (SampledRows(layers, rows, chunks=2, gain_from=1, activate=activate)
                                               if layers else None)
        return stack


ADAPTERS = (MiniMaxH3Adapter(),)
