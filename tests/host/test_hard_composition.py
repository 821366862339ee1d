"""RFC Cache next to other model patches: LoRA, another node's block patches,
ControlNet, ModelSampling, torch.compile and core's EasyCache, each applied
before and after the RFC node.

Real block executions are counted with torch hooks from outside the pack.
FORCED on a run of STEPS = 12 evaluations at cfg 1 computes evaluations 0,
3, 6 and 9 (FORCED_COMPUTED); threshold 0 never skips.
"""

from __future__ import annotations

import logging

import pytest
import torch

from benchmarks.host import BlockCounter
from family_harness import FORCED, sample_spec
from test_hard_faults import FLUX_SPEC, FORCED_COMPUTED, SPECS, STEPS, family_of, records
from tiny_models import FLUX_CONFIG, build, complete_params, counted

THRESHOLD_ZERO = {**FORCED, "threshold": 0.0}
ORDERS = ("other-then-rfc", "rfc-then-other")


@pytest.fixture(params=sorted(SPECS))
def family(request, comfy):
    return family_of(request.param)


def rfc_node(family, model, **widgets):
    return family.nodes.NODE_CLASS_MAPPINGS["RFCCache"]().apply(model, unique_id="7", **widgets)[0]


def stacked(family, order: str, other, widgets: dict):
    """`other` (a function of a model returning a patched clone) and the RFC
    node on the family's model, in the given order."""
    if order == "other-then-rfc":
        return rfc_node(family, other(family.model), **widgets)
    return other(rfc_node(family, family.model, **widgets))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ LoRA

