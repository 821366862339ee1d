"""The memory plan (issue 30) inside a real ComfyUI: the cache's layout is
chosen at the first block from ComfyUI's own memory queries and the
memory_budget widget, and what the run then holds stays within it.

Every run samples a tiny random-weight Flux and Wan through
`comfy.sample.sample` with cfg 3 and a batch of 2 (cond and uncond batched:
four samples per evaluation). Their block groups are three deep, so a span
of 2 leaves one block of each group per block: full spans, and blocks
outside any span, in one run. Block executions are counted with torch hooks
on the blocks, and the bytes a run holds are read from outside the pack:
every distinct tensor storage reachable from its session (as
test_hard_memory's `tensors_held_by` finds them) or kept by the adapter for
the run, measured before and after
each block the pack hands to the model, after each block the pack returns,
and when the session finishes.

On a CPU host the model's device is system memory: the budget is the least
of ComfyUI's free memory less its step estimate and reserve, and the
available RAM less a margin, and the pack reads both only while it plans.
A small machine is simulated by patching `comfy.model_management
.get_free_memory` or `psutil.virtual_memory` for that call alone: ComfyUI's
own loader reads them too, and would load the weights otherwise than in the
uncached run the outputs are compared with.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch

from family_harness import (FORCED, caching_never_fails, forced_full_evaluations, pack_module,  # noqa: F401
                            rfc, sample_spec)
from shared_specs import FLUX_SPEC
from test_family_wan import wan_spec
from test_hard_memory import tensors_held_by, tensors_under
from tiny_models import FLUX_CONFIG, build, counted

pytestmark = pytest.mark.usefixtures("caching_never_fails")

GIB = 2 ** 30
STEPS = 6
FORCED_STEPS = 12  # longer than a short run: FORCED's plan is one computed evaluation in three
SAMPLING = dict(cfg=3.0, batch=2)
# Threshold 0 itself switches the cache off (the node samples without a
# session); the least positive threshold keeps the cache recording every
# block under the planned layout while RCS's forecast error, never that
# small, predicts nothing: threshold 0 with the cache in the loop.
ZERO = {**FORCED, "threshold": 1e-9}

SPECS = {
    # Three double and three single blocks (two groups of three).
    "flux": dataclasses.replace(FLUX_SPEC, unet_config={**FLUX_CONFIG, "depth": 3, "depth_single_blocks": 3}),
    "wan": wan_spec("WAN21_T2V", num_layers=3),
}


class Tiny:
    """A tiny model of one spec, sampled with its blocks counted."""

    def __init__(self, spec):
        self.spec = spec
        self.model = build(spec.config_class, spec.unet_config)
        self._plain = {}

    def blocks(self):
        import nodes

        diffusion_model = self.model.model.diffusion_model
        adapter = pack_module(nodes, "nodes.adapters").detect_adapter(diffusion_model)
        return [adapter.block(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)]

    def sample(self, patcher, steps=STEPS):
        return counted(self.blocks(), lambda: sample_spec(self.spec, patcher, steps=steps, **SAMPLING))

    def plain(self, steps=STEPS):
        """The uncached run (latent, block executions), sampled once."""
        if steps not in self._plain:
            self._plain[steps] = self.sample(self.model, steps)
        return self._plain[steps]


@pytest.fixture(scope="module", params=sorted(SPECS))
def tiny(request, comfy):
    return Tiny(SPECS[request.param])


def storage_bytes(tensors) -> int:
    """The bytes of the distinct storages behind `tensors` (a view counts
    once, with all of the memory it keeps alive)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class PlanSpy:
    """Every session's plan, the budget the pack read, and the most bytes
    reachable from the session at any point measured.

    free: bytes the model's device has beside the step (what
        get_free_memory reports, less ComfyUI's step estimate and reserve);
    ram: bytes of RAM available beyond the pack's margin (what
        psutil.virtual_memory reports, less that margin);
    system_apart: system memory is a place of its own, as on a GPU host
        (the offload path), with room for any cache.
    Each is read by the pack only while it plans; None leaves it as it is."""

    def __init__(self, nodes, monkeypatch, free: int | None = None, ram: int | None = None,
                 system_apart: bool = False):
        runtime = pack_module(nodes, "nodes.runtime")
        session_module = pack_module(nodes, "nodes.runtime.session")
        self.margin = pack_module(nodes, "nodes.runtime.memory")
        self.sessions = []
        self.budgets = []
        self.held: dict[int, int] = {}
        self.finished = []
        # Per finished session: the int8 features it held as it finished.
        self.int8_features: dict[int, int] = {}
        # ... and the dtypes RCS's first-block input was kept in.
        self.first_input_dtypes: dict[int, set] = {}
        plan_cache, run_block = runtime.SamplingSession.plan_cache, runtime.SamplingSession.run_block
        finish = runtime.SamplingSession.finish
        budget_for = session_module.budget_for
        budget_type = pack_module(nodes, "rfc_core.memory").Budget

        def spy_budget_for(device, step_bytes, cap_gb):
            budget, separate = budget_for(device, step_bytes, cap_gb)
            if system_apart:
                budget, separate = budget_type(device=budget.device, system=64 * GIB, cap=budget.cap), True
            self.budgets.append(budget)
            return budget, separate

        def spy_plan_cache(session, *args, **kwargs):
            self.sessions.append(session)
            with monkeypatch.context() as patch:
                if free is not None:
                    import comfy.model_management as model_management

                    reserve = model_management.extra_reserved_memory()
                    patch.setattr(model_management, "get_free_memory",
                                  lambda dev=None, torch_free_too=False: (
                                      (free + session.step_bytes + reserve,) * 2 if torch_free_too
                                      else free + session.step_bytes + reserve))
                if ram is not None:
                    import psutil

                    total = 10 * GIB
                    margin = max(self.margin.SYSTEM_MARGIN_MIN, int(self.margin.SYSTEM_MARGIN_SHARE * total))
                    memory = namedtuple("svmem", "total available")(total, ram + margin)
                    patch.setattr(psutil, "virtual_memory", lambda: memory)
                return plan_cache(session, *args, **kwargs)

        def spy_run_block(session, kind, index, args, compute, transformer_options):
            def measured(block_args):
                self.measure(session)
                try:
                    return compute(block_args)
                finally:
                    self.measure(session)

            try:
                return run_block(session, kind, index, args, measured, transformer_options)
            finally:
                self.measure(session)

        def spy_finish(session):
            self.measure(session)
            self.finished.append(session)
            held = {(t.untyped_storage().data_ptr(), t.numel()) for t in tensors_held_by(session)
                    if t.dtype == torch.int8}
            self.int8_features[id(session)] = sum(numel for _, numel in held)
            self.first_input_dtypes[id(session)] = {
                t.dtype for chunk in session.run.chunks.values() if chunk.first_input is not None
                for t in tensors_under(chunk.first_input.values)}
            return finish(session)

        monkeypatch.setattr(session_module, "budget_for", spy_budget_for)
        monkeypatch.setattr(runtime.SamplingSession, "plan_cache", spy_plan_cache)
        monkeypatch.setattr(runtime.SamplingSession, "run_block", spy_run_block)
        monkeypatch.setattr(runtime.SamplingSession, "finish", spy_finish)

    def measure(self, session) -> None:
        # What the adapter keeps for the run beside the session (the stacked
        # modulation rows sampled module inputs read; none on models this
        # narrow, where every channel is sampled) counts too.
        rows = session.adapter.__dict__.get("_sampled_rows", {}).get(session.diffusion_model)
        held = storage_bytes(tensors_held_by(session) + tensors_under(rows))
        self.held[id(session)] = max(self.held.get(id(session), 0), held)

    @property
    def session(self):
        assert len(self.finished) == 1, "one sampling run per spy"
        return self.finished[0]

    @property
    def peak(self) -> int:
        """The most bytes the run's session held at any point measured."""
        return self.held[id(self.session)]


