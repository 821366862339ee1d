"""Diffusion model files in the formats quantized models are shared in,
written from a tiny model's weights, and loaded the way a user loads them:
from a `diffusion_models` folder through core's UNETLoader, which detects the
family from the tensors and picks ComfyUI's ops for the format.

The comfy_quant formats are made with the host ComfyUI's own quantizers
(`comfy.quant_ops.QuantizedTensor.from_float` and its `state_dict`); the
legacy scaled-fp8 file is plain arithmetic (an fp8 weight and its scale),
which both old and new ComfyUI read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch

BF16 = "bf16"
FP8_SCALED = "fp8_scaled"
FP8 = "float8_e4m3fn"
INT8 = "int8_tensorwise"
INT8_CONVROT = "int8_convrot"
FP8_MIXED = "fp8mixed"
GGUF_Q8_0 = "gguf_q8_0"
FORMATS = (BF16, FP8_SCALED, FP8, INT8, INT8_CONVROT, FP8_MIXED, GGUF_Q8_0)

# Formats whose layers quantize their input as well as their weight: int8
# tensorwise layers run comfy_kitchen's W8A8 matmul (the input rounded to
# int8 row by row), on the CPU's eager kernels too. Their output is the
# dequantized weight's product give or take that rounding, about 1% of it
# for Gaussian inputs. The other formats' layers compute on the CPU with the
# dequantized weight itself (fp8 matmuls need a GPU that has them).
QUANTIZED_INPUTS = (INT8, INT8_CONVROT)

# Hadamard groups of int8_convrot: a power of 4 that divides every tiny
# model's linear input widths (64, 256, 1824, ...).
CONVROT_GROUP_SIZE = 16

# comfy_quant layouts: (layout class, from_float options, the layer's comfy_quant JSON).
COMFY_QUANT = {
    FP8: ("TensorCoreFP8E4M3Layout", {"scale": "recalculate"}, {"format": "float8_e4m3fn"}),
    FP8_MIXED: ("TensorCoreFP8E4M3Layout", {"scale": "recalculate"}, {"format": "float8_e4m3fn"}),
    INT8: ("TensorWiseINT8Layout", {"per_channel": True}, {"format": "int8_tensorwise"}),
    INT8_CONVROT: ("TensorWiseINT8Layout",
                   {"per_channel": True, "convrot": True, "convrot_groupsize": CONVROT_GROUP_SIZE},
                   {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": CONVROT_GROUP_SIZE}),
}


def unavailable(file_format: str) -> str | None:
    """Why this ComfyUI cannot load the format (a reason to skip), or None."""
    if file_format in COMFY_QUANT:
        if importlib.util.find_spec("comfy.quant_ops") is None:
            return f"{file_format}: this ComfyUI has no comfy/quant_ops.py (comfy_quant layouts)"
        import comfy.quant_ops

        if not getattr(comfy.quant_ops, "_CK_AVAILABLE", True):
            return f"{file_format}: comfy_kitchen does not import here, so comfy_quant layouts cannot be made"
    if file_format == GGUF_Q8_0:
        if importlib.util.find_spec("gguf") is None:
            return "gguf_q8_0: the gguf package does not import in this ComfyUI's environment"
        if not _has_gguf_nodes():
            return "gguf_q8_0: ComfyUI-GGUF is not in this ComfyUI's custom_nodes"
    return None


def _has_gguf_nodes() -> bool:
    import folder_paths

    custom_nodes = Path(folder_paths.base_path) / "custom_nodes"
    return any(path.is_dir() and "gguf" in path.name.lower() for path in custom_nodes.iterdir())


def block_linears(diffusion_model, adapter) -> list[str]:
    """Qualified names of the Linear layers inside the adapter's blocks,
    modulation linears included: what quantized files store quantized."""
    attributes = tuple(f"{group.attribute}." for group in adapter.block_groups)
    return [name for name, module in diffusion_model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(attributes)]


def first_block_linears(diffusion_model, adapter) -> set[str]:
    """The linears of the model's first block, which fp8mixed keeps in bf16
    (as mixed files keep some precision-sensitive layers): its modulation
    linear among them, the later blocks' in fp8."""
    prefix = f"{adapter.block_path(diffusion_model, *adapter.block_keys(diffusion_model)[0])}."
    return {name for name in block_linears(diffusion_model, adapter) if name.startswith(prefix)}


def file_state_dict(state_dict: dict, file_format: str, quantized: list[str], kept: set[str]) -> dict:
    """The tensors of a `file_format` file of a diffusion model.
    state_dict: the model's float weights; quantized: the Linear layers the
    format stores quantized; kept: those of them a mixed file keeps in bf16."""
    out = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
           for key, value in state_dict.items()}
    if file_format in (BF16, GGUF_Q8_0):
        return out
    if file_format == FP8_SCALED:
        for layer in quantized:
            weight = out[f"{layer}.weight"].float()
            scale = weight.abs().amax() / torch.finfo(torch.float8_e4m3fn).max
            out[f"{layer}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
            out[f"{layer}.scale_weight"] = scale
        # The marker both loaders look for; its dtype is the weights' fp8
        # type, and an empty one (not two elements) allows fp8 matmuls.
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        return out
    from comfy.quant_ops import QuantizedTensor

    layout, options, config = COMFY_QUANT[file_format]
    for layer in quantized:
        if file_format == FP8_MIXED and layer in kept:
            continue
        quantized_weight = QuantizedTensor.from_float(out[f"{layer}.weight"], layout, **options)
        out.update(quantized_weight.state_dict(f"{layer}.weight"))
        out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)
    return out


