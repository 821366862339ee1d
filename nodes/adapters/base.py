"""What a model family adapter tells the cache: where the blocks are, how the
pack hooks them, which of a block's arguments are the hidden states it
updates, and how to get the block's cheap module input."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Hashable

import torch

logger = logging.getLogger("ComfyUI-RFC")

# The block is reached through ComfyUI's `patches_replace["dit"][(kind, index)]`.
REPLACE = "replace"
# The family has no block patch point: the block's `forward` is replaced by a
# ModelPatcher object patch, which ComfyUI undoes when the model is unpatched.
FORWARD = "forward"


@dataclass(frozen=True)
class BlockGroup:
    """One run of same-kind blocks in a diffusion model.

    kind: the `patches_replace` block kind ("double_block", "single_block")
        for REPLACE hooks; a name for the group otherwise.
    attribute: the diffusion model attribute holding the blocks, a ModuleList
        or a ModuleDict (iterated in its order).
    streams: names of the block arguments that are the hidden states it
        updates. For REPLACE they are keys of the patch's args and of the
        dict it returns; for FORWARD, parameter names of the block's forward.
    hook: REPLACE or FORWARD.
    outputs: FORWARD only: what the block's forward returns, as stream names
        in order; one name means it returns a single tensor. Default: streams.
    batch_dim: where the batch is in each stream (Cosmos 1 keeps it at 3).
    separate_streams: cache each stream as a module of its own, with its
        own module input (LTX-2's video and audio: two modalities whose
        changes differ in size and timing). Default: one module per block.
    """

    kind: str
    attribute: str
    streams: tuple[str, ...]
    hook: str = REPLACE
    outputs: tuple[str, ...] | None = None
    batch_dim: int = 0
    separate_streams: bool = False

    @property
    def returned(self) -> tuple[str, ...]:
        return self.outputs if self.outputs is not None else self.streams


def batch_first(t: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return t if batch_dim == 0 else t.movedim(batch_dim, 0)


def pack(tensors: list[torch.Tensor], batch_dim: int = 0) -> torch.Tensor:
    """Flatten each tensor per sample and join them, shape (batch, features):
    the module input of a whole model call whose latent has several tensors.
    Always a new tensor."""
    flat = [batch_first(t, batch_dim).reshape(t.shape[batch_dim], -1) for t in tensors]
    return torch.cat(flat, dim=1)


# The module input of a block other than the first is only normed (RFE's
# input change), so adapters that can build it on a regular sample of the
# tokens and channels do (BlockAdapter.sampled_module_input): at most about
# this many of each. A FLUX.1-dev
# block at 1024x1024 (4608 tokens, 3072 wide) is sampled every 18th token
# and 12th channel, 1/216 of the block input.
MODULE_INPUT_TOKENS = 256
MODULE_INPUT_CHANNELS = 256


def token_stride(tokens: int) -> int:
    return max(1, tokens // MODULE_INPUT_TOKENS)


def channel_stride(channels: int) -> int:
    """The largest stride at or below channels / MODULE_INPUT_CHANNELS that
    divides the width, so strided rows of a modulation matrix stay one view."""
    stride = max(1, channels // MODULE_INPUT_CHANNELS)
    while channels % stride:
        stride -= 1
    return stride


def sampled_tail(tokens: int, tail: int, stride: int) -> int:
    """How many of the last `tail` tokens a `[::stride]` sample of `tokens` keeps."""
    return -(-tokens // stride) - -(-(tokens - tail) // stride)


def sample_of(full: torch.Tensor, tokens_step: int, channels_step: int) -> torch.Tensor:
    """A (batch, tokens, channels) module input's sample, for the rarer
    cases an adapter builds in full (other families' sampled inputs are
    built on the sample itself)."""
    return full[:, ::tokens_step][..., ::channels_step]


def weight_rows(layer, rows: slice, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """Rows of a linear layer's weight and bias as the layer itself computes
    with them, as plain tensors in the input's dtype and device; or, where
    they cannot be had that way, the reason. Made once per run, so a
    quantized weight is dequantized once here instead of the layer running
    its whole matmul on every model call.

    - plain weights (ComfyUI's cast and offloaded layers, and layers kept in
      full precision inside a quantized file): the rows, cast;
    - a layer with ComfyUI's `convert_weight` (the hook its LoRA patching
      uses to turn a stored weight into a float one): legacy scaled fp8
      multiplies by its scale, `comfy_quant` layouts (fp8, int8 tensorwise
      with or without convrot, ...) dequantize through their own code;
    - ComfyUI-GGUF's layers: their own `get_weight`, which dequantizes the
      GGML blocks and applies the patches that pack keeps on the tensor."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return "it has no weight tensor"
    if getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None):
        return "a LoRA or hook is applied to it on the fly"
    if weight.device.type == "meta":
        return "its weight is not loaded (meta device)"
    if hasattr(weight, "tensor_type") and callable(getattr(layer, "get_weight", None)):
        dense = layer.get_weight(weight.to(like.device), like.dtype)[rows]
        bias = None if bias is None else layer.get_weight(bias.to(like.device), like.dtype)[rows]
    else:
        plain = type(weight.data) is torch.Tensor
        convert = getattr(layer, "convert_weight", None)
        if plain:
            dense = weight[rows].to(like.device, torch.float32 if callable(convert) else like.dtype)
            if callable(convert):
                dense = convert(dense)
        elif callable(convert):
            dense = convert(weight)[rows]
        else:
            return f"its weight is a {type(weight.data).__name__}, whose rows it cannot read"
        if bias is not None:
            bias = bias[rows]
    if type(dense) is not torch.Tensor and type(getattr(dense, "data", None)) is not torch.Tensor:
        return f"its weight converts to a {type(dense).__name__}, whose rows it cannot read"
    if bias is not None and type(bias.data) is not torch.Tensor:
        return f"its bias is a {type(bias.data).__name__}"
    return (dense.to(like.device, like.dtype),
            None if bias is None else bias.to(like.device, like.dtype))


