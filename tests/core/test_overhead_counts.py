"""The pack's own cost per block and per evaluation, counted (kernels and
host syncs do not depend on the machine or the model's width): these are
today's counts from `benchmarks.overhead`, held as ceilings so the hot path
can only get cheaper."""

import pytest

from benchmarks.overhead import FLUX_DEV, count_run, summarise

# FLUX.1-dev's layout at a width the CPU runs in a second.
NARROW_FLUX = {**FLUX_DEV, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "num_heads": 2,
               "axes_dim": [8, 12, 12]}

CEILINGS = {  # name: (kernels, host syncs), means over the evaluations after the warm-up
    "skipped block": (33, 1),
    "computed block (pack's share)": (32, 1),
    "evaluation (decision)": (7.34, 1),  # 10 where it forecasts and decides, 2 where max_skip forces a computation
}


@pytest.fixture(scope="module")
def counts():
    costs, computed, keys = count_run(16, 8, 8, (2, 2), NARROW_FLUX)
    assert computed == [True, True, False, False, True, False, False, True]
    return summarise(costs, computed, keys)


@pytest.mark.parametrize("name", sorted(CEILINGS))
def test_kernels_and_host_syncs_stay_within_todays_counts(counts, name):
    kernels, syncs = CEILINGS[name]
    assert counts[name].kernels <= kernels, f"{name}: {counts[name].kernels} kernels"
    assert counts[name].syncs <= syncs, f"{name}: {counts[name].syncs} host syncs"


def test_the_counter_sees_what_the_pack_does(counts):
    """A skipped block does real work (its prediction) and a computed block
    its block's: a counter that saw nothing would pass the ceilings."""
    assert counts["skipped block"].kernels > 0 and counts["skipped block"].bytes > 0
    assert counts["plain block (the block's own work)"].kernels > counts["skipped block"].kernels
