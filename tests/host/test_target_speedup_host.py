"""target_speedup, cache_dtype and the run report inside ComfyUI, on tiny
models of three families sampled by ComfyUI's KSampler: the count of full
computations is read from outside the pack (first-block executions)."""

from __future__ import annotations

import logging

import pytest

from family_harness import pack_module, rfc
from test_hard_reuse import SPECS, Family
from tiny_models import counted

TARGETS = (2.0, 2.5, 3.0)


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, comfy):
    return Family(SPECS[request.param])


def first_block_runs(family, patched, steps: int) -> int:
    """Model evaluations whose first block really ran (cfg 1: one per step)."""
    import nodes

    positive, negative = family.prompts(1)
    _, calls = counted(family.blocks()[:1], lambda: nodes.KSampler().sample(
        patched, 0, steps, 1.0, "euler", "simple", positive, negative, {"samples": family.empty_latent()})[0])
    return calls


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_the_achieved_speedup_is_within_ten_percent_of_the_target(family, nodes, steps):
    for target in TARGETS:
        patched = rfc(nodes, family.model, target_speedup=target, max_skip=3)
        computed = first_block_runs(family, patched, steps)
        assert abs((steps / computed) / target - 1) <= 0.10, (family.spec.name, steps, target, computed)


def test_the_threshold_is_ignored_under_a_target(family, nodes):
    counts = {first_block_runs(family, rfc(nodes, family.model, target_speedup=2.5, threshold=threshold), 20)
              for threshold in (0.01, 1.0, 10.0)}
    assert counts == {8}


def test_a_half_precision_cache_halves_the_reported_peak(family, nodes, caplog):
    peaks = {}
    for dtype in ("auto", "float16"):
        patched = rfc(nodes, family.model, threshold=10.0, max_skip=2, cache_dtype=dtype, granularity="auto")
        with caplog.at_level(logging.INFO, logger="ComfyUI-RFC"):
            caplog.clear()
            first_block_runs(family, patched, 8)
        summaries = [r.getMessage() for r in caplog.records if "cache peak" in r.getMessage()]
        assert len(summaries) == 1, summaries
        peaks[dtype] = summaries[0]
    auto_mib = float(peaks["auto"].split("cache peak ")[1].split(" MiB")[0])
    half_mib = float(peaks["float16"].split("cache peak ")[1].split(" MiB")[0])
    assert auto_mib > 0 and half_mib == pytest.approx(auto_mib / 2, abs=0.11)


def test_the_debug_log_has_a_line_per_evaluation(family, nodes, caplog):
    patched = rfc(nodes, family.model, target_speedup=2.5, max_skip=3)
    with caplog.at_level(logging.DEBUG, logger="ComfyUI-RFC"):
        first_block_runs(family, patched, 10)
    tables = [r.getMessage() for r in caplog.records if "each model evaluation" in r.getMessage()]
    assert len(tables) == 1
    rows = tables[0].splitlines()[2:]
    assert len(rows) == 10
    assert sum(row.split()[2] == "yes" for row in rows) == 4


def test_the_front_end_message_describes_every_evaluation(family, nodes, monkeypatch):
    runtime = pack_module(nodes, "nodes.runtime")
    sent = []

    class Server:
        def send_sync(self, event, data, sid=None):
            sent.append((event, data))

    import server

    monkeypatch.setattr(server.PromptServer, "instance", Server(), raising=False)
    patched = rfc(nodes, family.model, target_speedup=2.5, max_skip=3)
    computed = first_block_runs(family, patched, 10)
    assert len(sent) == 1
    event, data = sent[0]
    assert event == runtime.SUMMARY_EVENT and data["node"] == "7"
    assert data["total"] == len(data["evaluations"]) == 10
    assert data["computed"] == computed == sum(e["computed"] for e in data["evaluations"])
    assert data["peak_bytes"] > 0 and data["target_speedup"] == 2.5