# Transformer options that a guidance node sets for an extra pass of its own,
# which changes what the model computes from the same input at the same
# sigma: LTX-2's spatio-temporal guidance (the listed blocks skip their
# self-attention) and modality guidance (a cross-attention switched off).
ALTERED_PASS_KEYS = ("stg_self_attn_blocks", "a2v_cross_attn", "v2a_cross_attn")


def chunk_identity(transformer_options: dict, first_stream: torch.Tensor, dropped_tokens: int = 0) -> Hashable:
    """Which conditionings a chunk carries, its shape, and which kind of pass
    it is. The uuids tell apart same-size area prompts run as separate chunks
    and a prompt that takes over from another mid-run; cond_or_uncond is kept
    because ComfyUI copies a positive area cond, uuid included, into the
    negative list; a guidance pass that alters the model (ALTERED_PASS_KEYS)
    keeps a cache of its own, even where it carries the same conditioning.
    dropped_tokens: tokens a patch removed from the end of a (batch, tokens,
    ...) stream during the run (BlockAdapter.dropped_tail_tokens), counted as
    if present, so the chunk keeps its cache."""
    shape = tuple(first_stream.shape)
    if dropped_tokens:
        shape = (shape[0], shape[1] + dropped_tokens, *shape[2:])
    altered = tuple((key, transformer_options[key]) for key in ALTERED_PASS_KEYS if key in transformer_options)
    return (tuple(transformer_options.get("cond_or_uncond") or ()),
            tuple(str(uuid) for uuid in transformer_options.get("uuids") or ()), shape, *altered)


def reference_tokens(args: dict) -> int:
    """Tokens of the reference images ComfyUI appended to the end of the image
    stream (Kontext-style edit models), from the block's transformer options."""
    return sum((args.get("transformer_options") or {}).get("reference_image_num_tokens") or ())


def modulate_rows(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, tail_tokens: int) -> torch.Tensor:
    """`normed * (1 + scale) + shift` with (batch, rows, dim) modulation: one
    row for every token, or two, the second for the last `tail_tokens` (the
    reference tokens edit models modulate at timestep zero)."""
    return modulate_rows_by_gain(normed, 1 + scale, shift, tail_tokens)


