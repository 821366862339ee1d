"""Core's FluxKVCache (the FLUX.2 Klein edit templates) next to RFC Cache.

After the first step FluxKVCache drops the reference images' tokens from the
image stream and serves their K/V from its own cache, while the transformer
options still count them. RFC must keep the run it had: the same full
computations as without FluxKVCache, the same chunk (no fresh start at the
second evaluation), and no more cache memory, in either order of the nodes.
Block executions are counted with torch hooks, outside the pack."""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, FamilySpec, forced_full_evaluations, pack_module, rfc, sample_spec
from test_family_flux2 import FLUX2_KLEIN, LATENT_SHAPE, text
from tiny_models import build, counted

STEPS = 12


def with_references(count: int):
    def conditioning(batch: int, seed: int) -> list:
        references = [torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(11 + number))
                      for number in range(count)]
        return text(batch, seed, reference_latents=references, reference_latents_method="index_timestep_zero")

    return conditioning


@pytest.fixture(scope="module")
def kv_cache_node(comfy):
    import comfy_extras.nodes_flux as nodes_flux

    node = getattr(nodes_flux, "FluxKVCache", None)
    if node is None:
        pytest.skip("this ComfyUI has no FluxKVCache node (added after v0.3.64)")

    def apply(model):
        return node.execute(model)[0]

    return apply


@pytest.fixture(scope="module")
def klein(comfy):
    return build("Flux2", FLUX2_KLEIN)


def _run(nodes, patcher, spec, model, monkeypatch):
    """(latent, real block executions, the finished RFCRun or None)."""
    runtime = pack_module(nodes, "nodes.runtime")
    finished = []
    finish = runtime.SamplingSession.finish

    def keep(session):
        finished.append(session.run)
        return finish(session)

    monkeypatch.setattr(runtime.SamplingSession, "finish", keep)
    diffusion_model = model.model.diffusion_model
    blocks = [*diffusion_model.double_blocks, *diffusion_model.single_blocks]
    latent, calls = counted(blocks, lambda: sample_spec(spec, patcher, steps=STEPS))
    return latent, calls, finished[0] if finished else None


@pytest.mark.parametrize("references", [1, 2])
@pytest.mark.parametrize("order", ["kv_then_rfc", "rfc_then_kv"])
def test_flux_kv_cache_keeps_the_run_rfc_has_without_it(klein, nodes, kv_cache_node, references, order,
                                                        monkeypatch):
    spec = FamilySpec(name="flux", config_class="Flux2", unet_config=FLUX2_KLEIN, latent_shape=LATENT_SHAPE,
                      conditioning=with_references(references))
    plain_kv = kv_cache_node(klein)
    reference_latent, reference_calls, _ = _run(nodes, plain_kv, spec, klein, monkeypatch)
    _, without_calls, without = _run(nodes, rfc(nodes, klein, **FORCED), spec, klein, monkeypatch)
    cached = (rfc(nodes, kv_cache_node(klein), **FORCED) if order == "kv_then_rfc"
              else kv_cache_node(rfc(nodes, klein, **FORCED)))
    latent, calls, run = _run(nodes, cached, spec, klein, monkeypatch)

    full = forced_full_evaluations(STEPS)
    assert without.computed_evaluations == full
    assert run.computed_evaluations == full, run.step_table()
    assert [e.computed for e in run.evaluations] == [e.computed for e in without.evaluations]
    assert calls == without_calls == reference_calls // STEPS * full
    # One chunk for the whole run: the second evaluation is no fresh start.
    assert run.evaluations[1].reason != "no history yet"
    # The dropped tokens' cache is let go: never more than without FluxKVCache.
    assert run.peak_bytes <= without.peak_bytes
    assert torch.isfinite(latent).all()
    relative = ((latent - reference_latent).norm() / reference_latent.norm()).item()
    print(f"FluxKVCache, {references} reference(s), {order}: block executions {calls} of {reference_calls}, "
          f"cache peak {run.peak_bytes} against {without.peak_bytes} without it, relative difference {relative:.3g}")
    assert relative < 1.0


def test_the_module_input_leaves_the_dropped_reference_tokens_out(klein, nodes, kv_cache_node, monkeypatch):
    """Once FluxKVCache has dropped them, no reference token is in the
    image stream, and the module input has every image token, modulated by
    the sample's own timestep row (not the reference's timestep-zero row)."""
    adapters = pack_module(nodes, "nodes.adapters")
    adapter = adapters.detect_adapter(klein.model.diffusion_model)
    seen = []
    module_input = type(adapter).module_input

    def spy(self_, diffusion_model, kind, index, args, **stream):
        value = module_input(self_, diffusion_model, kind, index, args, **stream)
        seen.append((args["img"].shape[1], self_.dropped_tail_tokens(kind, args), value.shape[1]))
        return value

    monkeypatch.setattr(type(adapter), "module_input", spy)
    spec = FamilySpec(name="flux", config_class="Flux2", unet_config=FLUX2_KLEIN, latent_shape=LATENT_SHAPE,
                      conditioning=with_references(1))
    sample_spec(spec, rfc(nodes, kv_cache_node(klein), **FORCED), steps=4)
    image_tokens = LATENT_SHAPE[1] * LATENT_SHAPE[2]
    assert seen[0] == (2 * image_tokens, 0, image_tokens)  # first step: the reference is still in the stream
    assert all(entry == (image_tokens, image_tokens, image_tokens) for entry in seen[1:]), seen