def layout_type(nodes):
    return pack_module(nodes, "rfc_core.memory").Layout


@pytest.fixture(scope="module")
def unconstrained(tiny, nodes):
    """The plan of a FORCED run with nothing limiting it (this machine's
    real memory): its footprint, and the most its session held."""
    patch = pytest.MonkeyPatch()
    try:
        spy = PlanSpy(nodes, patch)
        tiny.sample(rfc(nodes, tiny.model, **FORCED), steps=FORCED_STEPS)
        session = spy.session
        assert session.layout == layout_type(nodes)(), "a tiny model's cache fits per block"
        return session.footprint, spy.peak
    finally:
        patch.undo()


# --- 1. Threshold 0 is bit-identical under every storage format and span ---

STORAGES = {
    "int8": dict(cache_dtype="int8"),
    "bfloat16": dict(cache_dtype="bfloat16"),
    "float16": dict(cache_dtype="float16"),
    "span 2": dict(cache_span=2),
    "span 2, int8": dict(cache_span=2, cache_dtype="int8"),
    "span 3, int8": dict(cache_span=3, cache_dtype="int8"),
    "cpu": dict(cache_device="cpu"),
}


def expected_layout(nodes, widgets: dict, system: bool = False):
    return layout_type(nodes)(span=widgets.get("cache_span") or 1, int8=widgets.get("cache_dtype") == "int8",
                              system=system)


