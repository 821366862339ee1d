"""HiDream: object-patched double and single blocks.

Each double block gets its own text: the running text with a different llama
layer appended, cut back to the running part after the block. The family
test checks what makes caching the text residual per block sound: a block's
appended part is the same at every step, and a predicted block's text is the
text it was given on that step plus the residual of its own last
computation."""

from __future__ import annotations

from collections import defaultdict

import torch

from family_harness import FORCED, FamilyContract, FamilySpec, rfc, sample_spec

T5_TOKENS, LLAMA_TOKENS = 6, 4

# Three llama layers: one per block, so each double block gets another.
HIDREAM_CONFIG = {
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [32, 32],
    "text_emb_dim": 16, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8],
    "max_resolution": [32, 32], "llama_layers": [0, 1, 2],
}


def hidream_conditioning(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    t5 = torch.randn(batch, T5_TOKENS, 32, generator=generator)
    llama = torch.randn(batch, len(HIDREAM_CONFIG["llama_layers"]), LLAMA_TOKENS, 32, generator=generator)
    return [[t5, {"pooled_output": torch.randn(batch, 16, generator=generator), "conditioning_llama3": llama}]]


def inner_blocks(diffusion_model):
    """The wrapped transformer blocks: each runs only when its wrapper computes."""
    return [block.block for block in (*diffusion_model.double_stream_blocks, *diffusion_model.single_stream_blocks)]


SPEC = FamilySpec(
    name="hidream",
    config_class="HiDream",
    unet_config=HIDREAM_CONFIG,
    latent_shape=(16, 16, 16),
    conditioning=hidream_conditioning,
    counted_modules=inner_blocks,
    probe=lambda block, kind: block.block.attn1,
)


class TestHiDream(FamilyContract):
    spec = SPEC

    def test_double_block_text_is_its_own_input_plus_its_own_residual(self, model, nodes):
        """With plain reuse (order 0) a predicted block returns exactly its
        input plus the residual of its last computation, per stream."""
        patched = rfc(nodes, model, **{**FORCED, "order": 0, "estimator": "reuse"})
        diffusion_model = model.model.diffusion_model
        running_tokens = T5_TOKENS + LLAMA_TOKENS
        calls = defaultdict(list)
        handles = []
        for index, block in enumerate(diffusion_model.double_stream_blocks):
            computed = []
            handles.append(block.block.register_forward_hook(lambda *_, computed=computed: computed.append(True)))

            def record(module, args, kwargs, output, index=index, computed=computed):
                calls[index].append({
                    "computed": bool(computed), "text_in": kwargs["text_tokens"].clone(),
                    "image_in": kwargs["image_tokens"].clone(),
                    "image_out": output[0].clone(), "text_out": output[1].clone()})
                computed.clear()

            handles.append(block.register_forward_hook(record, with_kwargs=True))
        try:
            latent = sample_spec(SPEC, patched, steps=8, cfg=1.0, batch=2)
        finally:
            for handle in handles:
                handle.remove()

        assert torch.isfinite(latent).all()
        appended = [calls[index][0]["text_in"][:, running_tokens:] for index in calls]
        assert not torch.equal(appended[0], appended[1])
        for index, block_calls in calls.items():
            assert len(block_calls) == 8
            assert block_calls[0]["computed"] and not all(call["computed"] for call in block_calls)
            for call in block_calls:
                assert torch.equal(call["text_in"][:, running_tokens:], appended[index])
            last_computed = None
            for step, call in enumerate(block_calls):
                if call["computed"]:
                    last_computed = call
                    continue
                for stream in ("text", "image"):
                    residual = last_computed[f"{stream}_out"] - last_computed[f"{stream}_in"]
                    torch.testing.assert_close(call[f"{stream}_out"], call[f"{stream}_in"] + residual,
                                               rtol=1e-5, atol=1e-5, msg=f"block {index} step {step} {stream}")
