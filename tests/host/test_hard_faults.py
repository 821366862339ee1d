"""Bad input and faults: widgets out of range, inf or NaN in cached features,
exceptions inside the cache logic, and models the pack has never heard of.

Real block executions are counted with torch hooks from outside the pack;
with FORCED on a run of STEPS evaluations at cfg 1, evaluation 0 is
computed (warm-up), then two are predicted and one computed, so evaluation 3
is the first computed one after the first predicted ones (1 and 2).
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch

from family_harness import FORCED, FamilySpec, pack_module, rfc, sample_spec
from shared_specs import FLUX_SPEC, SPECS
from tiny_models import FLUX_CONFIG, build, counted

STEPS = 12
# FORCED at STEPS: evaluations 0, 3, 6, 9 computed.
FORCED_COMPUTED = 4


class Family:
    """A tiny model of one spec, its cached blocks, and what counts them."""

    def __init__(self, spec: FamilySpec, nodes):
        self.spec = spec
        self.nodes = nodes
        self.model = build(spec.config_class, spec.unet_config)
        if spec.prepare is not None:
            spec.prepare(self.model.model.diffusion_model)
        self.diffusion_model = self.model.model.diffusion_model
        self.adapter = pack_module(nodes, "nodes.adapters").detect_adapter(self.diffusion_model)
        self.block_keys = self.adapter.block_keys(self.diffusion_model)

    def block(self, index: int) -> torch.nn.Module:
        return self.adapter.block(self.diffusion_model, *self.block_keys[index])

    def counted_modules(self) -> list[torch.nn.Module]:
        if self.spec.counted_modules is not None:
            return list(self.spec.counted_modules(self.diffusion_model))
        return [self.block(i) for i in range(len(self.block_keys))]

    def run(self, patcher, steps=STEPS, **kwargs):
        """Sample through comfy.sample; the latent and the block executions."""
        return counted(self.counted_modules(), lambda: sample_spec(self.spec, patcher, steps=steps, **kwargs))


_FAMILIES: dict[str, Family] = {}


def family_of(name: str) -> Family:
    """One tiny model per spec, shared by every test that needs it."""
    import nodes

    if name not in _FAMILIES:
        _FAMILIES[name] = Family(SPECS[name], nodes)
    return _FAMILIES[name]


@pytest.fixture(params=sorted(SPECS))
def family(request, comfy):
    return family_of(request.param)


def records(caplog, level: int, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ComfyUI-RFC" and r.levelno == level and text in r.getMessage()]


def nth_call_raises(function, n: int, calls=None):
    """`function` that raises on its n-th call (1-based) and is itself
    otherwise; functions given one `calls` list count their calls together."""
    calls = [0] if calls is None else calls

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError(f"injected fault on call {n}")
        return function(*args, **kwargs)

    return wrapped


# ---------------------------------------------------------------- widgets

def node_apply(nodes, model, widgets: dict, advanced: bool):
    node = nodes.NODE_CLASS_MAPPINGS["RFCCacheAdvanced" if advanced else "RFCCache"]()
    return node.apply(model, unique_id="7", **widgets)[0]


def valid_widgets(advanced: bool) -> dict:
    widgets = dict(threshold=0.1, max_skip=3, order=1, start_percent=0.0, end_percent=1.0)
    if advanced:
        widgets.update(estimator="rfe", scheduler="rcs", interval=3, granularity="auto")
    return widgets


def out_of_range_cases():
    from rfc_core.config import RANGES

    for widget, (low, high) in RANGES.items():
        step = 1 if isinstance(low, int) else 0.001
        for bound, value in (("below", low - step), ("above", high + step)):
            yield pytest.param(widget, value, low, high, id=f"{widget}-{bound}")
        if isinstance(low, float):
            for value in (float("nan"), float("inf")):
                yield pytest.param(widget, value, low, high, id=f"{widget}-{value}")


@pytest.fixture(scope="module")
def flux_model(comfy):
    return build("Flux", FLUX_CONFIG)


@pytest.mark.parametrize("widget,value,low,high", list(out_of_range_cases()))
def test_every_widget_out_of_range_is_refused_naming_it_and_its_range(comfy, flux_model, widget, value, low, high):
    import nodes

    advanced_only = widget == "interval"
    for advanced in (False, True) if not advanced_only else (True,):
        widgets = {**valid_widgets(advanced), widget: value}
        if widget == "start_percent" and value > high:
            widgets["end_percent"] = 1.0
        with pytest.raises(ValueError) as error:
            node_apply(nodes, flux_model, widgets, advanced)
        assert f"'{widget}' must be between {low} and {high}" in str(error.value), str(error.value)
        # Both bounds themselves are accepted (start_percent must stay below end_percent).
        for bound in (low, high):
            accepted = {**valid_widgets(advanced), widget: bound}
            if widget == "start_percent" and bound == high:
                continue
            if widget == "end_percent" and bound == low:
                continue
            if widget == "target_speedup":
                accepted["max_skip"] = 50  # a target of S needs max_skip of at least S - 1
            node_apply(nodes, flux_model, accepted, advanced)


@pytest.mark.parametrize("widget,value,named", [
    ("estimator", "teacache", "'estimator' must be one of"),
    ("scheduler", "sometimes", "'scheduler' must be one of"),
    ("granularity", "layers", "'granularity' must be one of"),
    ("start_percent", 0.6, "'start_percent' (0.6) must be below 'end_percent' (0.5)"),
])
def test_invalid_choices_are_refused_naming_the_widget(comfy, flux_model, widget, value, named):
    import nodes

    widgets = {**valid_widgets(True), widget: value}
    if widget == "start_percent":
        widgets["end_percent"] = 0.5
    with pytest.raises(ValueError) as error:
        node_apply(nodes, flux_model, widgets, advanced=True)
    assert named in str(error.value)


# ---------------------------------------------------------- inf and NaN

def test_non_finite_prediction_computes_that_evaluation_again(family, monkeypatch, caplog):
    """A prediction with inf in it (as fp16 extrapolation over close sigmas
    can give) never reaches the sampler: the evaluation's output is checked
    once, and the evaluation is computed again in full, bit for bit as if
    the run had decided to compute it. Said once; the summary counts it as
    computed."""
    estimators = pack_module(family.nodes, "rfc_core.estimators")
    run_module = pack_module(family.nodes, "rfc_core.run")
    blocks = len(family.block_keys)
    faulty_call = blocks + 2  # evaluation 2, second block
    faulty_evaluation = 2

    forced, forced_calls = family.run(rfc(family.nodes, family.model, **FORCED))

    original_predict = estimators.RelationalEstimator.predict_onto
    predictions = [0]

    def overflowing_predict(self, sigma, module_input, bases):
        predictions[0] += 1
        predicted = original_predict(self, sigma, module_input, bases)
        if predictions[0] == faulty_call:
            predicted = [torch.full_like(value, float("inf")) for value in predicted]
        return predicted

    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    monkeypatch.setattr(estimators.RelationalEstimator, "predict_onto", overflowing_predict)
    latent, calls = family.run(rfc(family.nodes, family.model, **FORCED))
    monkeypatch.undo()
    computed, total = summary_counts(caplog)

    original_decide = run_module.RFCRun._decide_skip

    def computes_that_evaluation(self, chunk, module_input):
        skip = original_decide(self, chunk, module_input)
        return skip and len(self.evaluations) != faulty_evaluation + 1

    monkeypatch.setattr(run_module.RFCRun, "_decide_skip", computes_that_evaluation)
    reference, reference_calls = family.run(rfc(family.nodes, family.model, **FORCED))

    assert predictions[0] >= faulty_call
    assert torch.isfinite(latent).all()
    # Evaluation 2 computed, then one in three again from there: 0, 2, 5, 8
    # and 11, one more than FORCED's 0, 3, 6 and 9.
    assert calls == reference_calls == forced_calls // FORCED_COMPUTED * (FORCED_COMPUTED + 1)
    assert torch.equal(latent, reference)
    assert not torch.equal(latent, forced)
    assert len(records(caplog, logging.WARNING, "inf or NaN")) == 1
    assert "computed again in full" in caplog.text
    assert (computed, total) == (FORCED_COMPUTED + 1, STEPS)


def corrupt_once(module: torch.nn.Module, at_call: int, tokens: slice):
    """A forward hook that writes NaN into `tokens` (dim 1) of the module's
    output on its `at_call`-th execution (1-based); returns the handle."""
    calls = [0]

    def hook(module_, inputs, output):
        calls[0] += 1
        if calls[0] != at_call:
            return output
        first = output[0] if isinstance(output, tuple) else output
        first = first.clone()
        first[:, tokens] = float("nan")
        return (first, *output[1:]) if isinstance(output, tuple) else first

    return module.register_forward_hook(hook)


# Where a family computes features its output then drops: the text tokens
# Flux's last single block still carries, the caption tokens in front of
# Lumina 2's joint sequence. Every token a Wan block returns reaches its head.
DISCARDED = {
    "flux": lambda dm: dm.single_blocks[-1],
    "lumina2": lambda dm: dm.layers[-1].feed_forward,
}


def test_non_finite_values_the_model_drops_never_reach_the_image(family, caplog):
    """NaN in tokens the model drops leaves the uncached run untouched, and
    the cached one too: it may sit in that block's cache, but a prediction
    is elementwise in the cached values and its size comes from the module
    input, so nothing has to be computed again. Only the block's trust is
    measured over a sample that takes in those tokens (NaN left out of its
    sums), so the image is close to the clean cached run, not bit-identical."""
    if family.spec.name not in DISCARDED:
        pytest.skip(f"{family.spec.name}: every token a block returns reaches the model output")
    corrupted = DISCARDED[family.spec.name](family.diffusion_model)
    first_token = slice(0, 1)

    clean, clean_calls = family.run(family.model)
    handle = corrupt_once(corrupted, at_call=5, tokens=first_token)  # evaluation 4
    try:
        uncached, _ = family.run(family.model)
    finally:
        handle.remove()
    assert torch.equal(uncached, clean), "the model itself must drop the corrupted tokens"

    forced, forced_calls = family.run(rfc(family.nodes, family.model, **FORCED))
    caplog.set_level(logging.WARNING, logger="ComfyUI-RFC")
    handle = corrupt_once(corrupted, at_call=3, tokens=first_token)  # computed evaluations 0, 3, 6
    try:
        latent, calls = family.run(rfc(family.nodes, family.model, **FORCED))
    finally:
        handle.remove()

    assert forced_calls == clean_calls // STEPS * FORCED_COMPUTED
    assert torch.isfinite(latent).all()
    assert ((latent - forced).norm() / forced.norm()).item() < 1e-2
    assert calls == forced_calls
    assert not records(caplog, logging.WARNING, "inf or NaN")


def test_non_finite_block_output_the_model_keeps_gives_what_the_uncached_run_gives(family, caplog):
    """NaN in every token of the first block once: the uncached run is lost
    from that evaluation on, and so is the cached one, in the same places.
    The first block's input is NaN from then on, its forecast error cannot
    be judged, and every later evaluation is computed."""
    first_block = family.counted_modules()[0]
    everything = slice(None)
    handle = corrupt_once(first_block, at_call=5, tokens=everything)
    try:
        uncached, uncached_calls = family.run(family.model)
    finally:
        handle.remove()
    caplog.set_level(logging.WARNING, logger="ComfyUI-RFC")
    handle = corrupt_once(first_block, at_call=3, tokens=everything)
    try:
        latent, calls = family.run(rfc(family.nodes, family.model, **FORCED))
    finally:
        handle.remove()
    blocks = uncached_calls // STEPS
    assert torch.isnan(uncached).all()
    assert torch.equal(torch.isnan(latent), torch.isnan(uncached))
    # Evaluations 1, 2, 4 and 5 were predicted; from 7 on every one is computed.
    assert calls == uncached_calls - 4 * blocks
    assert not [r for r in caplog.records if r.name == "ComfyUI-RFC" and r.levelno >= logging.ERROR]


# ------------------------------------------------- exceptions in the cache

FAULTS = {
    # (what raises, on which call): the adapter's module input is built for
    # every block of every evaluation, the estimator predicts only on
    # predicted evaluations.
    "module_input-evaluation3": ("module_input", lambda blocks: 3 * blocks + 2),
    "predict-evaluation3": ("predict", lambda blocks: blocks + 2),
    "module_input-first": ("module_input", lambda blocks: 1),
}


def summary_counts(caplog) -> tuple[int, int]:
    """(computed, total) model evaluations from the run's summary line."""
    found = re.search(r"computed (\d+) of (\d+) model evaluations", caplog.text)
    assert found, "no summary line"
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_block_fault_caches_the_whole_model_for_the_rest_of_the_run(family, fault, monkeypatch, caplog):
    """An exception in a block adapter or block estimator (what a ComfyUI
    update changing a block looks like) is one warning naming the family and
    the ComfyUI version; the block that raised is computed, and the rest of
    the run caches the whole model call, warming up again. The summary
    counts every evaluation of the run. A fault on the very first call
    computes that whole evaluation, so only whole-model skips change it."""
    what, call = FAULTS[fault]
    blocks = len(family.block_keys)
    steps = 12
    _, reference_calls = family.run(family.model)
    if what == "module_input":
        # The first block's full module input and every other block's sampled one.
        adapter_class, calls_so_far = type(family.adapter), [0]
        for method in ("module_input", "sampled_module_input"):
            monkeypatch.setattr(adapter_class, method,
                                nth_call_raises(getattr(adapter_class, method), call(blocks), calls_so_far))
    else:
        estimators = pack_module(family.nodes, "rfc_core.estimators")
        monkeypatch.setattr(estimators.RelationalEstimator, "predict_onto",
                            nth_call_raises(estimators.RelationalEstimator.predict_onto, call(blocks)))
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, calls = family.run(rfc(family.nodes, family.model, **FORCED))

    warnings = records(caplog, logging.WARNING, "caching failed on")
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert family.adapter.family in message and "ComfyUI 0." in message and "injected fault" in message
    assert "caching the whole model call for the rest of this run" in message
    assert not [r for r in caplog.records if r.name == "ComfyUI-RFC" and r.levelno >= logging.ERROR]
    assert "the whole model call was cached from there" in caplog.text
    computed, total = summary_counts(caplog)
    assert total == steps
    assert torch.isfinite(latent).all()
    # Whole-model caching skips evaluations after the fault: blocks run on
    # the computed ones, and on the part of the evaluation that raised.
    assert computed < steps
    assert computed * blocks <= calls <= (computed + 1) * blocks < reference_calls
    if fault.endswith("first"):
        assert calls == computed * blocks