@pytest.mark.parametrize("storage", list(STORAGES))
def test_threshold_zero_is_bit_identical_under_every_layout(tiny, nodes, monkeypatch, storage):
    widgets = STORAGES[storage]
    reference, reference_calls = tiny.plain()
    spy = PlanSpy(nodes, monkeypatch)
    latent, calls = tiny.sample(rfc(nodes, tiny.model, **ZERO, **widgets))
    session = spy.session
    # The widgets reached the plan: the layout is the one they name (on a
    # CPU host system memory is the model's device, not a place apart).
    assert session.layout == expected_layout(nodes, widgets)
    assert session.granularity == "blocks"
    assert spy.peak > 0, "nothing was cached"
    assert session.run.modules_predicted == 0
    assert calls == reference_calls
    assert torch.equal(latent, reference)


@pytest.mark.parametrize("storage", ["cpu", "cpu, span 2, int8"])
def test_offload_path_is_exact(tiny, nodes, monkeypatch, storage):
    """cache_device cpu where system memory is a place of its own (as beside
    a GPU): slots kept apart from the model's device, read back to predict."""
    widgets = {"cpu": dict(cache_device="cpu"),
               "cpu, span 2, int8": dict(cache_device="cpu", cache_span=2, cache_dtype="int8")}[storage]
    reference, reference_calls = tiny.plain()
    spy = PlanSpy(nodes, monkeypatch, system_apart=True)
    latent, calls = tiny.sample(rfc(nodes, tiny.model, **ZERO, **widgets))
    session = spy.session
    assert session.layout == expected_layout(nodes, widgets, system=True)
    assert session.run.storage.device == torch.device("cpu")
    assert calls == reference_calls
    assert torch.equal(latent, reference)


# --- 2. Forced caching with spans and int8 ---

FORCED_STORAGES = {
    "span 2": dict(cache_span=2),
    "int8": dict(cache_dtype="int8"),
    "span 2, int8": dict(cache_span=2, cache_dtype="int8"),
    "cpu apart, span 2": dict(cache_device="cpu", cache_span=2),
}


@pytest.fixture(scope="module")
def forced_reference(tiny, nodes):
    """The uncached run, and the per-block FORCED run, at FORCED_STEPS."""
    reference, reference_calls = tiny.plain(FORCED_STEPS)
    per_block, per_block_calls = tiny.sample(rfc(nodes, tiny.model, **FORCED), steps=FORCED_STEPS)
    return reference, reference_calls, per_block, per_block_calls


