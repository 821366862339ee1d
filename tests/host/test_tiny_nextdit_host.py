"""The project's TinyNextDiT against ComfyUI's own NextDiT (Lumina 2 and
Z-Image's class): the bundled weights, and Z-Image's modulation variant on
random weights where this ComfyUI has it."""

from __future__ import annotations

import pytest
import torch

from benchmarks.host import comfy_nextdit
from benchmarks.tiny_flux import LABEL_TOKENS_KEY
from benchmarks.tiny_nextdit import BUNDLED_NEXTDIT_WEIGHTS, TinyNextDiT, load_bundled_nextdit


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def same_output(ours: TinyNextDiT, theirs, context: torch.Tensor) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(context.shape[0], ours.in_channels, 16, 16, generator=generator)
    sigma = torch.linspace(0.95, 0.05, context.shape[0])
    with torch.no_grad():
        expected = theirs(x, sigma, context, context.shape[1])
        actual = ours(x, sigma, context)
    assert actual.shape == expected.shape == x.shape
    return relative_error(actual, expected)


def test_bundled_weights_give_the_same_output_in_comfyui_nextdit(comfy):
    from safetensors.torch import load_file

    ours, encoder, _ = load_bundled_nextdit()
    state = {k: v.float() for k, v in load_file(str(BUNDLED_NEXTDIT_WEIGHTS)).items() if k != LABEL_TOKENS_KEY}
    theirs = comfy_nextdit(ours.config, state)
    assert theirs is not None, "every supported ComfyUI builds the Lumina 2 layout"
    tokens, _ = encoder(torch.tensor([0, 5, 14, encoder.empty]))
    assert same_output(ours, theirs, tokens) < 1e-4


def test_z_image_modulation_gives_the_same_output(comfy):
    config = {**load_bundled_nextdit()[0].config, "dim": 256, "n_heads": 8, "n_kv_heads": 8, "n_layers": 2,
              "z_image_modulation": True, "time_scale": 1000.0, "rope_theta": 256.0}
    torch.manual_seed(0)
    ours = TinyNextDiT(config).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0.0, 0.05)
    theirs = comfy_nextdit(config, ours.state_dict())
    if theirs is None:
        pytest.skip("this ComfyUI's NextDiT has no Z-Image modulation (it came with Z-Image support)")
    context = torch.randn(2, 4, config["cap_feat_dim"], generator=torch.Generator().manual_seed(1))
    assert same_output(ours, theirs, context) < 1e-4
