"""Sequence parallelism, simulated with torch.distributed (gloo, two CPU
processes) on the bundled model split by tokens (benchmarks.sequence_parallel):
with the ranks' sum given to the session, every rank takes the decisions the
unsplit run takes and ends within 1e-4 of its output."""

import pytest
import torch
import torch.distributed as dist

from benchmarks.sequence_parallel import split_run, unsplit_run

SAMPLES, STEPS, THRESHOLD = 2, 30, 0.3


@pytest.fixture(scope="module")
def runs():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    return unsplit_run(SAMPLES, STEPS, THRESHOLD), split_run(SAMPLES, STEPS, THRESHOLD)


def test_every_rank_takes_the_unsplit_runs_decisions(runs):
    whole, ranks = runs
    assert 0 < sum(whole.computed) < STEPS  # the threshold skips some and computes some
    for rank in ranks:
        assert tuple(rank["computed"]) == whole.computed
        assert rank["block_calls"] == whole.block_calls


def test_the_split_output_is_the_unsplit_one(runs):
    whole, ranks = runs
    for rank in ranks:
        assert (rank["latent"] - whole.latent).abs().max().item() < 1e-4
    assert torch.equal(ranks[0]["latent"], ranks[1]["latent"])
