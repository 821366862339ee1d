"""RFC on Flux and Chroma inside a real ComfyUI: exactness, real savings, batching, CFG, reuse."""

from __future__ import annotations

import sys

import pytest
import torch

from tiny_models import CHROMA_CONFIG, FLUX_CONFIG, BlockCounter, build, sample

FAMILIES = {"flux": ("Flux", FLUX_CONFIG), "chroma": ("Chroma", CHROMA_CONFIG)}
STEPS = 12
FORCED = dict(threshold=10.0, max_skip=2, order=1, start_percent=0.0, end_percent=1.0)


def rfc(comfy_nodes, model, advanced=False, **widgets):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["RFCCacheAdvanced" if advanced else "RFCCache"]()
    return node.apply(model, unique_id="7", **widgets)[0]


@pytest.fixture(params=sorted(FAMILIES))
def family(request, comfy):
    import nodes

    class_name, config = FAMILIES[request.param]
    model = build(class_name, config)
    return request.param, model, nodes


def counted_sample(model_patcher, diffusion_model, **kwargs):
    counter = BlockCounter(diffusion_model)
    try:
        latent = sample(model_patcher, **kwargs)
    finally:
        counter.close()
    return latent, counter.calls


@pytest.mark.parametrize("cfg,batch", [(1.0, 1), (3.0, 2)])
def test_threshold_zero_is_bit_identical(family, cfg, batch):
    name, model, nodes = family
    diffusion_model = model.model.diffusion_model
    reference, reference_calls = counted_sample(model, diffusion_model, steps=STEPS, cfg=cfg, batch=batch)
    patched = rfc(nodes, model, **{**FORCED, "threshold": 0.0})
    latent, calls = counted_sample(patched, diffusion_model, steps=STEPS, cfg=cfg, batch=batch)
    assert torch.equal(latent, reference)
    assert calls == reference_calls


def test_cache_that_never_gets_to_skip_is_bit_identical(family):
    """The cache is active (every block goes through the patch and is recorded)
    but the skip window excludes every step: outputs must not change by a bit."""
    name, model, nodes = family
    diffusion_model = model.model.diffusion_model
    reference, _ = counted_sample(model, diffusion_model, steps=STEPS, cfg=3.0, batch=2)
    patched = rfc(nodes, model, **{**FORCED, "start_percent": 0.999, "end_percent": 1.0})
    latent, _ = counted_sample(patched, diffusion_model, steps=STEPS, cfg=3.0, batch=2)
    assert torch.equal(latent, reference)


@pytest.mark.parametrize("cfg,batch", [(1.0, 1), (3.0, 2)])
def test_forced_caching_cuts_block_executions_to_about_a_third(family, cfg, batch):
    name, model, nodes = family
    diffusion_model = model.model.diffusion_model
    steps = 30
    reference, reference_calls = counted_sample(model, diffusion_model, steps=steps, cfg=cfg, batch=batch)
    patched = rfc(nodes, model, **FORCED)
    latent, calls = counted_sample(patched, diffusion_model, steps=steps, cfg=cfg, batch=batch)
    blocks = len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks)
    chunks = reference_calls // (steps * blocks)
    # one warm-up evaluation, then two predicted and one computed:
    # 1 + 29 // 3 = 10 of 30 evaluations are computed
    full_evaluations = 1 + (steps - 1) // (FORCED["max_skip"] + 1)
    assert full_evaluations == 10
    assert calls == full_evaluations * blocks * chunks
    assert torch.isfinite(latent).all()
    assert latent.shape == reference.shape
    relative = ((latent - reference).norm() / reference.norm()).item()
    print(f"{name} cfg={cfg} batch={batch}: block executions {calls} vs {reference_calls}, "
          f"relative L2 difference {relative:.4f}")
    assert 0 < relative < 0.5


def test_second_run_on_the_same_patched_model_matches_a_fresh_one(family):
    name, model, nodes = family
    patched = rfc(nodes, model, **FORCED)
    first = sample(patched, steps=STEPS, cfg=3.0, batch=2)
    second = sample(patched, steps=STEPS, cfg=3.0, batch=2)
    fresh = sample(rfc(nodes, model, **FORCED), steps=STEPS, cfg=3.0, batch=2)
    assert torch.equal(first, second)
    assert torch.equal(first, fresh)


def test_input_model_stays_untouched(family):
    name, model, nodes = family
    before = sample(model, steps=6)
    rfc(nodes, model, **FORCED)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert torch.equal(sample(model, steps=6), before)