def block_lora(family, rank: int = 2, scale: float = 0.2, seed: int = 3) -> dict:
    """A LoRA in the generic "<weight key>.lora_up/.lora_down" format on every
    linear weight of the first and the last cached block."""
    diffusion_model = family.diffusion_model
    prefixes = tuple(f"diffusion_model.{family.adapter.block_path(diffusion_model, *family.block_keys[i])}."
                     for i in (0, -1))
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in family.model.model.state_dict().items():
        if key.startswith(prefixes) and key.endswith(".weight") and weight.ndim == 2:
            name = key[: -len(".weight")]
            lora[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * scale
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * scale
    assert lora
    return lora


def test_lora_before_and_after_rfc(family):
    """LoraLoader's path (comfy.sd.load_lora_for_models, ModelPatcher.add_patches)
    in either order: threshold 0 is the LoRA'd model bit for bit, forced
    caching cuts block executions, and the LoRA is in effect either way."""
    import comfy.sd

    lora = block_lora(family)

    def with_lora(model):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        assert len(patched.patches) == len(lora) // 2
        return patched

    plain, plain_calls = family.run(family.model)
    lora_reference, _ = family.run(with_lora(family.model))
    cached_without_lora, _ = family.run(rfc_node(family, family.model, **FORCED))
    assert not torch.equal(lora_reference, plain)

    forced = {}
    for order in ORDERS:
        unchanged, unchanged_calls = family.run(stacked(family, order, with_lora, THRESHOLD_ZERO))
        assert torch.equal(unchanged, lora_reference), order
        assert unchanged_calls == plain_calls
        forced[order], calls = family.run(stacked(family, order, with_lora, FORCED))
        assert calls == plain_calls // STEPS * FORCED_COMPUTED, order
        assert torch.isfinite(forced[order]).all()
        assert relative(forced[order], lora_reference) < 1.0
        assert not torch.equal(forced[order], cached_without_lora), f"{order}: the LoRA was lost"
    assert torch.equal(*forced.values())


# ----------------------------------------------- another node's block patch

def block_patch(stream: str, calls: list):
    """Another node's `patches_replace` entry: runs the block it is given and
    scales the first stream it returns. A function, not an object, so that
    the deep copy ModelPatcher.clone makes of model options shares `calls`."""
    def patch(args, extra):
        calls.append(1)
        out = dict(extra["original_block"](args))
        out[stream] = out[stream] * 1.05
        return out
    return patch


class ForwardPatch:
    """Another node's object patch of a block's forward, written the way
    most are: *args, **kwargs passed through to the forward it replaced."""

    def __init__(self, forward):
        self.forward = forward
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.forward(*args, **kwargs) * 1.05


def replace_family(family):
    if any(family.adapter.group(kind).hook != "replace" for kind, _ in family.block_keys):
        pytest.skip(f"{family.spec.name} has no patches_replace; see the forward-patch tests")


def with_block_patches(family, patches: dict):
    def apply(model):
        patched = model.clone()
        for (kind, index), patch in patches.items():
            patched.set_model_patch_replace(patch, "dit", kind, index)
        return patched
    return apply


@pytest.mark.parametrize("order", ORDERS)
def test_block_patch_of_another_node_is_chained_in_either_order(family, order):
    """Another node's patch on every block runs in place of the block, inside
    the cache: threshold 0 gives exactly that patch alone, and with forced
    caching it runs exactly when its block is computed (never dropped, never
    run on a predicted evaluation), whichever node was applied last."""
    replace_family(family)

    def new_patches():
        calls = {key: [] for key in family.block_keys}
        patches = {key: block_patch(family.adapter.group(key[0]).streams[0], calls[key]) for key in family.block_keys}
        return patches, calls

    patches, calls_of = new_patches()
    alone, alone_calls = family.run(with_block_patches(family, patches)(family.model))
    assert sum(map(len, calls_of.values())) == alone_calls

    patches, calls_of = new_patches()
    unchanged, unchanged_calls = family.run(stacked(family, order, with_block_patches(family, patches), THRESHOLD_ZERO))
    assert torch.equal(unchanged, alone)
    assert sum(map(len, calls_of.values())) == unchanged_calls == alone_calls

    patches, calls_of = new_patches()
    latent, calls = family.run(stacked(family, order, with_block_patches(family, patches), FORCED))
    cached_without_patch, _ = family.run(rfc_node(family, family.model, **FORCED))
    assert calls == alone_calls // STEPS * FORCED_COMPUTED
    assert [len(c) for c in calls_of.values()] == [FORCED_COMPUTED] * len(patches)
    assert torch.isfinite(latent).all()
    assert relative(latent, alone) < 1.0
    assert not torch.equal(latent, cached_without_patch)


@pytest.mark.parametrize("holds", ["in-its-closure", "out-of-sight"])
def test_block_patch_applied_after_rfc_that_wraps_it_is_cached_once(family, holds, caplog):
    """A later block patch that calls the entry it found (RFC's) instead of
    the block. Held where RFC can see it (closure, defaults, attributes), it
    is left outside: it runs on every evaluation around the cache, as its
    author meant. Held out of sight (here in a list), RFC puts itself around
    it for the run and its own entry inside only runs the block. Either way
    each block is cached once: block executions, and the summary's count of
    them, are those of a plain cached run."""
    replace_family(family)
    calls_of = {key: [] for key in family.block_keys}

    def wrapping(model):
        patched = model.clone()
        found = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        for key in family.block_keys:
            stream = family.adapter.group(key[0]).streams[0]
            if holds == "in-its-closure":
                def wrap(inner, stream, calls):
                    def patch(args, extra):
                        calls.append(1)
                        out = dict(inner(args, extra))
                        out[stream] = out[stream] * 1.05
                        return out
                    return patch
                patch = wrap(found[key], stream, calls_of[key])
            else:
                def patch(args, extra, registry=[found[key]], stream=stream, calls=calls_of[key]):
                    calls.append(1)
                    out = dict(registry[0](args, extra))
                    out[stream] = out[stream] * 1.05
                    return out
            patched.set_model_patch_replace(patch, "dit", *key)
        return patched

    _, reference_calls = family.run(family.model)
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, calls = family.run(stacked(family, "rfc-then-other", wrapping, FORCED))
    assert calls == reference_calls // STEPS * FORCED_COMPUTED
    runs = STEPS if holds == "in-its-closure" else FORCED_COMPUTED
    assert [len(c) for c in calls_of.values()] == [runs] * len(calls_of)
    assert f"block calls computed {calls}," in caplog.text
    assert torch.isfinite(latent).all()


def test_block_patch_order_does_not_matter(family):
    replace_family(family)
    latents = []
    for order in ORDERS:
        patches = {key: block_patch(family.adapter.group(key[0]).streams[0], []) for key in family.block_keys}
        latents.append(family.run(stacked(family, order, with_block_patches(family, patches), FORCED))[0])
    assert torch.equal(*latents)


def forward_family(family):
    if all(family.adapter.group(kind).hook == "replace" for kind, _ in family.block_keys):
        pytest.skip(f"{family.spec.name} is patched through patches_replace")


def with_forward_patches(family, indices, patches: list, wrap_current: bool = True):
    """Another node's object patch of the forward of the blocks at `indices`.
    wrap_current: it wraps whatever forward the model has so far (what a
    node built on ModelPatcher.get_model_object does); otherwise it wraps
    the block class's own forward and so replaces any patch already there."""
    def apply(model):
        import types

        patched = model.clone()
        for i in indices:
            block = family.block(i)
            path = f"diffusion_model.{family.adapter.block_path(family.diffusion_model, *family.block_keys[i])}.forward"
            own_forward = types.MethodType(type(block).forward, block)
            patches.append(ForwardPatch(patched.get_model_object(path) if wrap_current else own_forward))
            patched.add_object_patch(path, patches[-1])
        return patched
    return apply


def every_block_forward_patched(family, order: str):
    """Every block forward-patched and stacked with RFC in `order`: the
    patches alone, with RFC at threshold 0, and with RFC forced to skip."""
    forward_family(family)
    every_block = range(len(family.block_keys))
    alone, alone_calls = family.run(with_forward_patches(family, every_block, [])(family.model))
    unchanged, _ = family.run(stacked(family, order, with_forward_patches(family, every_block, []), THRESHOLD_ZERO))
    patches = []
    latent, calls = family.run(stacked(family, order, with_forward_patches(family, every_block, patches), FORCED))
    return alone, alone_calls, unchanged, latent, calls, patches


def test_forward_patch_applied_before_rfc_is_chained(family):
    alone, alone_calls, unchanged, latent, calls, patches = every_block_forward_patched(family, "other-then-rfc")
    assert torch.equal(unchanged, alone)
    assert calls == alone_calls // STEPS * FORCED_COMPUTED
    assert [p.calls for p in patches] == [FORCED_COMPUTED] * len(patches)
    assert torch.isfinite(latent).all() and relative(latent, alone) < 1.0


def test_forward_patch_applied_after_rfc_that_wraps_it_keeps_the_cache(family, caplog):
    """A later forward patch that wraps the forward it finds (RFC's) keeps
    every block cached; it runs on every evaluation, around the cache."""
    caplog.set_level(logging.WARNING, logger="ComfyUI-RFC")
    alone, alone_calls, unchanged, latent, calls, patches = every_block_forward_patched(family, "rfc-then-other")
    assert torch.equal(unchanged, alone)
    assert calls == alone_calls // STEPS * FORCED_COMPUTED
    assert [p.calls for p in patches] == [STEPS] * len(patches)
    assert torch.isfinite(latent).all() and relative(latent, alone) < 1.0
    assert not records(caplog, logging.WARNING, "replaced the forward")


def test_forward_patch_applied_after_rfc_that_replaces_it_is_reported(family, caplog):
    """A later forward patch that does not call the one it replaces takes
    its block out of the cache (the patcher's object patches belong to that
    node): the block runs every evaluation, the others stay cached, and the
    log says which. With the first block replaced nothing can be decided,
    and the run is exactly the other patch alone."""
    forward_family(family)
    last = len(family.block_keys) - 1
    caplog.set_level(logging.WARNING, logger="ComfyUI-RFC")
    patches = []
    latent, calls = family.run(stacked(family, "rfc-then-other",
                                       with_forward_patches(family, [last], patches, wrap_current=False), FORCED))
    assert calls == FORCED_COMPUTED * last + STEPS
    assert [p.calls for p in patches] == [STEPS]
    assert torch.isfinite(latent).all()
    assert len(records(caplog, logging.WARNING, "replaced the forward of 1 block(s) without calling RFC's")) == 1

    every_block = range(len(family.block_keys))
    alone, alone_calls = family.run(with_forward_patches(family, every_block, [])(family.model))
    caplog.clear()
    latent, calls = family.run(stacked(family, "rfc-then-other",
                                       with_forward_patches(family, every_block, [], wrap_current=False), FORCED))
    assert calls == alone_calls
    assert torch.equal(latent, alone)
    assert len(records(caplog, logging.WARNING, "nothing could be skipped, the first block is among them")) == 1


# ------------------------------------------------------------- ControlNet

def tiny_flux_controlnet(seed: int = 5):
    """ControlNetFlux (InstantX layout: the hint is a latent) at the tiny
    Flux's size, wrapped as comfy.controlnet.load_controlnet_flux_instantx does."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management
    import comfy.ops

    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=True, control_latent_channels=FLUX_CONFIG["in_channels"], operations=comfy.ops.disable_weight_init,
        dtype=torch.float32, device="cpu", **complete_params(FLUX_CONFIG))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in control_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    device = comfy.model_management.get_torch_device()
    # No latent format: the hint is given as a latent, so no VAE is needed.
    return comfy.controlnet.ControlNet(control_model, compression_ratio=1, latent_format=None, load_device=device,
                                       manual_cast_dtype=None, extra_conds=["y", "guidance"]), control_model


def test_flux_controlnet_with_rfc(comfy):
    """A Flux ControlNet attached through the conditioning as
    ControlNetApplyAdvanced does. Its residuals are added after each block
    returns, so a predicted block gets this evaluation's control like a
    computed one; the ControlNet itself runs on every evaluation."""
    import comfy.sample
    import nodes

    model = build("Flux", FLUX_CONFIG)
    diffusion_model = model.model.diffusion_model
    blocks = list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)
    control_net, control_model = tiny_flux_controlnet()
    latent_shape = (1, *FLUX_SPEC.latent_shape)
    hint = torch.randn(1, *FLUX_SPEC.latent_shape[1:], FLUX_SPEC.latent_shape[0],
                       generator=torch.Generator().manual_seed(9))
    positive, negative = FLUX_SPEC.conditioning(1, 1), FLUX_SPEC.conditioning(1, 2)
    controlled = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint, 1.0, 0.0, 1.0)

    def run(patcher, conditioning):
        noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
        return counted(blocks, lambda: comfy.sample.sample(
            patcher, noise, STEPS, 1.0, "euler", "simple", *conditioning, torch.zeros(latent_shape), seed=0,
            disable_pbar=True))

    def rfc(**widgets):
        return nodes.NODE_CLASS_MAPPINGS["RFCCache"]().apply(model, unique_id="7", **widgets)[0]

    reference, reference_calls = run(model, controlled)
    uncontrolled, _ = run(model, (positive, negative))
    assert not torch.equal(reference, uncontrolled)

    unchanged, _ = run(rfc(**THRESHOLD_ZERO), controlled)
    assert torch.equal(unchanged, reference)

    control_blocks = list(control_model.double_blocks)
    control_runs = [0]
    handles = [block.register_forward_hook(lambda *_: control_runs.__setitem__(0, control_runs[0] + 1))
               for block in control_blocks]
    try:
        latent, calls = run(rfc(**FORCED), controlled)
    finally:
        for handle in handles:
            handle.remove()
    cached_uncontrolled, _ = run(rfc(**FORCED), (positive, negative))
    assert calls == reference_calls // STEPS * FORCED_COMPUTED
    assert control_runs[0] == STEPS * len(control_blocks)
    assert torch.isfinite(latent).all()
    assert relative(latent, reference) < 1.0
    assert not torch.equal(latent, cached_uncontrolled)


# ---------------------------------------------------------- ModelSampling

WINDOW = dict(start_percent=0.2, end_percent=0.7)


def model_sampling_node(family):
    """The ModelSampling node a workflow of this family would use, set far
    from the family's own default shift."""
    import nodes

    if family.spec.name == "flux":
        node = nodes.NODE_CLASS_MAPPINGS["ModelSamplingFlux"]()
        return lambda model: node.patch(model, max_shift=3.0, base_shift=0.5, width=1024, height=1024)[0]
    node = nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]()
    return lambda model: node.patch(model, shift=1.0)[0]


