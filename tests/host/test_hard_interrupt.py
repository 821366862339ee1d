"""A run stopped part-way: by a failing sampler callback, by ComfyUI's own
interrupt (the Cancel button), or by a block that raises mid-evaluation.

The exception must reach the caller unchanged and leave nothing behind: no
session in the guider's or the patched model's options, no active call, no
cached tensor still reachable (while the exception, and with it every frame
of the stopped run, is still held, as ComfyUI's executor holds it), and the
next run of the same patched model, or of the plain model, must be exactly
what a fresh one gives.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, pack_module, rfc
from test_hard_memory import CacheSpy
from test_hard_reuse import CFG, SPECS, STEPS, Family, computed_evaluations

STOP_AFTER_STEP = 3


class SamplingStopped(Exception):
    pass


def failing_callback(step, denoised, x, total_steps):
    if step == STOP_AFTER_STEP:
        raise SamplingStopped(f"callback failed after step {step}")


def interrupting_callback(step, denoised, x, total_steps):
    """What the Cancel button does: set the flag, which the next check raises on."""
    import comfy.model_management

    if step == STOP_AFTER_STEP:
        comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()


class FailingBlock:
    """Raises from inside the real computation of one block, part-way through
    an evaluation the cache computes after it has started predicting."""

    def __init__(self, module, fail_on_call: int):
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.handle = module.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise SamplingStopped(f"block failed on its call {self.calls}")

    def close(self):
        self.handle.remove()


def contains_session(options, session_type) -> bool:
    pending = [options]
    while pending:
        item = pending.pop()
        if isinstance(item, session_type):
            return True
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


def guided_sampling(family: Family, patcher, callback=None):
    """CFGGuider as comfy.sample drives it, but kept, to look at its options afterwards."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    positive, negative = family.prompts(1)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    latent = family.empty_latent()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", STEPS)

    def sample():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, callback=callback,
                             disable_pbar=True, seed=0)

    return guider, sample


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, comfy):
    return Family(SPECS[request.param])


@pytest.fixture(scope="module")
def uninterrupted(family, nodes):
    """The plain and the freshly cached run of the family, with block executions."""
    latent = family.empty_latent()
    return family.ksampler(family.model, latent), family.ksampler(rfc(nodes, family.model, **FORCED), latent)


@pytest.fixture
def model_management(comfy):
    """ComfyUI's model management, with the interrupt flag cleared afterwards
    whatever the test did."""
    from comfy import model_management

    yield model_management
    model_management.interrupt_current_processing(False)


@pytest.mark.parametrize("stop", ["callback", "interrupt", "block"])
def test_stopped_run_leaves_nothing_behind(family, nodes, uninterrupted, monkeypatch, model_management, stop):
    runtime = pack_module(nodes, "nodes.runtime")
    latent = family.empty_latent()
    (reference, reference_calls), (fresh, fresh_calls) = uninterrupted
    per_evaluation = reference_calls // STEPS

    spy = CacheSpy(nodes, monkeypatch)
    patched = rfc(nodes, family.model, **FORCED)
    options_before = repr(patched.model_options)
    callback = {"callback": failing_callback, "interrupt": interrupting_callback}.get(stop)
    guider, sample = guided_sampling(family, patched, callback)
    failing_block = None
    if stop == "block":
        # Evaluations 0 (warm-up), 3 and 6 are computed: fail in the second
        # counted module of evaluation 6, after the first has been recorded.
        failing_block = FailingBlock(family.blocks()[1], fail_on_call=2 * per_evaluation // len(family.blocks()) + 1)
    expected = model_management.InterruptProcessingException if stop == "interrupt" else SamplingStopped
    try:
        with pytest.raises(expected) as stopped:
            sample()
    finally:
        if failing_block is not None:
            failing_block.close()

    assert stopped.value.__traceback__ is not None
    assert len(spy.sessions) == 1
    stopped_run = spy.sessions[0].run
    # Stopped where intended: in evaluation 6, or after evaluation 3, with predictions made.
    assert len(stopped_run.evaluations) == (7 if stop == "block" else STOP_AFTER_STEP + 1)
    assert stopped_run.modules_predicted > 0
    assert len(spy.references) > 0
    assert spy.still_alive() == []
    assert stopped_run.cache_bytes() == 0
    assert not contains_session(guider.model_options, runtime.SamplingSession)
    assert repr(patched.model_options) == options_before
    assert runtime._ACTIVE_CALL.get() is None
    assert not model_management.processing_interrupted()

    after, after_calls = family.ksampler(patched, latent)
    assert torch.equal(after, fresh)
    assert after_calls == fresh_calls == per_evaluation * computed_evaluations(STEPS)
    plain, plain_calls = family.ksampler(family.model, latent)
    assert torch.equal(plain, reference)
    assert plain_calls == reference_calls


def test_cancel_checked_inside_a_block_is_raised_not_swallowed(family, nodes, uninterrupted, model_management):
    """The Cancel flag raised by a check inside a block (as ComfyUI's context
    windows and some custom blocks check it): the cache must not take the
    exception for a caching failure and compute on."""
    latent = family.empty_latent()
    patched = rfc(nodes, family.model, **FORCED)
    _, (fresh, fresh_calls) = uninterrupted

    def check(module, args):
        model_management.throw_exception_if_processing_interrupted()

    handle = family.blocks()[0].register_forward_pre_hook(check)
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            family.ksampler(patched, latent)
    finally:
        handle.remove()
    assert not model_management.processing_interrupted()
    after, calls = family.ksampler(patched, latent)
    assert torch.equal(after, fresh)
    assert calls == fresh_calls