def test_advanced_node_runs_fora_taylorseer_and_rfc(family):
    name, model, nodes = family
    diffusion_model = model.model.diffusion_model
    reference = sample(model, steps=STEPS)
    for estimator, scheduler in (("reuse", "fixed"), ("taylor", "fixed"), ("rfe", "rcs")):
        patched = rfc(nodes, model, advanced=True, estimator=estimator, scheduler=scheduler, interval=3,
                      **{**FORCED, "max_skip": 5})
        latent, calls = counted_sample(patched, diffusion_model, steps=STEPS)
        assert torch.isfinite(latent).all()
        assert calls < STEPS * 4
        assert not torch.equal(latent, reference)


def test_out_of_range_widget_is_a_clear_error(family):
    name, model, nodes = family
    with pytest.raises(ValueError, match="'max_skip' must be between 0 and 50"):
        rfc(nodes, model, **{**FORCED, "max_skip": -1})


def test_caching_failure_falls_back_to_full_computation(family, monkeypatch, caplog):
    name, model, nodes = family
    node_module = nodes.NODE_CLASS_MAPPINGS["RFCCache"].__module__
    runtime = sys.modules[node_module.rsplit(".", 1)[0] + ".runtime"]
    reference = sample(model, steps=STEPS)

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(runtime.RFCRun, "predicts", broken)
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    latent = sample(rfc(nodes, model, **FORCED), steps=STEPS)
    # Blocks fail on the first call, the whole model call on the next: computed in full.
    assert torch.equal(latent, reference)
    assert sum("caching failed on" in r.getMessage() for r in caplog.records) == 2
    assert f"computed {STEPS} of {STEPS} model evaluations" in caplog.text


def test_summary_reaches_the_node_through_the_server(family, monkeypatch):
    name, model, nodes = family
    sent = []

    class FakePromptServer:
        instance = None

        def send_sync(self, event, data, sid=None):
            sent.append((event, data))

    FakePromptServer.instance = FakePromptServer()
    fake_server = type(sys)("server")
    fake_server.PromptServer = FakePromptServer
    monkeypatch.setitem(sys.modules, "server", fake_server)
    sample(rfc(nodes, model, **FORCED), steps=STEPS)
    assert len(sent) == 1
    event, data = sent[0]
    assert event == "rfc-cache.summary" and data["node"] == "7"
    assert f"computed 4 of {STEPS} model evaluations" in data["summary"]


def test_module_input_is_what_the_block_feeds_its_first_linear(family):
    """The adapter's cheap module input must be exactly the modulated,
    normalised stream the block itself computes (captured from inside it)."""
    name, model, nodes = family
    diffusion_model = model.model.diffusion_model
    node_module = nodes.NODE_CLASS_MAPPINGS["RFCCache"].__module__
    adapters = sys.modules[node_module.rsplit(".", 1)[0] + ".adapters"]
    adapter = adapters.detect_adapter(diffusion_model)
    assert adapter.family == name
    captured = {}

    class Capture:
        def __init__(self, key):
            self.key = key

        def __call__(self, args, extra):
            captured[self.key] = (adapter.module_input(diffusion_model, *self.key, args), [])
            block = adapter.block(diffusion_model, *self.key)
            first_linear = block.img_attn.qkv if self.key[0] == "double_block" else block.linear1
            handle = first_linear.register_forward_pre_hook(
                lambda module, inputs: captured[self.key][1].append(inputs[0].clone()))
            try:
                return extra["original_block"](args)
            finally:
                handle.remove()

    patched = model.clone()
    for key in adapter.block_keys(diffusion_model):
        patched.set_model_patch_replace(Capture(key), "dit", *key)
    sample(patched, steps=2)
    assert len(captured) == len(adapter.block_keys(diffusion_model))
    for key, (module_input, inside) in captured.items():
        torch.testing.assert_close(module_input, inside[0], rtol=1e-5, atol=1e-6, msg=str(key))


def test_cond_and_uncond_in_separate_chunks_share_each_decision(family, monkeypatch):
    """With too little free memory ComfyUI runs cond and uncond as separate
    forwards; both must be skipped together and keep their own features."""
    name, model, nodes = family
    diffusion_model = model.model.diffusion_model
    batched, batched_calls = counted_sample(rfc(nodes, model, **FORCED), diffusion_model, steps=STEPS, cfg=3.0)
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    split, split_calls = counted_sample(rfc(nodes, model, **FORCED), diffusion_model, steps=STEPS, cfg=3.0)
    blocks = len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks)
    assert batched_calls == 4 * blocks  # one batched forward per computed evaluation
    assert split_calls == 2 * 4 * blocks  # two forwards, computed on the same 4 evaluations
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)
