"""The pack's own cost per block and per evaluation, counted by
`benchmarks.overhead` at FLUX.1-dev's size (kernels, bytes and host syncs
are deterministic, unlike timings): a skipped block within a few residuals
of traffic and a few kernels of the physical limit, no host sync inside any
block, at most two per evaluation."""

import pytest

from benchmarks.overhead import counts_at_flux_dev

LIMITS = {  # name: (kernels, traffic in R, host syncs), means after the warm-up
    "skipped block": (8, 6.0, 0),
    "skipped single block": (8, 6.0, 0),
    # One prediction matmul per stream: image and text.
    "skipped double block": (8, 6.0, 0),
    "computed block (pack's share)": (None, 6.0, 0),
}
MOST_HOST_SYNCS_PER_EVALUATION = 2


@pytest.fixture(scope="module")
def counts():
    return counts_at_flux_dev()


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_block_costs_stay_within_the_limits(counts, name):
    kernels, traffic, syncs = LIMITS[name]
    cost = counts[name]
    if kernels is not None:
        assert cost.kernels <= kernels, f"{name}: {cost.kernels} kernels"
    assert cost.bytes <= traffic, f"{name}: {cost.bytes:.2f} R of traffic"
    assert cost.syncs <= syncs, f"{name}: {cost.syncs} host syncs"


def test_an_evaluation_syncs_with_the_host_at_most_twice(counts):
    """The decision (the forecast error and the sigma in one read) and, on a
    predicted evaluation, the check of its output."""
    assert counts["evaluation, most host syncs"].syncs <= MOST_HOST_SYNCS_PER_EVALUATION


def test_the_counter_sees_what_the_pack_does(counts):
    """A skipped block does real work (its prediction reads the input and two
    cached residuals and writes the output) and a computed block its
    block's: a counter that saw nothing would pass the limits."""
    assert counts["skipped block"].kernels > 0 and counts["skipped block"].bytes >= 3.9
    assert counts["evaluation (decision)"].syncs >= 1
    assert counts["plain block (the block's own work)"].kernels > counts["skipped block"].kernels