def stored_as(layer) -> str:
    """How a loaded linear holds its weight: "plain" (a float tensor, cast
    as it is used), "scaled_fp8" (old ComfyUI's fp8 weight and scale), or
    its comfy_quant format ("int8_convrot" for int8 tensorwise with convrot)."""
    weight = layer.weight
    if getattr(weight, "tensor_type", None) is not None:  # ComfyUI-GGUF's GGMLTensor
        return f"gguf_{weight.tensor_type.name.lower()}"
    if type(weight.data) is torch.Tensor:
        return "scaled_fp8" if hasattr(layer, "scale_weight") else "plain"
    if getattr(layer, "quant_format", None) == INT8 and weight._params.convrot:
        return INT8_CONVROT
    return getattr(layer, "quant_format", type(weight.data).__name__)


def expected_storage(file_format: str, kept: bool, in_features: int) -> str:
    """What stored_as says of a quantized layer of a `file_format` file
    once loaded; kept: fp8mixed keeps it in bf16. New ComfyUI turns a legacy
    scaled-fp8 file into comfy_quant fp8 as it loads it
    (comfy.utils.convert_old_quants). GGUF stores Q8_0 where the layer's
    input width is a whole number of 32-weight blocks, float16 elsewhere."""
    import comfy.utils

    if file_format == GGUF_Q8_0:
        return GGUF_Q8_0 if in_features % 32 == 0 else "gguf_f16"
    if file_format == BF16 or (file_format == FP8_MIXED and kept):
        return "plain"
    if file_format == FP8_SCALED:
        return FP8 if hasattr(comfy.utils, "convert_old_quants") else "scaled_fp8"
    return FP8 if file_format == FP8_MIXED else file_format


@contextlib.contextmanager
def detection_completed(tiny_config: dict, fixed: tuple[str, ...] = ()):
    """ComfyUI's detection reads some sizes from the tensors and takes the
    rest from the released model (Qwen-Image's 24 heads of 128, NextDiT's
    2304 or 3840 wide layers, Wan's 4096-wide text features), which no tiny
    model has. While active, a detection of the tiny model's family keeps
    every value it read and gets the keys it leaves out from the tiny
    config; `fixed`: keys it does set, at the released model's value and
    not from the tensors (FLUX.1's width in old ComfyUI), also taken from
    the tiny config. The loader is otherwise untouched."""
    import comfy.model_detection

    detect = comfy.model_detection.detect_unet_config

    def completed(state_dict, key_prefix, *args, **kwargs):
        detected = detect(state_dict, key_prefix, *args, **kwargs)
        if detected is not None and detected.get("image_model") == tiny_config["image_model"]:
            detected = {**tiny_config, **detected, **{key: tiny_config[key] for key in fixed}}
        return detected

    comfy.model_detection.detect_unet_config = completed
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = detect


def load_with_unet_loader(folder: str, name: str):
    """Core's UNETLoader on `name` in `folder`, registered as a diffusion_models
    folder; a .gguf file through ComfyUI-GGUF's UnetLoaderGGUF, as users load one."""
    import folder_paths
    import nodes

    if folder not in folder_paths.get_folder_paths("diffusion_models"):
        folder_paths.add_model_folder_path("diffusion_models", folder)
    if name.endswith(".gguf"):
        loader_class = nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]
        if folder not in folder_paths.get_folder_paths("unet_gguf"):
            folder_paths.add_model_folder_path("unet_gguf", folder)
        return getattr(loader_class(), loader_class.FUNCTION)(name)[0]
    loader_class = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]
    return getattr(loader_class(), loader_class.FUNCTION)(name, "default")[0]


# ComfyUI-GGUF's name for each adapter family's architecture (general.architecture).
GGUF_ARCHITECTURES = {"flux": "flux", "qwen_image": "qwen_image", "lumina2": "lumina2", "wan": "wan"}


def write(state_dict: dict, folder: str, name: str, file_format: str = BF16, quantized: list[str] = (),
          family: str = "") -> str:
    """Save the file_state_dict of a file; a gguf_q8_0 file is written from
    the float state dict instead, its quantized layers' weights in GGML's
    Q8_0 blocks (32 weights and a float16 scale each) where their input
    width allows, everything else float16 (1-D tensors float32), as
    ComfyUI-GGUF's converter lays them out. Returns the file's name."""
    if file_format != GGUF_Q8_0:
        import safetensors.torch

        safetensors.torch.save_file(state_dict, os.path.join(folder, name))
        return name
    import gguf

    name = f"{os.path.splitext(name)[0]}.gguf"
    writer = gguf.GGUFWriter(os.path.join(folder, name), arch=GGUF_ARCHITECTURES[family])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    weights = {f"{layer}.weight" for layer in quantized}
    for key, tensor in state_dict.items():
        data = tensor.float().numpy()
        if key in weights and data.ndim == 2 and data.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        elif data.ndim <= 1:
            qtype = gguf.GGMLQuantizationType.F32
        else:
            qtype = gguf.GGMLQuantizationType.F16
        writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name