def relative(latent, reference) -> float:
    return ((latent - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("storage", list(FORCED_STORAGES))
def test_forced_caching_cuts_block_executions_under_every_layout(tiny, nodes, monkeypatch, forced_reference,
                                                                 storage):
    widgets = FORCED_STORAGES[storage]
    apart = widgets.get("cache_device") == "cpu"
    reference, reference_calls, per_block, per_block_calls = forced_reference
    spy = PlanSpy(nodes, monkeypatch, system_apart=apart)
    latent, calls = tiny.sample(rfc(nodes, tiny.model, **FORCED, **widgets), steps=FORCED_STEPS)
    session = spy.session
    assert session.layout == expected_layout(nodes, widgets, system=apart)
    assert session.granularity == "blocks"

    assert reference_calls % FORCED_STEPS == 0
    full_evaluations = forced_full_evaluations(FORCED_STEPS)
    assert full_evaluations < FORCED_STEPS
    assert calls == per_block_calls == reference_calls // FORCED_STEPS * full_evaluations
    assert torch.isfinite(latent).all()
    error, per_block_error = relative(latent, reference), relative(per_block, reference)
    print(f"{tiny.spec.name} {storage}: block executions {calls} of {reference_calls}, relative difference "
          f"{error:.6g} (per block {per_block_error:.6g}; to per block {relative(latent, per_block):.3g})")
    assert error > 0, "nothing was predicted"
    # A forecast of a span's summed residual, or from int8 slots, is close
    # to the per-block one: far closer to it than either is to the plain run.
    assert relative(latent, per_block) < 0.5 * per_block_error
    assert error < 1.5 * per_block_error


@pytest.mark.parametrize("storage", ["per block", "span 2, int8"])
def test_offload_path_predicts_what_the_device_cache_predicts(tiny, nodes, monkeypatch, storage):
    """Forced caching with the cache in system memory apart from the model's
    device: bit for bit the run with the same layout on the model's device."""
    widgets = {"per block": {}, "span 2, int8": dict(cache_span=2, cache_dtype="int8")}[storage]
    on_device, device_calls = tiny.sample(rfc(nodes, tiny.model, **FORCED, **widgets), steps=FORCED_STEPS)
    spy = PlanSpy(nodes, monkeypatch, system_apart=True)
    offloaded, calls = tiny.sample(rfc(nodes, tiny.model, **FORCED, cache_device="cpu", **widgets),
                                   steps=FORCED_STEPS)
    assert spy.session.layout == expected_layout(nodes, widgets, system=True)
    assert spy.session.run.modules_predicted > 0
    assert calls == device_calls
    assert torch.equal(offloaded, on_device)


@pytest.mark.parametrize("span", [1, 2])
def test_int8_quantizes_the_residual_slots_only(tiny, nodes, monkeypatch, span):
    """What RCS's decision reads, the first block's input, stays in the
    model's dtype: the int8 features the run holds are its residual slots'
    (every unit's order + 1 slots of every sample), no more."""
    spy = PlanSpy(nodes, monkeypatch)
    tiny.sample(rfc(nodes, tiny.model, **FORCED, cache_dtype="int8", cache_span=span), steps=FORCED_STEPS)
    session = spy.session
    footprint = session.footprint
    assert session.layout == layout_type(nodes)(span=span, int8=True)
    slots = footprint.units(span) * footprint.slots * footprint.samples * footprint.residual_features
    assert spy.int8_features[id(session)] == slots
    assert spy.first_input_dtypes[id(session)] == {torch.float32}


# --- 3. A small machine: the plan takes a coarser layout, and the run holds no more ---

def smallest_total(footprint, layouts) -> int:
    return min(footprint.total(layout) for layout in layouts)


def assert_plan_is_honest(held: int, planned: int) -> None:
    """What a run held is what its plan said, give or take what the plan
    leaves out on models this small: RFE's sampled trust step (a whole
    residual below 4096 features) and the working tensors of a second
    block group of other stream shapes (Flux's single blocks), a few
    percent here and a few per mille at full size."""
    assert held <= 1.1 * planned, (held, planned)


@pytest.mark.parametrize("limited", ["free memory", "ram"])
@pytest.mark.parametrize("room", ["int8 fits", "only spans fit"])
def test_small_memory_picks_a_coarser_layout_and_stays_within_it(tiny, nodes, monkeypatch, caplog, unconstrained,
                                                                  limited, room):
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    footprint, unconstrained_peak = unconstrained
    layout = layout_type(nodes)
    per_block, per_block_int8 = footprint.total(layout()), footprint.total(layout(int8=True))
    spans = [layout(span, int8) for span in (2, 3) for int8 in (False, True)]
    if room == "int8 fits":
        budget = (per_block + per_block_int8) // 2
    else:
        budget = per_block_int8 - 1
        assert smallest_total(footprint, spans) <= budget, "no span fits below int8 per block"
    # The plan cannot just have ignored the budget: per block, the run held more.
    assert unconstrained_peak > budget

    reference, _ = tiny.plain()
    spy = PlanSpy(nodes, monkeypatch, **{"free" if limited == "free memory" else "ram": budget})
    latent, _ = tiny.sample(rfc(nodes, tiny.model, **ZERO))
    session = spy.session

    assert [b.device for b in spy.budgets] == [budget]
    if room == "int8 fits":
        assert session.layout == layout(int8=True)
    else:
        assert session.layout.span > 1 and not session.layout.system
    planned = session.footprint.total(session.layout)
    assert planned <= budget
    plans = [r.getMessage() for r in caplog.get_records("call") if "RFC: the cache will take" in r.getMessage()]
    assert len(plans) == 1
    assert session.layout.describe() in plans[0]
    assert f"device {pack_module(nodes, 'rfc_core.run').format_bytes(budget)}" in plans[0]
    print(f"{tiny.spec.name}, {limited} {budget} B: {session.layout.describe()}, held at most {spy.peak} B "
          f"(planned {planned}, per block held {unconstrained_peak})")
    assert 0 < spy.peak <= budget
    assert_plan_is_honest(spy.peak, planned)
    assert torch.equal(latent, reference)


@pytest.mark.parametrize("limited", ["free memory", "ram"])
def test_no_room_caches_the_whole_model_call(tiny, nodes, monkeypatch, caplog, limited):
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    where = "free" if limited == "free memory" else "ram"
    reference, reference_calls = tiny.plain(FORCED_STEPS)
    zero_reference, _ = tiny.plain()

    spy = PlanSpy(nodes, monkeypatch, **{where: 1024})
    latent, calls = tiny.sample(rfc(nodes, tiny.model, **ZERO))
    assert spy.session.granularity == "model" and spy.session.layout is None
    assert torch.equal(latent, zero_reference)
    warnings = [r for r in caplog.get_records("call")
                if r.levelname == "WARNING" and "caching the whole model call instead" in r.getMessage()]
    assert len(warnings) == 1

    caplog.clear()
    spy = PlanSpy(nodes, monkeypatch, **{where: 1024})
    latent, calls = tiny.sample(rfc(nodes, tiny.model, **FORCED), steps=FORCED_STEPS)
    session = spy.session
    assert session.granularity == "model" and session.layout is None
    assert "block-level cache did not fit" in "; ".join(session.fault_notes)
    warnings = [r for r in caplog.get_records("call")
                if r.levelname == "WARNING" and "caching the whole model call instead" in r.getMessage()]
    assert len(warnings) == 1, "said once"
    # The plan is made at the first block, inside the first model call, so
    # that call is computed uncached and the whole-model cache warms up on
    # the second; from there FORCED's plan: every computed evaluation runs
    # every block, a predicted one none.
    assert calls == reference_calls // FORCED_STEPS * (1 + forced_full_evaluations(FORCED_STEPS - 1))
    assert torch.isfinite(latent).all()
    assert 0 < relative(latent, reference) < 1.0


# --- 4. The memory_budget widget ---

@pytest.mark.parametrize("room", ["int8 fits", "only spans fit"])
def test_memory_budget_widget_bounds_what_the_run_holds(tiny, nodes, monkeypatch, caplog, unconstrained, room):
    """memory_budget in GB (2^30 bytes), as the node takes it: set between
    two layouts' sizes of this run's cache (a fraction of a megabyte on
    these models), with the machine's own memory left unlimited."""
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    footprint, unconstrained_peak = unconstrained
    layout = layout_type(nodes)
    per_block, per_block_int8 = footprint.total(layout()), footprint.total(layout(int8=True))
    budget = (per_block + per_block_int8) // 2 if room == "int8 fits" else per_block_int8 - 1
    budget_gb = budget / GIB
    cap = int(budget_gb * GIB)
    assert unconstrained_peak > cap

    reference, _ = tiny.plain(FORCED_STEPS)
    spy = PlanSpy(nodes, monkeypatch)
    latent, calls = tiny.sample(rfc(nodes, tiny.model, **FORCED, memory_budget=budget_gb), steps=FORCED_STEPS)
    session = spy.session
    assert [b.cap for b in spy.budgets] == [cap]
    if room == "int8 fits":
        assert session.layout == layout(int8=True)
    else:
        assert session.layout.span > 1
    planned = session.footprint.total(session.layout)
    assert planned <= cap
    assert f"memory_budget {pack_module(nodes, 'rfc_core.run').format_bytes(cap)}" in caplog.text
    print(f"{tiny.spec.name}, memory_budget {cap} B: {session.layout.describe()}, held at most {spy.peak} B "
          f"(planned {planned}, per block held {unconstrained_peak})")
    assert 0 < spy.peak <= cap
    assert_plan_is_honest(spy.peak, planned)
    assert session.run.modules_predicted > 0
    assert torch.isfinite(latent).all()
    assert 0 < relative(latent, reference) < 1.0
