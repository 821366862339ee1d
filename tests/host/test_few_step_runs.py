"""Short runs through the node (turbo and lightning models at 4 to 10 steps,
cfg 1): below 6 steps the run is left uncached, from 6 on the few-step mode
computes the first third of the blocks in every evaluation and predicts at
most one evaluation in a row; a speedup target the user set is kept. Block
executions are counted from outside the pack, on ComfyUI's own Flux."""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, rfc
from tiny_models import FLUX_CONFIG, build, counted, sample

BLOCKS = FLUX_CONFIG["depth"] + FLUX_CONFIG["depth_single_blocks"]
# Forced caching, with the node's own short-run policy (short_runs "auto").
AUTO = {name: value for name, value in FORCED.items() if name != "short_runs"}


@pytest.fixture(scope="module")
def flux(comfy):
    return build("Flux", FLUX_CONFIG)


def blocks_of(model_patcher):
    diffusion_model = model_patcher.model.diffusion_model
    return list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)


def run(model_patcher, patched, steps: int):
    return counted(blocks_of(model_patcher), lambda: sample(patched, steps=steps))


def test_an_eight_step_run_computes_the_head_of_every_evaluation(flux, nodes, caplog):
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    reference, reference_calls = run(flux, flux, 8)
    latent, calls = run(flux, rfc(nodes, flux, **AUTO), 8)
    # One warm-up, then predicted and computed in turn (max_skip 1), the
    # last step computed: 5 whole evaluations and 3 that run one of the 4
    # blocks (a third of them, rounded).
    assert reference_calls == 8 * BLOCKS
    assert calls == 5 * BLOCKS + 3 * 1
    assert "uses the few-step mode" in caplog.text
    assert "3 of them in the head that predicted evaluations compute" in caplog.text
    assert torch.isfinite(latent).all()
    assert ((latent - reference).norm() / reference.norm()).item() < 1.0


def test_a_four_step_run_is_left_uncached_and_says_why(flux, nodes, caplog):
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    reference, reference_calls = run(flux, flux, 4)
    latent, calls = run(flux, rfc(nodes, flux, **AUTO), 4)
    assert calls == reference_calls
    assert torch.equal(latent, reference)
    assert "a 4-step run is left uncached" in caplog.text


def test_a_speedup_target_on_a_short_run_is_kept(flux, nodes, caplog):
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    _, calls = run(flux, rfc(nodes, flux, **{**AUTO, "target_speedup": 2.0}), 4)
    assert calls == 2 * BLOCKS
    assert "few-step mode" not in caplog.text and "left uncached" not in caplog.text


def test_as_set_caches_a_short_run_with_the_widgets_as_they_are(flux, nodes, caplog):
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    _, calls = run(flux, rfc(nodes, flux, **FORCED), 8)
    # Whole evaluations, max_skip 2, the last step computed: 1, 2 predicted, 4, 2 predicted, 7, 8.
    assert calls == 4 * BLOCKS
    assert "few-step mode" not in caplog.text