def forced_computed_evaluations(sigmas: torch.Tensor, model_sampling, start_percent: float, end_percent: float,
                                warmup: int = 1, max_skip: int = FORCED["max_skip"]) -> int:
    """How many of euler's evaluations FORCED computes when the skip window
    is placed with `model_sampling`."""
    highest = float(model_sampling.percent_to_sigma(start_percent))
    lowest = float(model_sampling.percent_to_sigma(end_percent))
    full = in_row = computed = 0
    for sigma in sigmas[:-1].tolist():
        if lowest < sigma <= highest and full >= warmup and in_row < max_skip:
            in_row += 1
        else:
            full, in_row, computed = full + 1, 0, computed + 1
    return computed


def test_model_sampling_node_before_or_after_rfc_places_the_skip_window(family):
    """ModelSamplingFlux / ModelSamplingSD3 in either order: the skip window
    (start_percent, end_percent) comes from the model sampling the sampler
    finally uses, not from the one the model had when RFC was applied."""
    import comfy.samplers

    shifted = model_sampling_node(family)
    final = shifted(family.model).get_model_object("model_sampling")
    original = family.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(final, "simple", STEPS)
    expected = forced_computed_evaluations(sigmas, final, **WINDOW)
    assert expected != forced_computed_evaluations(sigmas, original, **WINDOW), "the test could not tell them apart"

    reference, reference_calls = family.run(shifted(family.model))
    blocks = reference_calls // STEPS
    latents = []
    for order in ORDERS:
        latent, calls = family.run(stacked(family, order, shifted, {**FORCED, **WINDOW}))
        assert calls == expected * blocks, order
        assert torch.isfinite(latent).all()
        assert relative(latent, reference) < 1.0
        latents.append(latent)
        unchanged, _ = family.run(stacked(family, order, shifted, {**THRESHOLD_ZERO, **WINDOW}))
        assert torch.equal(unchanged, reference)
    assert torch.equal(*latents)


