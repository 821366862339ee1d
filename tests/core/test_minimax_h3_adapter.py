"""The MiniMax H3 adapter's module input on plain torch stand-ins, without
ComfyUI: segments whose modulation row is one index (v0.31) or a tensor of
indices, one per row (later ComfyUI, for rows a denoise mask keeps at their
own timestep), full and sampled, and the packed rows read and written back."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from benchmarks.methods import PACK_NAME, load_pack

load_pack()
adapters = sys.modules[f"{PACK_NAME}.nodes.adapters"]
base = sys.modules[f"{PACK_NAME}.nodes.adapters.base"]

HIDDEN, T_DIM, MODALITIES, CHUNKS = 16, 8, 3, 6


class AdalnProj(torch.nn.Module):
    """(M, t_dim) -> six (M * 3, hidden) chunks, one row per timestep and modality."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(T_DIM, CHUNKS * HIDDEN * MODALITIES)
        self.apply_silu = True

    def forward(self, t_emb):
        out = self.linear(torch.nn.functional.silu(t_emb))
        return out.view(out.shape[0] * MODALITIES, CHUNKS * HIDDEN).chunk(CHUNKS, dim=-1)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.RMSNorm(HIDDEN, eps=1e-5)
        self.adaln_proj = AdalnProj()

    def attention_input(self, x, t_emb, mod_segments):
        """What the block feeds its attention: every segment at its own row(s)."""
        shift, scale = self.adaln_proj(t_emb)[:2]
        h = self.norm1(x)
        for start, stop, row in mod_segments:
            h[start:stop] = h[start:stop] * (1 + scale[row]) + shift[row]
        return h


def stand_in_model(blocks=2):
    cls = types.new_class("MiniMaxH3Model", (torch.nn.Module,))
    cls.__module__, cls.__qualname__ = "comfy.ldm.minimax.model", "MiniMaxH3Model"
    model = cls()
    model.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))
    return model


# 5 text rows in two tag runs, 4 keyframe rows, 6 audio rows, 9 video rows;
# timestep rows 0..2, so modulation rows 0..8 (timestep * 3 + modality).
TEXT, COND, AUDIO, VIDEO = 5, 4, 6, 9
ROWS = TEXT + COND + AUDIO + VIDEO


def segments(per_row_video: bool):
    video = torch.tensor([0, 0, 3, 3, 3, 6, 6, 0, 3]) if per_row_video else 0
    return [(0, 3, 1), (3, 5, 0), (5, TEXT + COND, 3 * 2 + 0),
            (TEXT + COND, TEXT + COND + AUDIO, 3 * 1 + 2), (TEXT + COND + AUDIO, ROWS, video)]


SPANS = {"prefix": (0, TEXT + COND), "audio": (TEXT + COND, ROWS), "video": (TEXT + COND + AUDIO, ROWS)}


@pytest.fixture
def model_and_args():
    torch.manual_seed(0)
    model = stand_in_model()
    return model, {"t_emb": torch.randn(3, T_DIM), "rope_freqs": None, "transformer_options": {}}


@pytest.mark.parametrize("per_row_video", [False, True])
def test_module_input_is_what_the_block_feeds_its_attention(model_and_args, per_row_video):
    model, args = model_and_args
    adapter = adapters.detect_adapter(model)
    assert adapter.family == "minimax_h3"
    args = {**args, "img": torch.randn(ROWS, HIDDEN), "mod_segments": segments(per_row_video)}
    with torch.no_grad():
        for index, block in enumerate(model.blocks):
            fed = block.attention_input(args["img"], args["t_emb"], args["mod_segments"])
            for stream, (start, stop) in SPANS.items():
                value = adapter.module_input(model, "double_block", index, args, stream=stream)
                torch.testing.assert_close(value, fed[start:stop].unsqueeze(0), msg=f"{index} {stream}")


@pytest.mark.parametrize("per_row_video", [False, True])
def test_sampled_module_input_is_a_sample_of_the_full_one(model_and_args, monkeypatch, per_row_video):
    model, args = model_and_args
    adapter = adapters.detect_adapter(model)
    monkeypatch.setattr(base, "MODULE_INPUT_TOKENS", 2)
    monkeypatch.setattr(base, "MODULE_INPUT_CHANNELS", 4)
    args = {**args, "img": torch.randn(ROWS, HIDDEN), "mod_segments": segments(per_row_video)}
    with torch.no_grad():
        for index in range(len(model.blocks)):
            for stream in SPANS:
                full = adapter.module_input(model, "double_block", index, args, stream=stream)
                sampled = adapter.sampled_module_input(model, "double_block", index, args, stream=stream)
                expected = base.sample_of(full, base.token_stride(full.shape[1]), base.channel_stride(HIDDEN))
                assert sampled.shape == expected.shape and expected.shape[-1] < HIDDEN
                torch.testing.assert_close(sampled, expected, msg=f"{index} {stream}")
    adapter.end_run(model)


def test_the_packed_rows_are_read_as_three_streams_and_written_back(model_and_args):
    model, _ = model_and_args
    adapter = adapters.detect_adapter(model)
    packed = torch.randn(ROWS, HIDDEN)
    streams = adapter.read_streams("double_block", {"img": packed, "mod_segments": segments(False)})
    assert {name: tuple(value.shape) for name, value in streams.items()} == {
        "video": (1, VIDEO, HIDDEN), "audio": (1, AUDIO, HIDDEN), "prefix": (1, TEXT + COND, HIDDEN)}
    # The block's output has no segments: it is read with the spans of the call in progress.
    returned = adapter.read_streams("double_block", {"img": packed * 2})
    torch.testing.assert_close(returned["video"], 2 * streams["video"])
    torch.testing.assert_close(adapter.write_streams("double_block", returned)["img"], packed * 2)
    with pytest.raises(ValueError, match="last two segments"):
        adapter.read_streams("double_block", {"img": packed, "mod_segments": segments(False)[:-1]})