def modulate_rows_by_gain(normed: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor,
                          tail_tokens: int) -> torch.Tensor:
    """`modulate_rows` with the gain, 1 + scale, already formed."""
    if gain.shape[1] == 1:
        return torch.addcmul(shift, normed, gain)
    head = normed.shape[1] - tail_tokens
    return torch.cat((torch.addcmul(shift[:, :1], normed[:, :head], gain[:, :1]),
                      torch.addcmul(shift[:, 1:2], normed[:, head:], gain[:, 1:2])), dim=1)


class SampledRows:
    """The rows of every block's adaLN modulation linear that sampled module
    inputs need (the first `chunks` chunks of `width` rows, e.g. shift and
    scale, every stride-th channel; `width` is the stream's), stacked: one addmm per model call gives
    them for all blocks instead of a matmul over each block's whole
    modulation matrix. The bias of the chunks from `gain_from` on gets 1
    added, so a scale comes out as the gain 1 + scale. Made the first time a
    run needs it, dropped when the run ends (BlockAdapter.end_run): its copy
    of those rows (1/18 of the modulation weights at FLUX.1-dev size) lives
    as long as the run. A LoRA or hook that replaces a block's modulation
    parameters, or starts patching them on the fly, makes it rebuild."""

    def __init__(self, layers: dict, rows: dict, chunks: int, gain_from: int, activate: bool = True):
        """layers: the modulation linears by block key; rows: their
        (weight rows, bias rows) from weight_rows."""
        self.layers = layers
        self.chunks = chunks
        # Whether the linear takes silu of the conditioning (most adaLN) or
        # the conditioning itself (Z-Image's modulation has no SiLU in front).
        self.activate = activate
        self.parameters = {key: (layer.weight, layer.bias) for key, layer in layers.items()}
        weights, biases, self.rows = [], [], {}
        start = 0
        for key, (weight, bias) in rows.items():
            bias = bias.clone() if bias is not None else weight.new_zeros(weight.shape[0])
            bias[gain_from * bias.shape[0] // chunks:] += 1
            weights.append(weight)
            biases.append(bias)
            self.rows[key] = (start, start + weight.shape[0])
            start += weight.shape[0]
        self.weight = torch.cat(weights)
        self.bias = torch.cat(biases)
        self._last: tuple | None = None
        # (conditioning, whether the stacked rows were still the blocks' own then).
        self._checked: tuple | None = None

    def is_current_for(self, conditioning: torch.Tensor) -> bool:
        """Whether every block still has the parameters stacked: checked once
        per model call (a new conditioning tensor), not once per block."""
        if self._checked is None or self._checked[0] is not conditioning:
            current = all(layer.weight is weight and layer.bias is bias and not getattr(layer, "weight_function", None)
                          for (weight, bias), layer in zip(self.parameters.values(), self.layers.values()))
            self._checked = (conditioning, current)
        return self._checked[1]

    def prepare(self, conditioning: torch.Tensor) -> None:
        """Every block's rows for this model call's conditioning vector (silu, then the linear)."""
        if self._last is None or self._last[0] is not conditioning:
            activated = torch.nn.functional.silu(conditioning) if self.activate else conditioning
            product = torch.addmm(self.bias, activated, self.weight.t())
            self._last = (conditioning, product)

    def rows_for(self, key, conditioning: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block's chunks, (batch, width / stride) each."""
        self.prepare(conditioning)
        start, end = self.rows[key]
        return self._last[1][:, start:end].chunk(self.chunks, dim=-1)


_rows_unreadable_said: set = set()


def _log_rows_unreadable_once(family: str, layer_type: str, reason: str) -> None:
    """Sampled module inputs then go through each block's modulation layer:
    exact, only dearer. Said once per family, layer type and reason."""
    if (family, layer_type, reason) not in _rows_unreadable_said:
        _rows_unreadable_said.add((family, layer_type, reason))
        logger.debug("%s: sampled module inputs run each block's modulation layer (%s): %s",
                     family, layer_type, reason)


def blocks_of(container) -> list[torch.nn.Module]:
    if container is None:
        return []
    if isinstance(container, torch.nn.ModuleDict):
        return list(container.values())
    return list(container)


class BlockAdapter:
    """One per model family. Subclasses fill in the class attributes and,
    where they can do better than the raw hidden state, `module_input`."""

    family: str = ""
    # Qualified names of the diffusion model classes this adapter handles;
    # subclasses of them match too.
    model_classes: tuple[str, ...] = ()
    block_groups: tuple[BlockGroup, ...] = ()

    def specificity(self, diffusion_model) -> int | None:
        """Position in the model's class hierarchy of the closest class this
        adapter handles (0 = the model's own class), None if it handles none.
        The most specific adapter wins, so a subclass adapter beats its base's."""
        for depth, cls in enumerate(type(diffusion_model).__mro__):
            if f"{cls.__module__}.{cls.__qualname__}" in self.model_classes:
                return depth
        return None

    def matches(self, diffusion_model) -> bool:
        return self.specificity(diffusion_model) is not None

    def group(self, kind: str) -> BlockGroup:
        # Looked up on every block call: a dict made once per block_groups
        # (a class attribute; a test may set another on an instance).
        groups = self.__dict__.get("_groups")
        if groups is None or groups[0] is not self.block_groups:
            groups = self.__dict__["_groups"] = (self.block_groups, {g.kind: g for g in self.block_groups})
        group = groups[1].get(kind)
        if group is None:
            raise KeyError(kind)
        return group

    def blocks(self, diffusion_model, kind: str) -> list[torch.nn.Module]:
        return blocks_of(getattr(diffusion_model, self.group(kind).attribute, None))

    def block_keys(self, diffusion_model) -> list[tuple[str, int]]:
        return [(group.kind, i) for group in self.block_groups
                for i in range(len(self.blocks(diffusion_model, group.kind)))]

    def block(self, diffusion_model, kind: str, index: int) -> torch.nn.Module:
        container = getattr(diffusion_model, self.group(kind).attribute, None)
        if type(container) is torch.nn.ModuleList and index >= 0:
            # Every block call: read where the list keeps it, not listed or
            # through ModuleList's index arithmetic.
            block = container._modules.get(str(index))
            if block is not None:
                return block
        return blocks_of(container)[index]

    def block_path(self, diffusion_model, kind: str, index: int) -> str:
        """Dotted path of the block under the diffusion model, for object patches."""
        group = self.group(kind)
        container = getattr(diffusion_model, group.attribute)
        if isinstance(container, torch.nn.ModuleDict):
            return f"{group.attribute}.{list(container.keys())[index]}"
        return f"{group.attribute}.{index}"

    def streams(self, kind: str) -> tuple[str, ...]:
        return self.group(kind).streams

    def read_streams(self, kind: str, values: dict) -> dict:
        """The block's hidden states by stream name, from a patch's args (or
        the forward's arguments) and from what the block returned; a stream
        the block did not return is None. Adapters whose block passes its
        streams in another form (LTX-2's `(video, audio)` tuple) override
        this and `write_streams`."""
        return {name: values.get(name) for name in self.streams(kind)}

    def write_streams(self, kind: str, streams: dict) -> dict:
        """What the block's caller reads back, from the streams by name."""
        return {name: streams.get(name) for name in self.streams(kind)}

    def module_keys(self, diffusion_model) -> list:
        """Every cached module: a block, or one of its streams where the
        group caches them separately."""
        keys = []
        for kind, index in self.block_keys(diffusion_model):
            group = self.group(kind)
            if group.separate_streams:
                keys.extend((kind, index, name) for name in group.streams)
            else:
                keys.append((kind, index))
        return keys

    def module_input(self, diffusion_model, kind: str, index: int, args: dict) -> torch.Tensor:
        """The cheap proxy of the block's input that RFE scales by and RCS
        watches. Default: the first hidden state itself (copied: some blocks
        update it in place). Adapters override this with the block's
        adaLN-modulated, normalised input where they can, as the paper does:
        unlike the raw hidden state it also moves with the timestep. Keep
        the stream's layout; the runtime moves its batch to dim 0. Groups
        with `separate_streams` are asked once per stream, with `stream`."""
        group = self.group(kind)
        return args[group.streams[0]].detach().clone()

    def modulation_linear(self, diffusion_model, kind: str, index: int):
        """The linear layer, applied to silu of the block's conditioning
        vector, whose first chunks of rows modulate the block's module input;
        adapters that build sampled module inputs from SampledRows name it."""
        return None

    def sampled_rows(self, diffusion_model, conditioning: torch.Tensor, stride: int, chunks: int,
                     gain_from: int, width: int, activate: bool = True) -> SampledRows | None:
        """This run's SampledRows of the model, or None where the stride keeps
        every channel or some block's modulation cannot be read directly
        (then the module input goes through the layer itself)."""
        if stride == 1:
            return None
        stacks = self.__dict__.get("_sampled_rows")
        if stacks is None:  # not setdefault: that would make a dictionary on every block call
            stacks = self.__dict__["_sampled_rows"] = weakref.WeakKeyDictionary()
        stack = stacks.get(diffusion_model, False)
        if stack is False or (stack is not None and not stack.is_current_for(conditioning)):
            layers, rows, sampled = {}, {}, slice(0, chunks * width, stride)
            for kind, index in self.block_keys(diffusion_model):
                layer = self.modulation_linear(diffusion_model, kind, index)
                found = weight_rows(layer, sampled, conditioning)
                if isinstance(found, str):
                    _log_rows_unreadable_once(self.family, type(layer).__name__, found)
                    layers = None
                    break
                layers[(kind, index)], rows[(kind, index)] = layer, found
            stack = stacks[diffusion_model] = (SampledRows(layers, rows, chunks, gain_from, activate)
                                               if layers else None)
        return stack

    def prepare_sampled_rows(self, diffusion_model, conditioning: torch.Tensor) -> None:
        """Called by the first block's full module input, once per model
        call: the stacked rows the later blocks' sampled inputs read are
        computed for this call here, so those blocks only slice them."""
        stack = self.__dict__.get("_sampled_rows", {}).get(diffusion_model)
        if stack is not None and stack.is_current_for(conditioning):
            stack.prepare(conditioning)

    def uncached_call(self, kind: str, args: dict) -> bool:
        """Whether this call of a block does other work than the block's step
        and must run as it is, neither predicted nor recorded (Qwen-Image
        2.1's first-step call that fills the model's own prefix K/V cache).
        Default: no call is."""
        return False

    def dropped_tail_tokens(self, kind: str, args: dict) -> int:
        """Tokens a patch has removed from the end of this block's streams
        since the run began, which the block's other arguments still count:
        core's FluxKVCache drops the reference images' tokens once it holds
        their K/V. The chunk stays the same and its cache is trimmed to the
        tokens present (RFCRun.keep_leading). Default: none."""
        return 0

    def kept_bytes(self, diffusion_model) -> int:
        """What this adapter keeps for a run of the model (the stacked
        SampledRows and their last product), for the summary's peak."""
        stack = self.__dict__.get("_sampled_rows", {}).get(diffusion_model)
        if stack is None:
            return 0
        tensors = [stack.weight, stack.bias] + ([stack._last[1]] if stack._last is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def end_run(self, diffusion_model) -> None:
        """A sampling run of this model ended: drop anything kept for it."""
        self.__dict__.get("_sampled_rows", {}).pop(diffusion_model, None)

    def sampled_module_input(self, diffusion_model, kind, index, args, **stream) -> torch.Tensor:
        """The module input of every block but the first, where only its
        norm is read (RFE's input change), so an adapter may build it on a
        regular sample of the tokens and channels (token_stride,
        channel_stride). The first block's full module input decides each
        evaluation (RCS): there a sample would change the decisions.
        Default: the full module input."""
        return self.module_input(diffusion_model, kind, index, args, **stream)
