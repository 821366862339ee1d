"""Regression guard on the bundled trained model: at about 10 full
computations of 50 steps, RFC lands closer to full compute than TaylorSeer
and FORA do with at least as much compute. Runs the benchmark's own
sampler and matching, on half of its sample set."""

from __future__ import annotations

import pytest
import torch

from benchmarks.methods import METHODS, StandaloneSampler
from benchmarks.metrics import psnr
from benchmarks.run import match, sample_set
from benchmarks.tiny_flux import BUNDLED_WEIGHTS, latent_to_pixels, load_bundled

TARGET_NFC = 10
BASELINES = ("FORA (reuse, fixed)", "TaylorSeer m=1 (fixed)", "TaylorSeer m=2 (fixed)")
RFC = "RFC m=1 (RFE + RCS)"


@pytest.fixture(scope="module")
def sampler():
    if not BUNDLED_WEIGHTS.exists():
        pytest.fail(f"the bundled model is missing: {BUNDLED_WEIGHTS}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, encoder, _ = load_bundled()
    labels, seeds = sample_set(8, len(encoder.names))
    return StandaloneSampler(model, encoder, labels, seeds, steps=50, cfg=3.0)


def test_rfc_beats_taylorseer_and_fora_at_matched_compute(sampler):
    methods = {method.name: method for method in METHODS}
    reference = latent_to_pixels(sampler.run(None).latent)
    baselines = {}
    for name in BASELINES:
        _, result = match(sampler, methods[name], TARGET_NFC, 50, {})
        baselines[name] = (result.nfc, psnr(latent_to_pixels(result.latent), reference))
    budget = min(nfc for nfc, _ in baselines.values())
    _, rfc = match(sampler, methods[RFC], budget, 50, {})
    rfc_psnr = psnr(latent_to_pixels(rfc.latent), reference)

    assert rfc.nfc <= budget, f"RFC computed {rfc.nfc} evaluations, the baselines {budget}"
    assert rfc.block_calls < 50 * 6
    for name, (nfc, baseline_psnr) in baselines.items():
        assert rfc_psnr > baseline_psnr, f"RFC {rfc_psnr:.2f} dB at NFC {rfc.nfc} vs {name} {baseline_psnr:.2f} dB at NFC {nfc}"