# ------------------------------------------------------------ torch.compile

COMPILE_CHECK = """
import json, sys
sys.path[:0] = [{repo!r}, {here!r}]
from benchmarks.host import boot_comfyui
boot_comfyui({comfyui!r})
import torch
from comfy_api.torch_helpers import set_torch_compile_wrapper
import test_hard_composition as check

family = check.family_of({name!r})

def compiled(model):
    patched = model.clone()
    set_torch_compile_wrapper(model=patched, backend="eager")
    return patched

eager, eager_calls = family.run(check.rfc_node(family, family.model, **check.FORCED))
results = {{}}
for order in check.ORDERS:
    latent, calls = family.run(check.stacked(family, order, compiled, check.FORCED))
    results[order] = dict(calls=calls, equal=torch.equal(latent, eager), finite=bool(torch.isfinite(latent).all()))
print("RESULT " + json.dumps(dict(eager_calls=eager_calls, results=results)))
"""


def test_torch_compile_before_or_after_rfc(family):
    """What core's TorchCompileModel node does (comfy_api's
    set_torch_compile_wrapper swaps the diffusion model for a compiled one
    during each model call), before or after RFC. torch.compile's tracer goes
    through the cache's block patches, with graph breaks where the cache reads
    a tensor's value, recompiling per block until its limit and then running
    those frames uncompiled: either order gives what the uncompiled cached
    run gives, block execution for block execution. The "eager" backend
    traces exactly as "inductor" does but builds no kernels, which on a
    2-core CPU takes minutes (inductor was checked by hand: same block
    executions, latent within 1.2e-4). It runs in its own process: the
    tracer leaves compiled graphs holding fake tensors in module globals,
    which torch._dynamo.reset() does not remove."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if family.spec.name == "wan":
        pytest.skip("Wan's blocks are reached through patches_replace exactly as Flux's are")
    here = Path(__file__).resolve().parent
    script = COMPILE_CHECK.format(repo=str(here.parents[1]), here=str(here), comfyui=os.environ["COMFYUI_PATH"],
                                  name=family.spec.name)
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    result_lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    assert finished.returncode == 0 and result_lines, finished.stderr[-3000:]
    result = json.loads(result_lines[-1][len("RESULT "):])
    for order, outcome in result["results"].items():
        assert outcome == dict(calls=result["eager_calls"], equal=True, finite=True), order


# --------------------------------------------------------------- EasyCache

@pytest.mark.parametrize("other", ["EasyCache", "LazyCache"])
def test_core_easycache_is_refused_in_either_order(family, other):
    """Two caches on one model would each judge their error from outputs the
    other already approximated. RFC after EasyCache is refused when the node
    runs; EasyCache after RFC when sampling starts, before any block runs."""
    node = family.nodes.NODE_CLASS_MAPPINGS[other]

    def with_other(model):
        return node.execute(model=model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                            verbose=False).result[0]

    with pytest.raises(ValueError, match=f"core's {other} node.*remove one of them"):
        rfc_node(family, with_other(family.model), **FORCED)
    patched = with_other(rfc_node(family, family.model, **FORCED))
    counter = BlockCounter(family.counted_modules())
    try:
        with pytest.raises(ValueError, match=f"core's {other} node.*remove one of them"):
            sample_spec(family.spec, patched, steps=STEPS)
    finally:
        counter.close()
    assert counter.calls == 0
    # The refusal leaves nothing behind: the same RFC model without EasyCache samples.
    latent, calls = family.run(rfc_node(family, family.model, **FORCED))
    assert torch.isfinite(latent).all() and calls < family.run(family.model)[1]
