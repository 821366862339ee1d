"""What the pack's own code costs per block, counted rather than timed.

A Flux of FLUX.1-dev's width (3072 wide, 24 heads, random weights, bf16) runs
through the pack's `CachedBlock` entries and session, as in the benchmark,
under a TorchDispatchMode that attributes every ATen operation to the code
that issued it: the pack around a block, the block itself, or the model
around both. For each it counts

- kernels: operations that compute (views and other aliasing operations
  launch nothing on a GPU and are not counted);
- traffic: bytes those operations read and write, in R, one block's
  residual (all of its tokens, the full width, in the model's dtype);
- host syncs: operations that bring a value to the CPU (`.item()`, `bool()`).

It prints the counts per skipped block, per computed block (the pack's work
on top of the block's own) and per model evaluation (the decision), next to
the physical limit of a skipped block, and a roofline projection of those
counts onto an H200 at FLUX.1-dev 1024x1024: a model, not a measurement.
Then the same counts at Z-Image's size (a NextDiT whose noise refiners and
layers are cached through object patches of their forward), and the share of
a computed evaluation's block FLOPs that a predicted one still computes.

    python -m benchmarks.overhead            # about 90 seconds on 2 CPU cores
    python -m benchmarks.overhead --time     # on a CUDA GPU: also 50-step runs at FLUX.1-dev size, timed
    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.overhead --host   # host time per skipped and computed block
    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.overhead --weights bf16 fp8_scaled int8_convrot

With --weights, the model is ComfyUI's own Flux, loaded by core's UNETLoader
from a file in each format, written with that ComfyUI's own quantizers
(benchmarks.quantized_files), so the layers are the ones users run:
ComfyUI's mixed-precision ops dequantize or run quantized matmuls. Each
format is counted twice: as the pack runs (the sampled rows of every block's
modulation read once per run through the format's own dequantizer) and with
those rows unreadable, where every block's sampled module input runs its
whole modulation layer (what every quantized format cost before).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .methods import PACK_NAME, load_pack
from .tiny_flux import TinyFlux
from .tiny_nextdit import RMSNorm, TinyNextDiT

# Operations that make the host wait for the device.
SYNC_OPERATIONS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                   torch.ops.aten.equal.default, torch.ops.aten.nonzero.default}

FLUX_DEV = {
    "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
    "mlp_ratio": 4.0, "num_heads": 24, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
    "qkv_bias": True, "guidance_embed": False,
}
FLUX_DEV_BLOCKS = (19, 38)  # double, single
# FLUX.1-dev's layout at a width the CPU runs in seconds: kernels and host
# syncs do not depend on the width, so they are counted on it at full depth.
NARROW_FLUX = {**FLUX_DEV, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 96, "num_heads": 2,
               "axes_dim": [8, 20, 20]}
FLUX_DEV_TOKENS = (4096, 512)  # image tokens at 1024x1024, text tokens

# Z-Image (Turbo and base) as ComfyUI detects it: a NextDiT 3840 wide with 30
# heads and 30 layers after 2 noise and 2 context refiners, Z-Image's
# modulation, caption features of Qwen3-4B.
ZIMAGE = {
    "patch_size": 2, "in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30,
    "n_kv_heads": 30, "multiple_of": 256, "ffn_dim_multiplier": 8.0 / 3.0, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 2560, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
    "z_image_modulation": True, "time_scale": 1000.0,
}
ZIMAGE_TOKENS = (4096, 256)  # image tokens at 1024x1024, caption tokens (a prompt padded to 32)
# Its layout at a width the CPU runs in seconds (Z-Image's modulation needs
# 256 or more; 300 is a multiple of the channel stride at 3840, 15).
NARROW_ZIMAGE = {**ZIMAGE, "dim": 300, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [50, 50, 50], "cap_feat_dim": 32,
                 "multiple_of": 30}

# The roofline: H200 SXM, dense bf16 and HBM3e; launch and sync latencies
# typical of CUDA with eager PyTorch.
H200_FLOPS = 989e12
H200_BYTES_PER_SECOND = 4.8e12
KERNEL_LAUNCH_SECONDS = 4e-6
HOST_SYNC_SECONDS = 20e-6


@dataclass
class Cost:
    kernels: float = 0
    bytes: float = 0
    syncs: float = 0

    def add(self, other: "Cost", scale: float = 1.0) -> "Cost":
        return Cost(self.kernels + scale * other.kernels, self.bytes + scale * other.bytes,
                    self.syncs + scale * other.syncs)


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _tensors(value)
        elif isinstance(value, dict):
            found += _tensors(list(value.values()))
    return found


def _is_alias(operation) -> bool:
    returns = operation._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def traffic(operation, args, kwargs, result) -> int:
    """Bytes an operation reads and writes: its inputs, then its outputs. An
    `out=` tensor is only written, and so is the target of a copy (an
    in-place update reads and writes its target)."""
    inputs = list(args[1:]) if operation is torch.ops.aten.copy_.default else list(args)
    inputs += [value for name, value in kwargs.items() if name != "out"]
    return sum(t.numel() * t.element_size() for t in _tensors(inputs) + _tensors([result]))


class CostCounter(TorchDispatchMode):
    """Counts ATen operations, attributed to the innermost region entered."""

    def __init__(self):
        super().__init__()
        self.regions = ["model"]
        self.costs: dict = defaultdict(Cost)
        # Inside a function counted as the one kernel a GPU runs for it (fused).
        self.fusing = False

    def __torch_dispatch__(self, operation, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = operation(*args, **kwargs)
        if self.fusing:
            return result
        cost = self.costs[self.regions[-1]]
        if operation in SYNC_OPERATIONS:
            cost.syncs += 1
        elif not _is_alias(operation):
            cost.kernels += 1
            cost.bytes += traffic(operation, args, kwargs, result)
        return result


    def __enter__(self):
        # Tensor.tolist reads the data without dispatching an operation;
        # on a GPU it waits for the device like .item() does.
        original = self._tolist = torch.Tensor.tolist
        counter = self

        def counted_tolist(tensor):
            counter.costs[counter.regions[-1]].syncs += 1
            return original(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def count_as_fused(counter: CostCounter, module: torch.nn.Module) -> None:
    """Count `module`'s forward as one kernel that reads its input and
    weights and writes its output. For RMSNorm: torch runs
    `F.rms_norm` as one kernel on CUDA (aten._fused_rms_norm, torch 2.8 and
    later) and as eight elementwise operations and reductions on the CPU,
    where this counter runs."""
    own = module.forward

    def forward(x, *args, **kwargs):
        if counter.fusing:
            return own(x, *args, **kwargs)
        counter.fusing = True
        try:
            output = own(x, *args, **kwargs)
        finally:
            counter.fusing = False
        cost = counter.costs[counter.regions[-1]]
        cost.kernels += 1
        cost.bytes += sum(t.numel() * t.element_size() for t in [x, output, *module.parameters()])
        return output

    module.forward = forward


class Region:
    def __init__(self, counter: CostCounter, name):
        self.counter, self.name = counter, name

    def __enter__(self):
        self.counter.regions.append(self.name)

    def __exit__(self, *exc):
        self.counter.regions.pop()


def random_flux(config: dict, blocks: tuple[int, int], device=None) -> TinyFlux:
    """A Flux of `config`'s widths with `blocks` (double, single), seeded random weights, bf16."""
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = TinyFlux({**config, "depth": blocks[0], "depth_single_blocks": blocks[1]})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model.to(torch.bfloat16)


