"""The pack's own cost per block and per evaluation, counted by
`benchmarks.overhead` at FLUX.1-dev's and at Z-Image's size (kernels, bytes
and host syncs are deterministic, unlike timings): a skipped block of every
kind within a few residuals of traffic and a few kernels of the physical
limit, no host sync inside any block, at most two per evaluation."""

import pytest

from benchmarks.overhead import counts_at_flux_dev, counts_at_zimage

MODELS = {"FLUX.1-dev": counts_at_flux_dev, "Z-Image": counts_at_zimage}
# (kernels, traffic in R, host syncs), means after the warm-up. A skipped
# block: its module input, then one prediction matmul per stream (Flux's
# double blocks have two, image and text).
SKIPPED_BLOCK = (8, 6.0, 0)
COMPUTED_BLOCK = (None, 6.0, 0)
MOST_HOST_SYNCS_PER_EVALUATION = 2


@pytest.fixture(scope="module", params=sorted(MODELS))
def counts(request):
    return request.param, MODELS[request.param]()


def block_limits(counts):
    model, summary = counts
    limits = {name: SKIPPED_BLOCK for name in summary if name.startswith("skipped ")}
    limits["computed block (pack's share)"] = COMPUTED_BLOCK
    return model, summary, limits


def test_block_costs_stay_within_the_limits(counts):
    model, summary, limits = block_limits(counts)
    # Every kind of block is held: Flux's double and single blocks, NextDiT's noise refiners and layers.
    assert len(limits) >= 4, sorted(summary)
    for name, (kernels, traffic, syncs) in limits.items():
        cost = summary[name]
        if kernels is not None:
            assert cost.kernels <= kernels, f"{model}, {name}: {cost.kernels} kernels"
        assert cost.bytes <= traffic, f"{model}, {name}: {cost.bytes:.2f} R of traffic"
        assert cost.syncs <= syncs, f"{model}, {name}: {cost.syncs} host syncs"


def test_an_evaluation_syncs_with_the_host_at_most_twice(counts):
    """The decision (the forecast error and the sigma in one read) and, on a
    predicted evaluation, the check of its output."""
    _, summary = counts
    assert summary["evaluation, most host syncs"].syncs <= MOST_HOST_SYNCS_PER_EVALUATION


def test_the_counter_sees_what_the_pack_does(counts):
    """A skipped block does real work (its prediction reads the input and two
    cached residuals and writes the output) and a computed block its
    block's: a counter that saw nothing would pass the limits."""
    _, summary = counts
    assert summary["skipped block"].kernels > 0 and summary["skipped block"].bytes >= 3.9
    assert summary["evaluation (decision)"].syncs >= 1
    assert summary["plain block (the block's own work)"].kernels > summary["skipped block"].kernels
