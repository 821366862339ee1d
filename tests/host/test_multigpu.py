"""RFC under core's MultiGPU CFG Split (ComfyUI v0.29 and newer), on two
simulated devices: the model is deep-cloned for the second device and cond
and uncond run as separate chunks, one worker thread per device, on one
RFC session. Simulated on the CPU as COMFY_HOST.md describes: ComfyUI is
told there are two devices, cpu and cpu:1, and the tiny model's patcher can
be rebuilt by a factory, as a core loader's can.

Block executions are counted on each device's own model from outside the
pack: both devices must compute exactly the evaluations a one-device run
computes, and the output stays within floating-point noise of it.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from family_harness import FORCED, pack_module, rfc, sample_spec
from shared_specs import SPECS
from test_hard_samplers import counted_modules
from tiny_models import HookCounter, build

DEVICES = (torch.device("cpu"), torch.device("cpu", 1))
STEPS = 12
# Forced caching computes evaluations 0, 3, 6 and 9 of 12.
FORCED_COMPUTED = 4


@pytest.fixture(scope="module")
def two_devices(comfy):
    import comfy.model_management

    try:
        import comfy.multigpu
    except ImportError:
        pytest.skip("MultiGPU CFG Split: not in this ComfyUI (it came in v0.29)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.model_management, "get_all_torch_devices",
                      lambda exclude_current=False: list(DEVICES))
        yield comfy.multigpu


def built(spec):
    model = build(spec.config_class, spec.unet_config)
    if spec.prepare is not None:
        spec.prepare(model.model.diffusion_model)
    return model


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, two_devices, nodes):
    """(spec, one-device model, the same model split over two devices, its clone's patcher)."""
    spec = SPECS[request.param]
    single = built(spec)
    model = built(spec)
    # What a core loader gives a model so it can be deep-cloned per device.
    model.cached_patcher_init = (built, (spec,))
    split = two_devices.create_multigpu_deepclones(model, len(DEVICES))
    return spec, single, split


def clone_of(split):
    """The second device's patcher, as sampling matches it to the main one."""
    split.match_multigpu_clones()
    (clone,) = split.get_additional_models_with_key("multigpu")
    return clone


def run_counted(spec, patcher, counted_on: dict, nodes, cfg=3.0):
    """Sample and count block executions per model in `counted_on` (name: model patcher)."""
    counters = {name: HookCounter(counted_modules(spec, model, nodes)) for name, model in counted_on.items()}
    try:
        latent = sample_spec(spec, patcher, steps=STEPS, cfg=cfg)
    finally:
        for counter in counters.values():
            counter.close()
    return latent, {name: counter.calls for name, counter in counters.items()}


def split_run(spec, split, nodes, rfc_widgets=None, cfg=3.0):
    patcher = split if rfc_widgets is None else rfc(nodes, split, **rfc_widgets)
    clone = clone_of(patcher)
    return run_counted(spec, patcher, {"main": split, "clone": clone}, nodes, cfg=cfg)


def test_both_devices_run_and_split_the_work(family, nodes):
    """The simulation is real: without RFC each device runs every block of its chunk."""
    spec, single, split = family
    _, counts = split_run(spec, split, nodes)
    blocks = len(counted_modules(spec, single, nodes))
    assert counts == {"main": blocks * STEPS, "clone": blocks * STEPS}


def test_every_device_follows_one_decision_per_evaluation(family, nodes, caplog):
    """Both devices compute exactly the evaluations a one-device run computes,
    the output is the one-device run's within floating-point noise, and the
    summary counts whole evaluations, not one device's half."""
    spec, single, split = family
    blocks = len(counted_modules(spec, single, nodes))
    reference, reference_counts = run_counted(spec, rfc(nodes, single, **FORCED), {"single": single}, nodes)
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, counts = split_run(spec, split, nodes, FORCED)
    # One device runs cond and uncond batched: one block execution covers both.
    assert reference_counts == {"single": blocks * FORCED_COMPUTED}
    assert counts == {"main": blocks * FORCED_COMPUTED, "clone": blocks * FORCED_COMPUTED}
    # Each device's chunk measures its own trust (one per block over the
    # chunk's samples) where the one-device run measures one over cond and
    # uncond together: close, not equal.
    torch.testing.assert_close(latent, reference, rtol=1e-2, atol=5e-3)
    summary = re.search(r"computed (\d+) of (\d+) model evaluations", caplog.text)
    assert summary and (int(summary.group(1)), int(summary.group(2))) == (FORCED_COMPUTED, STEPS)
    assert not [r for r in caplog.records if r.name == "ComfyUI-RFC" and r.levelno >= logging.WARNING]


def test_threshold_zero_is_bit_identical_to_the_plain_split_run(family, nodes):
    spec, _, split = family
    plain, plain_counts = split_run(spec, split, nodes)
    latent, counts = split_run(spec, split, nodes, {**FORCED, "threshold": 0.0})
    assert torch.equal(latent, plain) and counts == plain_counts


def test_each_chunk_keeps_its_own_cache_and_none_outlives_the_run(family, nodes, monkeypatch):
    """cond and uncond ran on different devices: each keeps its own cached
    features (made where it ran: on real GPUs, that device), and the run's
    end drops them all."""
    spec, _, split = family
    runtime = pack_module(nodes, "nodes.runtime")
    finished = []
    finish = runtime.SamplingSession.finish

    def spy_finish(session):
        finished.append({key: [t for module in chunk.modules.values() for t in module.tensors()]
                         for key, chunk in session.run.chunks.items()})
        result = finish(session)
        finished.append(dict(session.run.chunks))
        return result

    monkeypatch.setattr(runtime.SamplingSession, "finish", spy_finish)
    split_run(spec, split, nodes, FORCED)
    held, after = finished
    # Chunk keys start with cond_or_uncond: one device ran cond, the other uncond.
    assert {key[0] for key in held} == {(0,), (1,)} and all(held.values())
    assert after == {}


def test_a_fault_on_one_device_loses_no_image(family, nodes, monkeypatch, caplog):
    """An exception inside the cache in one device's thread: one warning, the
    run goes on at whole-model granularity, and the image is finite."""
    spec, _, split = family
    estimators = pack_module(nodes, "rfc_core.estimators")
    calls = [0]
    original = estimators.RelationalEstimator.predict_onto

    def fails_once(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(estimators.RelationalEstimator, "predict_onto", fails_once)
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, _ = split_run(spec, split, nodes, FORCED)
    warnings = [r for r in caplog.records if r.name == "ComfyUI-RFC" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "injected fault" in warnings[0].getMessage()
    assert torch.isfinite(latent).all()
    summary = re.search(r"computed (\d+) of (\d+) model evaluations", caplog.text)
    assert summary and int(summary.group(2)) == STEPS