@contextlib.contextmanager
def strides_at(adapter_module, token_strides: dict, channel_stride: int, width: int):
    """Module inputs sampled with the strides the adapter takes at full size
    (token_strides: tokens here -> the stride at the full token count), so
    their traffic extrapolates and the kernels are the same."""
    if width % channel_stride:
        raise ValueError(f"the width must be a multiple of {channel_stride}, the full-size channel stride")
    original = adapter_module.token_stride, adapter_module.channel_stride
    adapter_module.token_stride = token_strides.__getitem__
    adapter_module.channel_stride = lambda channels: channel_stride
    try:
        yield
    finally:
        adapter_module.token_stride, adapter_module.channel_stride = original


def counted_session(family: str, model, cache_dtype: str = "auto"):
    """A session of forced caching (one warm-up evaluation, then two
    predicted and one computed) on `model`, its adapter and a counter."""
    load_pack()
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    rfc_core = sys.modules[f"{PACK_NAME}.rfc_core"]
    adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for(family)
    cache_config = rfc_core.CacheConfig(threshold=10.0, max_skip=2, cache_dtype=cache_dtype)
    settings = runtime.CacheSettings(cache_config, family, "blocks", adapter, adapter.module_keys(model)[0], None)
    # No schedule: these few steps stand for part of a long run, so a short
    # run's computed last step (rfc_core.run.SHORT_RUN_STEPS) does not apply.
    return runtime.SamplingSession(settings, model, None), adapter, CostCounter()


def count_evaluations(session, counter: CostCounter, evaluation: list, steps: int, model_call, x: torch.Tensor):
    """`steps` evaluations of model_call(x, timestep), each counted in its
    regions, x moved a little by each output; returns which were computed."""
    sigmas = torch.linspace(1, 0, steps + 1)
    with torch.no_grad(), counter:
        for step in range(steps):
            evaluation[0] = step
            timestep = sigmas[step:step + 1]
            # SamplingSession.evaluate, in two parts so each is counted in its region.
            with Region(counter, ("evaluation", step, None)):
                session.start_evaluation(timestep)
            output = model_call(x, timestep)
            with Region(counter, ("evaluation", step, None)):
                recompute = session.prediction_unusable([output])
            if recompute:
                output = model_call(x, timestep)
            x = x - 0.01 * output
    session.finish()
    return [e.computed for e in session.run.evaluations]