def test_whole_model_fault_computes_the_rest_in_full(family, monkeypatch, caplog):
    """A fault at whole-model granularity: the run is computed in full from
    there, one warning, and the summary still counts every evaluation."""
    steps = 12
    reference, reference_calls = family.run(family.model)
    runtime = pack_module(family.nodes, "nodes.runtime.session")
    monkeypatch.setattr(runtime, "pack", nth_call_raises(runtime.pack, 1))
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, calls = family.run(rfc(family.nodes, family.model, granularity="model", **FORCED))
    warnings = records(caplog, logging.WARNING, "caching failed on")
    assert len(warnings) == 1 and "computing every evaluation in full" in warnings[0].getMessage()
    assert "the rest was computed in full" in caplog.text
    assert summary_counts(caplog) == (steps, steps)
    assert calls == reference_calls
    assert torch.equal(latent, reference)


def test_fault_when_the_run_starts_computes_it_in_full(family, monkeypatch, caplog):
    """A model sampling object from another pack that cannot map a percent
    to a sigma: the cache cannot place its skip window, so the run is
    computed in full, with one error in the log."""
    patched = rfc(family.nodes, family.model, **FORCED)
    model_sampling = copy.copy(patched.get_model_object("model_sampling"))

    def no_percent_to_sigma(percent):
        raise NotImplementedError("this model sampling has no percent_to_sigma")

    model_sampling.percent_to_sigma = no_percent_to_sigma
    patched.add_object_patch("model_sampling", model_sampling)
    reference, reference_calls = family.run(family.model)
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, calls = family.run(patched)
    errors = [r for r in caplog.records if r.name == "ComfyUI-RFC" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "could not start caching" in errors[0].getMessage()
    assert calls == reference_calls
    assert torch.equal(latent, reference)


# ------------------------------------------------------ unknown models

def made_up_class(base: type, name: str, module: str) -> type:
    """A class with `base`'s methods that is not a subclass of it, from a
    module the pack has never heard of: what a new ComfyUI model family or a
    custom node's own model looks like to the pack."""
    namespace = {key: value for key, value in vars(base).items() if key not in ("__dict__", "__weakref__")}
    namespace.update(__module__=module, __qualname__=name)
    return type(name, (torch.nn.Module,), namespace)


def test_made_up_diffusion_model_falls_back_to_whole_model_caching(comfy, caplog):
    import comfy.ldm.flux.model
    import nodes

    model = build("Flux", FLUX_CONFIG)
    diffusion_model = model.model.diffusion_model
    reference, reference_calls = counted([diffusion_model], lambda: sample_spec(FLUX_SPEC, model, steps=30))
    diffusion_model.__class__ = made_up_class(comfy.ldm.flux.model.Flux, "ThirdPartyDiT", "third_party.models")
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    patched = rfc(nodes, model, **FORCED)
    settings = patched.model_options["transformer_options"][pack_module(nodes, "nodes.runtime").SETTINGS_KEY]
    assert (settings.granularity, settings.family) == ("model", "ThirdPartyDiT")
    assert "ThirdPartyDiT, granularity model: the whole model call is cached, no block adapter" in caplog.text

    same, same_calls = counted([diffusion_model], lambda: sample_spec(FLUX_SPEC, model, steps=30))
    unchanged, _ = counted([diffusion_model], lambda: sample_spec(
        FLUX_SPEC, rfc(nodes, model, **{**FORCED, "threshold": 0.0}), steps=30))
    latent, calls = counted([diffusion_model], lambda: sample_spec(FLUX_SPEC, patched, steps=30))
    assert torch.equal(same, reference) and same_calls == reference_calls
    assert torch.equal(unchanged, reference)
    assert calls == reference_calls // 30 * 10
    assert torch.isfinite(latent).all()
    assert ((latent - reference).norm() / reference.norm()).item() < 1.0
