"""What a cached run keeps in memory, and for how long.

The cache lives in one session per sampling run. Once the run is over no
tensor the cache stored may still be reachable, even while something (here a
spy around `SamplingSession.finish`) keeps the session object itself alive,
and running the same patched model over and over must not grow memory.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from family_harness import FORCED, pack_module, rfc
from test_hard_reuse import SPECS, Family

STEPS = 6
REPEATS = 20


def tensors_under(*roots, skip=()) -> list[torch.Tensor]:
    """Every tensor reachable from `roots` through containers and object
    attributes, not entering modules (weights) or the objects in `skip`."""
    found, seen = [], {id(item) for item in skip}
    pending = list(roots)
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, torch.nn.Module):
            continue
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return found


def tensors_held_by(session) -> list[torch.Tensor]:
    """Every tensor reachable from a session's own state; the model's weights
    and the node's settings belong to the patched model, not to the run."""
    return tensors_under(*vars(session).values(), skip=(session.settings, session.adapter, session.diffusion_model))


class CacheSpy:
    """Weak references to every tensor handed to the cache (each recorded
    residual and module input) and to every tensor a session still holds
    when it finishes, and each run's cache peak; with `keep_sessions` the
    finished sessions themselves are kept alive, as a held traceback would."""

    def __init__(self, nodes, monkeypatch, keep_sessions: bool = True):
        runtime = pack_module(nodes, "nodes.runtime")
        self.sessions = []
        self.peak_bytes: list[int] = []
        self.references: list[weakref.ref] = []
        store, reserve, commit = runtime.RFCRun.store, runtime.RFCRun.reserve, runtime.RFCRun.commit
        finish = runtime.SamplingSession.finish

        def spy_store(run, chunk_key, module_key, module_input, residuals):
            self.references.extend(weakref.ref(t) for t in (module_input, *residuals) if t is not None)
            return store(run, chunk_key, module_key, module_input, residuals)

        def spy_reserve(run, chunk_key, module_key, likes):
            slots = reserve(run, chunk_key, module_key, likes)
            self.references.extend(weakref.ref(t) for t in slots or ())
            return slots

        def spy_commit(run, chunk_key, module_key, module_input):
            if module_input is not None:
                self.references.append(weakref.ref(module_input))
            return commit(run, chunk_key, module_key, module_input)

        def spy_finish(session):
            if keep_sessions:
                self.sessions.append(session)
            self.references.extend(weakref.ref(t) for t in tensors_held_by(session))
            try:
                return finish(session)
            finally:
                self.peak_bytes.append(session.run.peak_bytes)

        monkeypatch.setattr(runtime.RFCRun, "store", spy_store)
        monkeypatch.setattr(runtime.RFCRun, "reserve", spy_reserve)
        monkeypatch.setattr(runtime.RFCRun, "commit", spy_commit)
        monkeypatch.setattr(runtime.SamplingSession, "finish", spy_finish)

    def still_alive(self) -> list[torch.Tensor]:
        gc.collect()
        return [t for t in (reference() for reference in self.references) if t is not None]


def live_objects(session_type) -> tuple[int, int, int]:
    """Live tensors the garbage collector can see, the bytes of their
    distinct storages, and live sessions: deterministic on the CPU from one
    run to the next."""
    gc.collect()
    # type(), not isinstance: some of torch's deprecated aliases warn when asked their class.
    objects = gc.get_objects()
    tensors = [item for item in objects if issubclass(type(item), torch.Tensor)]
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    sessions = sum(1 for item in objects if type(item) is session_type)
    return len(tensors), sum(storages.values()), sessions


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, comfy):
    return Family(SPECS[request.param])


def test_no_cached_tensor_outlives_its_run(family, nodes, monkeypatch):
    spy = CacheSpy(nodes, monkeypatch)
    patched = rfc(nodes, family.model, **FORCED)
    latent, calls = family.ksampler(patched, family.empty_latent(batch=2), steps=STEPS)
    _, full_calls = family.ksampler(family.model, family.empty_latent(batch=2), steps=STEPS)

    assert calls < full_calls
    assert len(spy.sessions) == 1
    session = spy.sessions[0]
    assert session.run.peak_bytes > 0
    assert len(spy.references) > 0
    assert spy.still_alive() == []
    assert session.run.cache_bytes() == 0
    assert tensors_held_by(session) == []


def test_repeated_runs_on_one_patched_model_do_not_grow_memory(family, nodes, monkeypatch):
    session_type = pack_module(nodes, "nodes.runtime").SamplingSession
    spy = CacheSpy(nodes, monkeypatch, keep_sessions=False)
    patched = rfc(nodes, family.model, **FORCED)
    options_before = repr(patched.model_options)
    latent = family.empty_latent()
    # The first runs fill ComfyUI's own lazily built state (loaded-model
    # bookkeeping, rotary tables); growth after that would be ours.
    for _ in range(2):
        family.ksampler(patched, latent, steps=STEPS)
    measured = []
    for _ in range(REPEATS):
        family.ksampler(patched, latent, steps=STEPS)
        measured.append(live_objects(session_type))

    assert len(set(measured)) == 1, measured
    assert len(spy.peak_bytes) == REPEATS + 2
    assert len(set(spy.peak_bytes)) == 1 and spy.peak_bytes[0] > 0
    assert spy.still_alive() == []
    assert repr(patched.model_options) == options_before


def test_cache_size_depends_on_the_order_not_on_the_step_count(family, nodes, monkeypatch):
    """Each module keeps the newest order + 1 residuals, not a history of the run: a run twice as long peaks at the same size."""
    spy = CacheSpy(nodes, monkeypatch, keep_sessions=False)
    peaks = {}
    for order in (1, 2):
        patched = rfc(nodes, family.model, **{**FORCED, "order": order})
        for steps in (STEPS, 2 * STEPS):
            family.ksampler(patched, family.empty_latent(), steps=steps)
            peaks[order, steps] = spy.peak_bytes[-1]
    assert peaks[1, STEPS] == peaks[1, 2 * STEPS] > 0
    assert peaks[2, STEPS] == peaks[2, 2 * STEPS] > peaks[1, STEPS]
