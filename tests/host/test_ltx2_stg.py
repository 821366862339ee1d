"""LTX-2 with spatio-temporal guidance (`LTXVSpatioTemporalGuidance`, ComfyUI
after v0.31; here from `../shared/comfy_overlay` laid over v0.31.0). Each
step runs one extra cond-only pass in which the listed blocks skip their
self-attention. That pass is a different function of the same input at the
same sigma: RFC must never predict one kind of pass from the other's cache,
and must keep STG's effect on the image."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from family_harness import FORCED, pack_module, rfc, sample_spec
from test_family_ltx2 import LTX2, LTX2_CONFIG
from tiny_models import build

STEPS = 12


@pytest.fixture(scope="module")
def stg(comfy):
    if importlib.util.find_spec("comfy_extras.nodes_overlay_newer") is None:
        pytest.skip("this ComfyUI has no LTXVSpatioTemporalGuidance (newer than v0.31: run the host tests on the "
                    "overlaid tree)")
    import comfy_extras.nodes_overlay_newer as newer

    def apply(patcher, blocks="1", scale=1.0):
        output = newer.LTXVSpatioTemporalGuidance.execute(patcher, scale, blocks, 0.0, 1.0)
        return output.result[0] if hasattr(output, "result") else output[0]

    return apply


@pytest.fixture(scope="module")
def ltx2(comfy):
    return build("LTXAV", LTX2_CONFIG)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_perturbed_and_plain_passes_never_share_a_cache(ltx2, nodes, stg, cfg, monkeypatch):
    runtime = pack_module(nodes, "nodes.runtime")
    seen = []  # (chunk, perturbed pass, predicted)
    run_block = runtime.SamplingSession.run_block

    def spy(session, kind, index, args, compute, transformer_options):
        perturbed = "stg_self_attn_blocks" in transformer_options
        predicts = session.run.predicts

        def watched(chunk_key, module_key, module_input):
            predicted = predicts(chunk_key, module_key, module_input)
            seen.append((chunk_key, perturbed, predicted))
            return predicted

        monkeypatch.setattr(session.run, "predicts", watched)
        try:
            return run_block(session, kind, index, args, compute, transformer_options)
        finally:
            monkeypatch.setattr(session.run, "predicts", predicts)

    monkeypatch.setattr(runtime.SamplingSession, "run_block", spy)
    sample_spec(LTX2, stg(rfc(nodes, ltx2, **FORCED)), steps=STEPS, cfg=cfg)
    kinds = {}
    for chunk_key, perturbed, _ in seen:
        kinds.setdefault(chunk_key, set()).add(perturbed)
    assert all(len(found) == 1 for found in kinds.values()), kinds
    assert {perturbed for _, perturbed, _ in seen} == {True, False}
    # Both kinds of pass are predicted, each from its own cache.
    assert {perturbed for _, perturbed, predicted in seen if predicted} == {True, False}


def test_caching_keeps_the_effect_of_stg(ltx2, nodes, stg, monkeypatch):
    """The perturbed pass follows the decision of the evaluation it belongs
    to, so both passes are predicted from points at the same sigmas and
    their errors largely cancel in the difference STG scales up. Measured on
    this model when each pass decided for itself: STG's effect went from
    14.8 to 46.1 under forced caching, and the cached run ended 36.4 away
    from the uncached one, against 10.9 without STG."""
    runtime = pack_module(nodes, "nodes.runtime")
    finished = []
    finish = runtime.SamplingSession.finish
    monkeypatch.setattr(runtime.SamplingSession, "finish", lambda session: (finished.append(session.run),
                                                                            finish(session))[1])
    plain = sample_spec(LTX2, ltx2, steps=STEPS, cfg=3.0)
    guided = sample_spec(LTX2, stg(ltx2, scale=3.0), steps=STEPS, cfg=3.0)
    cached_plain = sample_spec(LTX2, rfc(nodes, ltx2, **FORCED), steps=STEPS, cfg=3.0)
    cached = sample_spec(LTX2, stg(rfc(nodes, ltx2, **FORCED), scale=3.0), steps=STEPS, cfg=3.0)
    # The perturbed passes are no evaluations of their own: the same decisions as without STG.
    assert [e.computed for e in finished[-1].evaluations] == [e.computed for e in finished[-2].evaluations]
    assert len(finished[-1].evaluations) == STEPS
    effect, kept = (guided - plain).norm(), (cached - cached_plain).norm()
    error, error_without_stg = (cached - guided).norm(), (cached_plain - plain).norm()
    print(f"STG effect {effect:.4g}, with RFC {kept:.4g}; RFC's difference {error:.4g} with STG, "
          f"{error_without_stg:.4g} without")
    assert torch.isfinite(cached).all()
    assert effect > 0
    # STG moves the cached run about as much as the uncached one ...
    assert 0.5 * effect < kept < 1.5 * effect
    # ... and its guidance, three times a difference of two predictions, at most doubles RFC's own error.
    assert error < 2 * error_without_stg
