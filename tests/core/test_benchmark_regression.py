"""Regression guard on both bundled trained models: at about 10, 8 and 6
full computations of 50 steps, RFC's default (RFE + RCS, order 1) lands
closer to full compute than FORA, TaylorSeer (orders 1 and 2), EasyCache's
rule and Spectrum do with at least as much compute. Runs the benchmark's own
sampler and matching, on half of its sample set."""

from __future__ import annotations

import pytest
import torch

from benchmarks.methods import METHODS, StandaloneSampler
from benchmarks.metrics import psnr
from benchmarks.run import bundled_models, match, sample_set
from benchmarks.tiny_flux import BUNDLED_WEIGHTS, latent_to_pixels
from benchmarks.tiny_nextdit import BUNDLED_NEXTDIT_WEIGHTS

TARGETS = (10, 8, 6)
BASELINES = ("FORA (reuse, fixed)", "TaylorSeer m=1 (fixed)", "TaylorSeer m=2 (fixed)",
             "EasyCache rule (whole model)", "Spectrum (stack forecast)")
RFC = "RFC m=1 (RFE + RCS)"
WEIGHTS = {"flux": BUNDLED_WEIGHTS, "nextdit": BUNDLED_NEXTDIT_WEIGHTS}


@pytest.fixture(scope="module", params=sorted(WEIGHTS))
def results(request):
    """Per target: each baseline's (NFC, PSNR), and RFC's at the smallest of their NFCs."""
    if not WEIGHTS[request.param].exists():
        pytest.fail(f"the bundled model is missing: {WEIGHTS[request.param]}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    load, _, _ = bundled_models()[request.param]
    model, encoder, _ = load()
    labels, seeds = sample_set(8, len(encoder.names))
    sampler = StandaloneSampler(model, encoder, labels, seeds, steps=50, cfg=3.0)
    methods = {method.name: method for method in METHODS}
    reference = latent_to_pixels(sampler.run(None).latent)
    memo: dict = {}
    by_target = {}
    for target in TARGETS:
        baselines = {}
        for name in BASELINES:
            _, result = match(sampler, methods[name], target, 50, memo, reference)
            baselines[name] = (result.nfc, psnr(latent_to_pixels(result.latent), reference))
        budget = min(nfc for nfc, _ in baselines.values())
        _, rfc = match(sampler, methods[RFC], budget, 50, memo, reference)
        by_target[target] = (baselines, budget, rfc, psnr(latent_to_pixels(rfc.latent), reference))
    return request.param, sampler, by_target


@pytest.mark.parametrize("target", TARGETS)
def test_rfc_beats_every_baseline_at_matched_compute(results, target):
    model, sampler, by_target = results
    baselines, budget, rfc, rfc_psnr = by_target[target]
    assert rfc.nfc <= budget, f"{model}: RFC computed {rfc.nfc} evaluations, the baselines {budget}"
    assert rfc.block_calls < 50 * sampler.block_count
    for name, (nfc, baseline_psnr) in baselines.items():
        assert rfc_psnr > baseline_psnr, (f"{model}: RFC {rfc_psnr:.2f} dB at NFC {rfc.nfc} vs {name} "
                                          f"{baseline_psnr:.2f} dB at NFC {nfc}")