def count_run(image_side: int, text_tokens: int, steps: int, blocks: tuple[int, int], config: dict = FLUX_DEV,
              build=random_flux, cache_dtype: str = "auto"):
    """Per (evaluation, block) costs of the pack and the block, and which
    evaluations were computed, for a Flux of `config`'s widths made by
    build(config, blocks)."""
    model = build(config, blocks)
    session, adapter, counter = counted_session("flux", model, cache_dtype)
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    flux_adapter_module = sys.modules[f"{PACK_NAME}.nodes.adapters.flux"]
    evaluation = [0]

    def counted_entry(key):
        entry = runtime.CachedBlock(*key)

        def call(args, extra):
            original = extra["original_block"]

            def block(block_args):
                with Region(counter, ("block", evaluation[0], key)):
                    return original(block_args)

            with Region(counter, ("pack", evaluation[0], key)):
                return entry(args, {"original_block": block})
        return call

    replace = {key: counted_entry(key) for key in adapter.block_keys(model)}
    options = {"patches_replace": {"dit": replace}, runtime.SESSION_KEY: session, "cond_or_uncond": [0]}
    x = torch.randn(1, config["in_channels"], image_side, image_side, dtype=torch.bfloat16)
    context = torch.randn(1, text_tokens, config["context_in_dim"], dtype=torch.bfloat16)
    pooled = torch.randn(1, config["vec_in_dim"], dtype=torch.bfloat16)
    # FLUX.1-dev's strides: every 16th image token in double blocks, every
    # 18th joint token in single blocks, every 12th channel.
    image_tokens = (image_side // 2) ** 2
    dev_strides = {image_tokens: flux_adapter_module.token_stride(FLUX_DEV_TOKENS[0]),
                   image_tokens + text_tokens: flux_adapter_module.token_stride(sum(FLUX_DEV_TOKENS))}
    with strides_at(flux_adapter_module, dev_strides, flux_adapter_module.channel_stride(FLUX_DEV["hidden_size"]),
                    config["hidden_size"]):
        computed = count_evaluations(
            session, counter, evaluation, steps,
            lambda x, t: model(x, t.to(torch.bfloat16), context, pooled, transformer_options=options), x)
    return counter.costs, computed, adapter.block_keys(model)


def random_nextdit(config: dict, layers: int) -> TinyNextDiT:
    """A NextDiT of `config`'s widths with `layers` joint layers, seeded random weights, bf16."""
    torch.manual_seed(0)
    model = TinyNextDiT({**config, "n_layers": layers})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model.to(torch.bfloat16)


def count_nextdit_run(image_side: int, text_tokens: int, steps: int, layers: int, config: dict = ZIMAGE):
    """count_run for a NextDiT (Z-Image's layout): its blocks reached as
    the node reaches them in ComfyUI, through object patches of their
    forward (CachedForward) and the pack's APPLY_MODEL wrapper."""
    model = random_nextdit(config, layers)
    session, adapter, counter = counted_session("lumina2", model)
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    lumina2_adapter_module = sys.modules[f"{PACK_NAME}.nodes.adapters.lumina2"]
    evaluation = [0]

    def counted_forward(key, block):
        own = type(block).forward.__get__(block)

        def run_block(*args, **kwargs):
            with Region(counter, ("block", evaluation[0], key)):
                return own(*args, **kwargs)

        entry = runtime.CachedForward(*key, ("x",), run_block, own, adapter.block_path(model, *key))

        def forward(*args, **kwargs):
            with Region(counter, ("pack", evaluation[0], key)):
                return entry(*args, **kwargs)
        return forward

    for module in model.modules():
        if isinstance(module, RMSNorm):
            count_as_fused(counter, module)
    for key in adapter.block_keys(model):
        block = adapter.block(model, *key)
        block.forward = counted_forward(key, block)
    options = {runtime.SESSION_KEY: session, "cond_or_uncond": [0]}
    x = torch.randn(1, config["in_channels"], image_side, image_side, dtype=torch.bfloat16)
    context = torch.randn(1, text_tokens, config["cap_feat_dim"], dtype=torch.bfloat16)

    def model_call(x, timestep):
        return runtime.apply_model_wrapper(lambda *_: model(x, timestep.to(torch.bfloat16), context, options), x,
                                           timestep, transformer_options=options)

    # Z-Image's strides at 1024x1024: every 16th image token in the noise
    # refiners, every 17th joint token in the layers, every 15th channel.
    image_tokens = (image_side // 2) ** 2
    full_size = {image_tokens: lumina2_adapter_module.token_stride(ZIMAGE_TOKENS[0]),
                 image_tokens + text_tokens: lumina2_adapter_module.token_stride(sum(ZIMAGE_TOKENS))}
    with strides_at(lumina2_adapter_module, full_size, lumina2_adapter_module.channel_stride(ZIMAGE["dim"]),
                    config["dim"]):
        computed = count_evaluations(session, counter, evaluation, steps, model_call, x)
    return counter.costs, computed, adapter.block_keys(model)


def _mean(entries) -> Cost:
    entries = list(entries)
    total = Cost()
    for entry in entries:
        total = total.add(entry)
    return Cost(total.kernels / len(entries), total.bytes / len(entries), total.syncs / len(entries))


def summarise(costs, computed, keys) -> dict[str, Cost]:
    """Mean costs per kind of block and per evaluation from the second full
    computation on, where every order-1 forecast has its two points (the
    evaluations between predict from one point, plain reuse, at about half
    the kernels), bytes as counted."""
    later = keys[1:]  # the first block also takes the evaluation's decision
    evaluations = range([e for e, full in enumerate(computed) if full][1], len(computed))

    def blocks(predicted: bool, kind: str | None = None) -> Cost:
        return _mean(costs[("pack", e, key)] for e in evaluations if computed[e] != predicted
                     for key in later if kind is None or key[0] == kind)

    skipped, full = blocks(True), blocks(False)
    # The decision: what the first block and the start and end of the
    # evaluation cost beyond what any other block in the same state costs.
    decision = _mean(costs[("pack", e, keys[0])].add(costs[("evaluation", e, None)])
                     .add(full if computed[e] else skipped, scale=-1.0) for e in evaluations)
    plain = _mean(costs[("block", e, key)] for e in evaluations if computed[e] for key in later)
    most_syncs = max(sum(cost.syncs for region, cost in costs.items() if isinstance(region, tuple) and region[1] == e)
                     for e in evaluations)
    per_kind = {f"skipped {kind.replace('_', ' ')}": blocks(True, kind) for kind in dict.fromkeys(k for k, _ in later)}
    return {"skipped block": skipped, **per_kind, "computed block (pack's share)": full,
            "evaluation (decision)": decision, "evaluation, most host syncs": Cost(0, 0, most_syncs),
            "plain block (the block's own work)": plain}


def at_size(small: dict[str, Cost], large: dict[str, Cost], tokens: tuple[int, int], target: int,
            width: int) -> dict[str, Cost]:
    """Costs at `target` tokens, bytes in R there (one residual of a block
    over all of them, `width` wide, bf16). Every operation here reads and
    writes a fixed part (weights, modulation vectors) and a part linear in
    the tokens, so two sizes determine the bytes at any size; kernels and
    syncs do not depend on it (checked)."""
    residual_bytes = target * width * 2
    scaled = {}
    for name in small:
        a, b = small[name], large[name]
        if (a.kernels, a.syncs) != (b.kernels, b.syncs):
            raise RuntimeError(f"{name}: the counts change with the token count; extrapolation does not hold")
        per_token = (b.bytes - a.bytes) / (tokens[1] - tokens[0])
        scaled[name] = Cost(a.kernels, (a.bytes + per_token * (target - tokens[0])) / residual_bytes, a.syncs)
    return scaled


def block_flops(tokens: int, width: int, mlp_ratio: float, single: bool) -> float:
    """Matrix-multiply FLOPs of one Flux block over `tokens` tokens."""
    hidden = int(width * mlp_ratio)
    attention = 4 * tokens * tokens * width
    if single:
        return 2 * tokens * width * (3 * width + hidden) + 2 * tokens * (width + hidden) * width + attention
    return 2 * tokens * width * (3 * width + width + 2 * hidden) + attention


def projection(summary: dict[str, Cost], nfc: int, steps: int = 50) -> tuple[float, float]:
    """(projected, ideal) time of a `steps`-step run at `nfc` full
    computations, as a share of the plain run, on the H200 roofline."""
    tokens = sum(FLUX_DEV_TOKENS)
    width = FLUX_DEV["hidden_size"]
    residual_bytes = tokens * width * 2
    double, single = FLUX_DEV_BLOCKS

    def seconds(cost: Cost, flops: float = 0.0) -> float:
        return (max(flops / H200_FLOPS, cost.bytes * residual_bytes / H200_BYTES_PER_SECOND)
                + cost.kernels * KERNEL_LAUNCH_SECONDS + cost.syncs * HOST_SYNC_SECONDS)

    plain = (double * seconds(summary["plain block (the block's own work)"], block_flops(tokens, width, 4.0, False))
             + single * seconds(summary["plain block (the block's own work)"], block_flops(tokens, width, 4.0, True)))
    blocks = double + single
    computed = plain + blocks * seconds(summary["computed block (pack's share)"])
    skipped = blocks * seconds(summary["skipped block"])
    decision = seconds(summary["evaluation (decision)"])
    total = nfc * computed + (steps - nfc) * skipped + steps * decision
    return total / (steps * plain), nfc / steps


def counts_at_flux_dev(steps: int = 8, build=random_flux, narrow_config: dict = NARROW_FLUX,
                       cache_dtype: str = "auto") -> dict[str, Cost]:
    """Kernels and host syncs from a narrow Flux of FLUX.1-dev's depth,
    traffic from two runs at its width (2 + 2 blocks), extrapolated to its
    token count, in R."""
    narrow = summarise(*count_run(16, 8, steps, FLUX_DEV_BLOCKS, narrow_config, build, cache_dtype))
    text_tokens = 32
    wide, token_counts = [], []
    for side in (16, 24):  # latent sides: 64 and 144 image tokens
        wide.append(summarise(*count_run(side, text_tokens, steps, (2, 2), FLUX_DEV, build, cache_dtype)))
        token_counts.append((side // 2) ** 2 + text_tokens)
    traffic = at_size(*wide, tuple(token_counts), sum(FLUX_DEV_TOKENS), FLUX_DEV["hidden_size"])
    return {name: Cost(cost.kernels, traffic[name].bytes, cost.syncs) for name, cost in narrow.items()}


def counts_at_zimage(steps: int = 8) -> dict[str, Cost]:
    """counts_at_flux_dev for Z-Image: kernels and host syncs at its depth on
    a narrow NextDiT, traffic at its width (2 + 2 refiners and 2 layers) at
    two token counts, extrapolated to 1024x1024, in R of a joint layer."""
    narrow = summarise(*count_nextdit_run(16, 8, steps, ZIMAGE["n_layers"], NARROW_ZIMAGE))
    text_tokens = 32
    wide, token_counts = [], []
    for side in (16, 24):  # latent sides: 64 and 144 image tokens
        wide.append(summarise(*count_nextdit_run(side, text_tokens, steps, 2, ZIMAGE)))
        token_counts.append((side // 2) ** 2 + text_tokens)
    traffic = at_size(*wide, tuple(token_counts), sum(ZIMAGE_TOKENS), ZIMAGE["dim"])
    return {name: Cost(cost.kernels, traffic[name].bytes, cost.syncs) for name, cost in narrow.items()}


def nextdit_block_flops(tokens: int, config: dict) -> float:
    """Matrix-multiply FLOPs of one NextDiT block over `tokens` tokens."""
    width = config["dim"]
    hidden = config["multiple_of"] * -(-int(config["ffn_dim_multiplier"] * width) // config["multiple_of"])
    return 2 * tokens * width * 4 * width + 3 * 2 * tokens * width * hidden + 4 * tokens * tokens * width


def zimage_predicted_share(config: dict = ZIMAGE, tokens: tuple[int, int] = ZIMAGE_TOKENS) -> dict[str, float]:
    """What a predicted evaluation still computes, as a share of a computed
    one's block FLOPs: the context refiners (caption only, never cached),
    and before this release also the noise refiners."""
    image, caption = tokens
    refiners = config["n_refiner_layers"]
    parts = {"context refiners": refiners * nextdit_block_flops(caption, config),
             "noise refiners": refiners * nextdit_block_flops(image, config),
             "layers": config["n_layers"] * nextdit_block_flops(image + caption, config)}
    total = sum(parts.values())
    return {"now (context refiners)": parts["context refiners"] / total,
            "before (context and noise refiners)": (parts["context refiners"] + parts["noise refiners"]) / total}


# ComfyUI's detection reads a Flux's heads as its width / 128 and fixes its
# rotary axes at FLUX.1's: the narrow model that ComfyUI loads has heads of 128.
NARROW_COMFY_FLUX = {**FLUX_DEV, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 384, "num_heads": 3}
WEIGHT_FORMATS = ("bf16", "fp8_scaled", "int8_convrot", "gguf_q8_0")
# ComfyUI-GGUF's layers turn their output back into a plain tensor with
# torch.Tensor(...), which fails under the counter's TorchDispatchMode.
NOT_COUNTABLE = {"gguf_q8_0": "ComfyUI-GGUF's tensors do not run under the counting dispatch mode"}


class ComfyFluxInFormat:
    """build() for count_run: random weights in the pack's Flux, written in a
    file format with the host ComfyUI's quantizers and loaded as core's
    UNETLoader loads it into ComfyUI's own Flux (every block linear in the
    format), in bf16."""

    def __init__(self, weights: str, folder: str):
        self.weights = weights
        self.folder = folder

    def __call__(self, config: dict, blocks: tuple[int, int]):
        import comfy.model_management
        import comfy.sd

        from . import quantized_files

        ours = random_flux(config, blocks)
        quantized = [name for name, module in ours.named_modules()
                     if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))]
        state = quantized_files.file_state_dict(ours.state_dict(), self.weights, quantized, set())
        name = quantized_files.write(state, self.folder, f"flux_{self.weights}_{config['hidden_size']}_{sum(blocks)}"
                                                         f".safetensors", self.weights, quantized, "flux")
        tiny = {"image_model": "flux", **config, "depth": blocks[0], "depth_single_blocks": blocks[1]}
        with quantized_files.detection_completed(tiny, fixed=("hidden_size", "context_in_dim", "num_heads")):
            # UNETLoader's own loader, in bf16 as on a GPU (on the CPU ComfyUI
            # would pick float32 for the layers the file keeps unquantized).
            patcher = comfy.sd.load_diffusion_model(os.path.join(self.folder, name), {"dtype": torch.bfloat16})
        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.diffusion_model


@contextlib.contextmanager
def rows_unreadable():
    """Every block's modulation rows unreadable, as every quantized format's
    were before the pack read them through the format (BlockAdapter.sampled_rows)."""
    base = sys.modules[f"{PACK_NAME}.nodes.adapters.base"]
    original = base.weight_rows
    base.weight_rows = lambda layer, rows, like: "counted as before: rows not read"
    try:
        yield
    finally:
        base.weight_rows = original


def rows_per_run(build, steps: int) -> Cost:
    """What making the sampled rows costs once per run at FLUX.1-dev size
    (every block's modulation rows read through its format and stacked), in R."""
    adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for("flux")
    flux_adapter_module = sys.modules[f"{PACK_NAME}.nodes.adapters.flux"]
    model = build(FLUX_DEV, (2, 2))
    vec = torch.randn(1, FLUX_DEV["hidden_size"], dtype=torch.bfloat16)
    stride = flux_adapter_module.channel_stride(FLUX_DEV["hidden_size"])
    counter = CostCounter()
    with torch.no_grad(), counter:
        adapter.sampled_rows(model, vec, stride, chunks=2, gain_from=1, width=FLUX_DEV["hidden_size"])
    adapter.end_run(model)
    cost = counter.costs["model"]
    blocks = sum(FLUX_DEV_BLOCKS) / 4  # counted on 2 + 2 blocks
    residual_bytes = sum(FLUX_DEV_TOKENS) * FLUX_DEV["hidden_size"] * 2
    return Cost(cost.kernels * blocks, cost.bytes * blocks / residual_bytes, cost.syncs)


def print_formats(weights: list[str], steps: int) -> None:
    """Per-format counts, as the pack runs and with the rows unreadable."""
    import tempfile

    from . import quantized_files
    from .host import boot_comfyui

    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("--weights loads ComfyUI's own Flux through its UNETLoader: set COMFYUI_PATH")
    boot_comfyui(comfyui_path)
    load_pack()
    print("### The pack's cost per block by weight format, FLUX.1-dev size, ComfyUI's own Flux and ops")
    print()
    print("| weights | module inputs | skipped block: kernels | R | syncs | computed block (pack's share): "
          "kernels | R | evaluation (decision): kernels | R | syncs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    per_run = {}
    with tempfile.TemporaryDirectory() as folder:
        for file_format in weights:
            reason = NOT_COUNTABLE.get(file_format) or quantized_files.unavailable(file_format)
            if reason:
                print(f"| {file_format} | not counted: {reason} | | | | | | | | |")
                continue
            build = ComfyFluxInFormat(file_format, folder)
            for label, patch in (("rows read through the format", contextlib.nullcontext),
                                 ("through the modulation layer (before)", rows_unreadable)):
                with patch():
                    summary = counts_at_flux_dev(steps, build, NARROW_COMFY_FLUX)
                skipped = summary["skipped block"]
                computed = summary["computed block (pack's share)"]
                decision = summary["evaluation (decision)"]
                print(f"| {file_format} | {label} | {skipped.kernels:.3g} | {skipped.bytes:.1f} | {skipped.syncs:.3g} "
                      f"| {computed.kernels:.3g} | {computed.bytes:.1f} | {decision.kernels:.3g} "
                      f"| {decision.bytes:.1f} | {decision.syncs:.3g} |")
            per_run[file_format] = rows_per_run(build, steps)
    print()
    print("Made once per run, before the first model call's rows: every block's sampled modulation rows, read "
          "through the format (dequantized) and stacked.")
    print()
    print("| weights | kernels | traffic (R) | host syncs |")
    print("|---|---|---|---|")
    for file_format, cost in per_run.items():
        print(f"| {file_format} | {cost.kernels:.0f} | {cost.bytes:.1f} | {cost.syncs:.0f} |")


class Timer:
    """Wall time of a stretch of work on `device`: CUDA events on a GPU
    (no sync inside the timed work), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.started


def timed_runs(device: torch.device, config: dict, blocks: tuple[int, int], tokens: tuple[int, int],
               steps: int = 50) -> list[tuple[str, float, int]]:
    """(run, seconds, full computations) for a plain `steps`-step run and RFC
    at NFC 10 and 14, per block and whole model, side by side on one model
    (random weights, bf16): what `--time` prints."""
    load_pack()
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    rfc = sys.modules[f"{PACK_NAME}.rfc_core"]
    adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for("flux")
    model = random_flux(config, blocks, device)
    side = 2 * int(tokens[0] ** 0.5)
    x0 = torch.randn(1, config["in_channels"], side, side, dtype=torch.bfloat16, device=device)
    context = torch.randn(1, tokens[1], config["context_in_dim"], dtype=torch.bfloat16, device=device)
    pooled = torch.randn(1, config["vec_in_dim"], dtype=torch.bfloat16, device=device)
    sigmas = torch.linspace(1, 0, steps + 1, device=device)

    def sample(granularity: str | None, nfc: int) -> tuple[float, int]:
        options = {"cond_or_uncond": [0]}
        session = None
        if granularity is not None:
            # The speedup target spends exactly `nfc` full computations.
            config_ = rfc.CacheConfig(target_speedup=steps / nfc, max_skip=8)
            first = ("double_block", 0) if granularity == "blocks" else runtime.MODEL_MODULE
            settings = runtime.CacheSettings(config_, "flux", granularity, adapter if granularity == "blocks" else None,
                                             first, None)
            session = runtime.SamplingSession(settings, model, None, sigmas.tolist())
            options[runtime.SESSION_KEY] = session
            if granularity == "blocks":
                options["patches_replace"] = {"dit": {key: runtime.CachedBlock(*key)
                                                      for key in adapter.block_keys(model)}}
        x = x0.clone()
        with torch.no_grad(), Timer(device) as timer:
            for step in range(steps):
                timestep = sigmas[step:step + 1]

                def call(latent):
                    return model(latent, timestep.to(torch.bfloat16), context, pooled, options)

                if session is None:
                    output = call(x)
                elif granularity == "model":
                    output = session.evaluate(timestep, lambda: session.run_model(lambda: call(x), x, options))
                else:
                    output = session.evaluate(timestep, lambda: call(x))
                x = x - (sigmas[step] - sigmas[step + 1]) * output
        if session is None:
            return timer.seconds, steps
        session.finish()
        return timer.seconds, session.run.computed_evaluations

    sample(None, steps)  # warm-ups: allocator, kernels, the pack's first run
    sample("blocks", 10)
    runs = [("plain", *sample(None, steps))]
    for nfc in (10, 14):
        runs.append((f"RFC blocks, NFC {nfc}", *sample("blocks", nfc)))
        runs.append((f"RFC whole model, NFC {nfc}", *sample("model", nfc)))
    return runs


def print_timings(device: torch.device) -> None:
    if device.type == "cuda":
        config, blocks, tokens, size = FLUX_DEV, FLUX_DEV_BLOCKS, FLUX_DEV_TOKENS, "FLUX.1-dev 1024x1024"
    else:  # a smoke run of the same code: nothing to read into its times
        config, blocks, tokens, size = NARROW_FLUX, (2, 2), (64, 8), "a narrow model on the CPU"
    runs = timed_runs(device, config, blocks, tokens)
    plain = runs[0][1]
    print(f"### Measured on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {size}, "
          f"50 steps, random weights, bf16")
    print()
    print("| run | full computations | time | vs plain | ideal |")
    print("|---|---|---|---|---|")
    for name, seconds, computed in runs:
        print(f"| {name} | {computed} | {seconds:.2f} s | {seconds / plain:.2f} | {computed / 50:.2f} |")


# --host: host time, not counts. 50 Euler steps at target_speedup 5 (10 of 50
# evaluations computed), plain sampling and RFC Cache side by side in one
# process, at FLUX.1-dev's depth and Z-Image's on narrow models, so every
# kernel costs about what a GPU launch does and the Python around them shows.
HOST_STEPS = 50
HOST_SPEEDUP = 5.0
HOST_REPEATS = 3
HOST_IMAGE_SIDE = 8  # latent side: 16 image tokens
HOST_TEXT_TOKENS = 8
# ComfyUI's Flux at FLUX.1-dev's depth and NARROW_FLUX's width, in float32 as ComfyUI runs on the CPU.
HOST_COMFY_FLUX = dict(NARROW_FLUX)


@contextlib.contextmanager
def host_strides(adapter_module, image_tokens: int, full_tokens: tuple[int, int], width: int, full_width: int):
    """The adapter's sampling strides at full size (strides_at): a stream of
    up to `image_tokens` tokens is sampled as the full size's image stream,
    a longer one as its joint stream, channels as at `full_width`; so the
    skipped block runs the path it runs at full size (the stacked modulation
    rows, a sample of the tokens), not the narrow model's stride-1 path."""
    image_stride = adapter_module.token_stride(full_tokens[0])
    joint_stride = adapter_module.token_stride(sum(full_tokens))
    strides = _StrideTable(image_tokens, image_stride, joint_stride)
    with strides_at(adapter_module, strides, adapter_module.channel_stride(full_width), width):
        yield


class _StrideTable(dict):
    def __init__(self, image_tokens: int, image_stride: int, joint_stride: int):
        super().__init__()
        self.image_tokens, self.image_stride, self.joint_stride = image_tokens, image_stride, joint_stride

    def __getitem__(self, tokens: int) -> int:
        return self.image_stride if tokens <= self.image_tokens else self.joint_stride


class HostClock:
    """Host seconds per model evaluation and inside its blocks: the pack's
    block entries (CachedBlock, CachedForward) on RFC runs, the blocks' own
    forwards on plain ones."""

    def __init__(self):
        self.rows: list[tuple[str, float, float, int]] = []  # (kind, seconds, in blocks, blocks)
        self.inside = 0.0
        self.calls = 0
        self.computed: bool | None = None

    def evaluation(self, call):
        self.inside, self.calls, self.computed = 0.0, 0, None
        start = time.perf_counter()
        output = call()
        seconds = time.perf_counter() - start
        kind = "plain" if self.computed is None else "computed" if self.computed else "predicted"
        self.rows.append((kind, seconds, self.inside, self.calls))
        return output

    def timed(self, function):
        clock = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                clock.inside += time.perf_counter() - start
                clock.calls += 1
        return timed

    @contextlib.contextmanager
    def on_pack(self, runtime):
        """Times the pack's block entries and notes each evaluation's kind."""
        clock = self
        originals = [(runtime.CachedBlock, "__call__", runtime.CachedBlock.__call__),
                     (runtime.CachedForward, "__call__", runtime.CachedForward.__call__),
                     (runtime.SamplingSession, "evaluate", runtime.SamplingSession.evaluate)]
        evaluate = runtime.SamplingSession.evaluate

        def noted(session, *args, **kwargs):
            output = evaluate(session, *args, **kwargs)
            clock.computed = session.run.current.computed
            return output

        runtime.CachedBlock.__call__ = self.timed(runtime.CachedBlock.__call__)
        runtime.CachedForward.__call__ = self.timed(runtime.CachedForward.__call__)
        runtime.SamplingSession.evaluate = noted
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    @contextlib.contextmanager
    def on_blocks(self, blocks):
        """Times the blocks' own forwards (plain runs)."""
        clock, started = self, []

        def before(module, args):
            started.append(time.perf_counter())

        def after(module, args, output):
            clock.inside += time.perf_counter() - started.pop()
            clock.calls += 1

        handles = [h for block in blocks for h in (block.register_forward_pre_hook(before),
                                                   block.register_forward_hook(after))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def summary(self) -> dict[str, float]:
        """Medians: seconds per evaluation of each kind, seconds per block."""
        import statistics

        out = {}
        for kind in ("plain", "computed", "predicted"):
            rows = [row for row in self.rows if row[0] == kind]
            if rows:
                out[f"{kind} evaluation"] = statistics.median(row[1] for row in rows)
                out[f"{kind} block"] = statistics.median(row[2] / row[3] for row in rows if row[3])
        return out


def host_table_row(label: str, runs: list[dict]) -> str:
    import statistics

    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    share = median["predicted evaluation"] / median["computed evaluation"]
    us = 1e6
    return (f"| {label} | {median['plain evaluation'] * 1e3:.1f} | {median['computed evaluation'] * 1e3:.1f} "
            f"| {median['predicted evaluation'] * 1e3:.1f} | {median['plain block'] * us:.0f} "
            f"| {median['computed block'] * us:.0f} | {median['skipped block'] * us:.0f} "
            f"| {median['skipped block'] / median['computed block']:.2f} | **{share:.2f}** "
            f"| {median['predicted evaluation'] / median['plain evaluation']:.2f} |")


def _host_repeats(plain, cached, repeats: int) -> list[dict]:
    """Medians of each run pair (plain then RFC, one warm-up pair first)."""
    plain(HostClock())
    cached(HostClock())
    runs = []
    for _ in range(repeats):
        plain_clock, cached_clock = HostClock(), HostClock()
        plain(plain_clock)
        cached(cached_clock)
        summary = {**plain_clock.summary(), **cached_clock.summary()}
        summary["skipped block"] = summary.pop("predicted block")
        runs.append(summary)
    return runs


def host_session(family: str, adapter, model, sigmas: torch.Tensor):
    """The pack's session of a host-time run on its own model: the node's
    RFC at target_speedup HOST_SPEEDUP over the run's sigmas."""
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    config = sys.modules[f"{PACK_NAME}.rfc_core"].CacheConfig(target_speedup=HOST_SPEEDUP, max_skip=8)
    settings = runtime.CacheSettings(config, family, "blocks", adapter, adapter.block_keys(model)[0], None)
    return runtime.SamplingSession(settings, model, None, sigmas.tolist())


def host_pack_flux(repeats: int) -> list[dict]:
    """The pack's own Flux at FLUX.1-dev depth (NARROW_FLUX) in float32 (bf16
    kernels are slow on a CPU), through its
    CachedBlock entries and session, as `timed_runs` drives it."""
    load_pack()
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for("flux")
    flux_module = sys.modules[f"{PACK_NAME}.nodes.adapters.flux"]
    model = random_flux(NARROW_FLUX, FLUX_DEV_BLOCKS).float()
    torch.manual_seed(1)
    x0 = torch.randn(1, NARROW_FLUX["in_channels"], HOST_IMAGE_SIDE, HOST_IMAGE_SIDE)
    context = torch.randn(1, HOST_TEXT_TOKENS, NARROW_FLUX["context_in_dim"])
    pooled = torch.randn(1, NARROW_FLUX["vec_in_dim"])
    sigmas = torch.linspace(1, 0, HOST_STEPS + 1)
    blocks = [adapter.block(model, *key) for key in adapter.block_keys(model)]

    def sample(clock: HostClock, cached: bool) -> None:
        options = {"cond_or_uncond": [0]}
        session = None
        if cached:
            session = host_session("flux", adapter, model, sigmas)
            options[runtime.SESSION_KEY] = session
            options["patches_replace"] = {"dit": {key: runtime.CachedBlock(*key) for key in adapter.block_keys(model)}}
        x = x0.clone()
        with torch.no_grad(), (clock.on_pack(runtime) if cached else clock.on_blocks(blocks)), \
                host_strides(flux_module, HOST_IMAGE_SIDE ** 2 // 4, FLUX_DEV_TOKENS, NARROW_FLUX["hidden_size"],
                             FLUX_DEV["hidden_size"]):
            for step in range(HOST_STEPS):
                timestep = sigmas[step:step + 1]

                def call():
                    return model(x, timestep, context, pooled, options)

                output = clock.evaluation(call if session is None else lambda: session.evaluate(timestep, call))
                x = x - (sigmas[step] - sigmas[step + 1]) * output
        if session is not None:
            session.finish()

    return _host_repeats(lambda clock: sample(clock, False), lambda clock: sample(clock, True), repeats)


def host_pack_nextdit(repeats: int) -> list[dict]:
    """The pack's own NextDiT at Z-Image's depth (NARROW_ZIMAGE: 2 noise
    refiners and 30 layers cached), through object patches of the blocks'
    forward (CachedForward) and the pack's APPLY_MODEL wrapper; float32."""
    load_pack()
    runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
    adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for("lumina2")
    lumina2_module = sys.modules[f"{PACK_NAME}.nodes.adapters.lumina2"]
    model = random_nextdit(NARROW_ZIMAGE, ZIMAGE["n_layers"]).float()
    torch.manual_seed(1)
    x0 = torch.randn(1, NARROW_ZIMAGE["in_channels"], HOST_IMAGE_SIDE, HOST_IMAGE_SIDE)
    context = torch.randn(1, HOST_TEXT_TOKENS, NARROW_ZIMAGE["cap_feat_dim"])
    sigmas = torch.linspace(1, 0, HOST_STEPS + 1)
    keys = adapter.block_keys(model)
    blocks = [adapter.block(model, *key) for key in keys]

    def sample(clock: HostClock, cached: bool) -> None:
        options = {"cond_or_uncond": [0]}
        session = None
        if cached:
            session = host_session("lumina2", adapter, model, sigmas)
            options[runtime.SESSION_KEY] = session
            for key, block in zip(keys, blocks):
                own = type(block).forward.__get__(block)
                block.forward = runtime.CachedForward(*key, ("x",), own, own, adapter.block_path(model, *key))
        x = x0.clone()
        try:
            with torch.no_grad(), (clock.on_pack(runtime) if cached else clock.on_blocks(blocks)), \
                    host_strides(lumina2_module, HOST_IMAGE_SIDE ** 2 // 4, ZIMAGE_TOKENS, NARROW_ZIMAGE["dim"],
                                 ZIMAGE["dim"]):
                for step in range(HOST_STEPS):
                    timestep = sigmas[step:step + 1]

                    def call():
                        return runtime.apply_model_wrapper(
                            lambda *_: model(x, timestep, context, options), x, timestep,
                            transformer_options=options)

                    output = clock.evaluation(call if session is None else lambda: session.evaluate(timestep, call))
                    x = x - (sigmas[step] - sigmas[step + 1]) * output
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)
        if session is not None:
            session.finish()

    return _host_repeats(lambda clock: sample(clock, False), lambda clock: sample(clock, True), repeats)


def _comfy_random(model, seed: int = 0):
    import comfy.model_management
    import comfy.model_patcher

    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():
            parameter.normal_(0, 0.02)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def host_comfy(family: str, repeats: int) -> list[dict]:
    """ComfyUI's own Flux (FLUX.1-dev depth) or NextDiT (Z-Image depth) at
    the narrow widths, random weights, sampled by comfy.sample.sample (euler,
    simple, cfg 1) plain and through the RFC Cache node (target_speedup 5).
    An evaluation is timed around comfy.samplers.calc_cond_batch, which the
    pack's evaluation wrapper runs inside."""
    from .host import boot_comfyui, comfy_lumina2_model, complete_params

    nodes = boot_comfyui(os.environ["COMFYUI_PATH"])
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    node_module = nodes.NODE_CLASS_MAPPINGS["RFCCache"].__module__
    pack = node_module.rsplit(".", 2)[0]
    runtime = sys.modules[f"{pack}.nodes.runtime"]
    adapters = sys.modules[f"{pack}.nodes.adapters"]
    torch.manual_seed(2)
    if family == "flux":
        unet_config = complete_params({"image_model": "flux", **HOST_COMFY_FLUX, "depth": FLUX_DEV_BLOCKS[0],
                                       "depth_single_blocks": FLUX_DEV_BLOCKS[1]})
        model_config = comfy.supported_models.Flux(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        patcher = _comfy_random(model_config.get_model({}))
        context = torch.randn(1, HOST_TEXT_TOKENS, HOST_COMFY_FLUX["context_in_dim"])
        pooled = torch.randn(1, HOST_COMFY_FLUX["vec_in_dim"])
        positive = [[context, {"pooled_output": pooled}]]
    else:
        config = {**NARROW_ZIMAGE, "n_layers": ZIMAGE["n_layers"]}
        ours = random_nextdit(config, ZIMAGE["n_layers"])
        model = comfy_lumina2_model(config, {k: v.float() for k, v in ours.state_dict().items()})
        if model is None:
            raise SystemExit("this ComfyUI's NextDiT cannot build Z-Image's layout")
        patcher = _comfy_random(model)
        context = torch.randn(1, HOST_TEXT_TOKENS, config["cap_feat_dim"])
        positive = [[context, {"attention_mask": torch.ones(1, HOST_TEXT_TOKENS, dtype=torch.long)}]]
    diffusion_model = patcher.model.diffusion_model
    adapter = adapters.detect_adapter(diffusion_model)
    adapter_module = sys.modules[type(adapter).__module__]
    width, full_width, full_tokens = ((HOST_COMFY_FLUX["hidden_size"], FLUX_DEV["hidden_size"], FLUX_DEV_TOKENS)
                                      if family == "flux" else (NARROW_ZIMAGE["dim"], ZIMAGE["dim"], ZIMAGE_TOKENS))
    blocks = [adapter.block(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)]
    noise = torch.randn(1, 16, HOST_IMAGE_SIDE, HOST_IMAGE_SIDE, generator=torch.Generator().manual_seed(0))
    cached_patcher = nodes.NODE_CLASS_MAPPINGS["RFCCacheAdvanced"]().apply(
        patcher, unique_id="7", target_speedup=HOST_SPEEDUP, max_skip=8)[0]

    def sample(clock: HostClock, cached: bool) -> None:
        calc_cond_batch = comfy.samplers.calc_cond_batch
        comfy.samplers.calc_cond_batch = lambda *a, **k: clock.evaluation(lambda: calc_cond_batch(*a, **k))
        try:
            with torch.no_grad(), (clock.on_pack(runtime) if cached else clock.on_blocks(blocks)), \
                    host_strides(adapter_module, HOST_IMAGE_SIDE ** 2 // 4, full_tokens, width, full_width):
                comfy.sample.sample(cached_patcher if cached else patcher, noise, HOST_STEPS, 1.0, "euler", "simple",
                                    positive, positive, torch.zeros_like(noise), seed=0, disable_pbar=True)
        finally:
            comfy.samplers.calc_cond_batch = calc_cond_batch

    return _host_repeats(lambda clock: sample(clock, False), lambda clock: sample(clock, True), repeats)


def print_host(repeats: int) -> None:
    """--host: the table of host times, pack model and (with COMFYUI_PATH) ComfyUI."""
    import logging

    # One thread: the host path is single-threaded, and on shared cores
    # intra-op threads of kernels this small only wait for each other.
    torch.set_num_threads(1)
    print(f"### Host time per evaluation and per block, {HOST_STEPS} Euler steps, target_speedup "
          f"{HOST_SPEEDUP:g} ({int(HOST_STEPS / HOST_SPEEDUP)} of {HOST_STEPS} computed), "
          f"{HOST_IMAGE_SIDE ** 2 // 4} image tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print(f"Medians over each run's evaluations of a kind, then the median of {repeats} plain/RFC run pairs in "
          f"one process (a warm-up pair first). Blocks: the pack's block entry (RFC runs; a computed block "
          f"includes the block) or the block's own forward (plain runs). Share: a predicted evaluation's host time "
          f"over a computed one's, and over a plain one's. Sampled module inputs take FLUX.1-dev's and Z-Image's "
          f"full-size strides (host_strides), as at full size.")
    print()
    print("| model | plain eval (ms) | computed eval (ms) | predicted eval (ms) | plain block (us) "
          "| computed block (us) | skipped block (us) | skipped / computed block | predicted / computed eval "
          "| predicted / plain eval |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [("pack's Flux, FLUX.1-dev depth (19 + 38, 96 wide, fp32)", lambda: host_pack_flux(repeats)),
            ("pack's NextDiT, Z-Image depth (2 + 30, 300 wide, fp32)", lambda: host_pack_nextdit(repeats))]
    if os.environ.get("COMFYUI_PATH"):
        rows += [("ComfyUI's Flux + sampler + node, FLUX.1-dev depth (96 wide, fp32)",
                  lambda: host_comfy("flux", repeats)),
                 ("ComfyUI's NextDiT + sampler + node, Z-Image depth (300 wide, fp32)",
                  lambda: host_comfy("lumina2", repeats))]
    for label, measure in rows:
        print(host_table_row(label, measure()), flush=True)
        logging.getLogger("ComfyUI-RFC").setLevel(logging.WARNING)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--time", action="store_true",
                        help="also time 50-step runs (at FLUX.1-dev size on a CUDA GPU)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHT_FORMATS,
                        help="count ComfyUI's own Flux loaded from files in these formats (needs COMFYUI_PATH)")
    parser.add_argument("--host", action="store_true",
                        help="host time per skipped and computed block, plain and RFC side by side "
                             "(also through ComfyUI with COMFYUI_PATH)")
    parser.add_argument("--cache-dtype", default="auto", choices=["auto", "int8"],
                        help="the counts with residual slots in this storage (rfc_core.storage)")
    parser.add_argument("--repeats", type=int, default=HOST_REPEATS, help="--host: plain/RFC run pairs")
    args = parser.parse_args(argv)
    if args.host:
        print_host(args.repeats)
        return
    if args.weights:
        print_formats(args.weights, args.steps)
        return
    if args.time:
        print_timings(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        print()
    summary = counts_at_flux_dev(args.steps, cache_dtype=args.cache_dtype)
    residual_mib = sum(FLUX_DEV_TOKENS) * FLUX_DEV["hidden_size"] * 2 / 2**20
    print(f"### The pack's own cost at FLUX.1-dev size (3072 wide, bf16, residual slots {args.cache_dtype}, {sum(FLUX_DEV_TOKENS)} tokens; "
          f"R = one block's residual = {residual_mib:.0f} MiB)")
    print()
    print(f"Kernels and host syncs counted on FLUX.1-dev's 19 + 38 blocks at width 64 (they do not depend on "
          f"the width or the token count); traffic counted at its width on 2 + 2 blocks at 96 and 176 tokens "
          f"and extrapolated to {sum(FLUX_DEV_TOKENS)} (it is affine in the token count). Means over the "
          f"evaluations from the second full computation on (every forecast has its two points; before it, "
          f"a prediction from one point is plain reuse at about half the kernels) and over every block but the "
          f"first, which also takes the decision.")
    print()
    print_cost_table(summary)
    print("| skipped block, physical limit | 1 per stream | about 4 | 0 |")
    print()
    print("### Roofline projection onto an H200, FLUX.1-dev 1024x1024, 50 steps (a model of the counts above, "
          "not a measurement)")
    print()
    print("| NFC | projected time vs plain run | ideal |")
    print("|---|---|---|")
    for nfc in (10, 14):
        projected, ideal = projection(summary, nfc)
        print(f"| {nfc} | {projected:.2f} | {ideal:.2f} |")
    print()
    print_zimage(args.steps)


def print_cost_table(summary: dict[str, Cost]) -> None:
    """The counts of counts_at_flux_dev or counts_at_zimage, one row each."""
    print("| per | kernels | traffic (R) | host syncs |")
    print("|---|---|---|---|")
    for name, cost in summary.items():
        if name == "evaluation, most host syncs":
            print(f"| {name} | | | {cost.syncs:.0f} |")
        else:
            print(f"| {name} | {cost.kernels:.3g} | {cost.bytes:.1f} | {cost.syncs:.3g} |")


def print_zimage(steps: int) -> None:
    summary = counts_at_zimage(steps)
    tokens = sum(ZIMAGE_TOKENS)
    residual_mib = tokens * ZIMAGE["dim"] * 2 / 2**20
    print(f"### The same at Z-Image size (NextDiT 3840 wide, 2 noise refiners and 30 layers cached, bf16, "
          f"{ZIMAGE_TOKENS[0]} image and {ZIMAGE_TOKENS[1]} caption tokens; R = one layer's residual = "
          f"{residual_mib:.0f} MiB, a noise refiner's is {ZIMAGE_TOKENS[0] / tokens:.2f} R)")
    print()
    print("Kernels and host syncs counted on Z-Image's 2 + 30 blocks at width 300; traffic at its width on "
          "2 noise refiners and 2 layers at 96 and 176 tokens, extrapolated. The first noise refiner takes "
          "each evaluation's decision.")
    print()
    print_cost_table(summary)
    print()
    print("What a predicted evaluation still computes, as a share of a computed one's block FLOPs:")
    print()
    print("| blocks computed on a predicted evaluation | share |")
    print("|---|---|")
    for name, share in zimage_predicted_share().items():
        print(f"| {name} | {share:.4f} |")


if __name__ == "__main__":
    main()
