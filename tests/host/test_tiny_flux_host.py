"""The project's TinyFlux against ComfyUI's own Flux on the bundled weights,
and the benchmark's standalone sampler against ComfyUI's sampler and nodes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.host import HostSampler, comfy_flux_from_bundled
from benchmarks.methods import Method, StandaloneSampler
from benchmarks.run import sample_set
from benchmarks.tiny_flux import load_bundled

STEPS = 20


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def test_bundled_weights_give_the_same_output_in_comfyui_flux(comfy):
    ours, encoder, _ = load_bundled()
    theirs = comfy_flux_from_bundled().model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 16, 16, generator=generator)
    sigma = torch.tensor([0.9, 0.5, 0.05])
    tokens, pooled = encoder(torch.tensor([0, 5, encoder.empty]))
    with torch.no_grad():
        expected = theirs(x, sigma, tokens, y=pooled)
        actual = ours(x, sigma, tokens, pooled)
    assert actual.shape == expected.shape == x.shape
    assert relative_error(actual, expected) < 1e-4


@pytest.fixture(scope="module")
def samplers(comfy):
    import os

    model, encoder, _ = load_bundled()
    labels, seeds = sample_set(4, len(encoder.names))
    return (StandaloneSampler(model, encoder, labels, seeds, STEPS, 3.0),
            HostSampler(os.environ["COMFYUI_PATH"], labels, seeds, STEPS, 3.0))


def test_standalone_sampler_matches_comfyui_sampling(samplers):
    standalone, host = samplers
    ours, theirs = standalone.run(None), host.run(None)
    assert theirs.nfc == STEPS
    assert relative_error(ours.latent, theirs.latent) < 1e-4


def test_benchmark_runs_what_the_node_runs(samplers):
    """RFC through the node inside ComfyUI takes the same decisions as the
    benchmark's standalone run of the same runtime."""
    standalone, host = samplers
    rfc = Method("RFC", "rfe", "rcs", 2)
    ours, theirs = standalone.run(rfc, 0.5, 50), host.run(rfc, 0.5, 50)
    assert ours.nfc == theirs.nfc < STEPS
    assert theirs.block_calls == ours.block_calls
    assert relative_error(ours.latent, theirs.latent) < 1e-3
