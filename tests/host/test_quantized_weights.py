"""Quantized model files, loaded as a user loads them (a .safetensors file in
a diffusion_models folder, core's UNETLoader), for every family whose
sampled module inputs read rows of each block's adaLN modulation linear
(FLUX.1, Qwen-Image, Lumina 2, Z-Image), and Wan, which reads its modulation
parameter directly. For each file format and family:

1. the pack reads those rows on that format (`weight_rows` gives tensors,
   not a reason), so the run keeps its one stacked matmul per model call;
2. the rows are the ones the layer computes with: its own output, sliced;
3. threshold 0 gives the plain model's latent bit for bit;
4. the module input built from the rows is a sample of the full one.

The tiny models are random-weight instances of ComfyUI's own classes, at
sizes detection reads back from the tensors where it reads them (Flux and
Wan: heads of 128); quantized_files.detection_completed fills in the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from benchmarks import quantized_files
from family_harness import NEVER_SKIPS, FamilyContract, FamilySpec, pack_module, rfc, sample_spec
from shared_specs import FLUX_SPEC
from test_family_2026_on_known_adapters import Z_IMAGE
from test_family_hunyuan_video import flux_block_probe
from test_family_lumina2 import SPEC as LUMINA2_SPEC
from test_family_qwen_image import SPEC as QWEN_IMAGE_SPEC
from test_family_wan import TINY_WAN, WAN21_SPEC
from tiny_models import build


@dataclass(frozen=True)
class Family:
    """spec: the tiny model; loads_as: the config class ComfyUI's detection
    must pick for its file; fixed: sizes some ComfyUI's detection sets at
    the released model's instead of reading them (detection_completed)."""

    spec: FamilySpec
    loads_as: str
    fixed: tuple[str, ...] = ()

    @property
    def has_modulation_linear(self) -> bool:
        return self.spec.name != "wan"


NEXTDIT_FIXED = ("dim", "n_heads", "n_kv_heads", "axes_dims", "axes_lens")

FAMILIES = {
    # New ComfyUI reads FLUX.1's width from img_in and gives it heads of 128
    # (rope axes 16, 56, 56); old ComfyUI fixes FLUX.1-dev's sizes.
    "flux": Family(dataclasses.replace(
        FLUX_SPEC, probe=flux_block_probe,
        unet_config={**FLUX_SPEC.unet_config, "hidden_size": 256, "num_heads": 2, "mlp_ratio": 4.0, "depth": 1,
                     "depth_single_blocks": 1, "axes_dim": [16, 56, 56]}),
        "Flux", fixed=("hidden_size", "num_heads", "context_in_dim")),
    "qwen_image": Family(QWEN_IMAGE_SPEC, "QwenImage"),
    # NextDiT's heads and rope axes are set only at the released widths, and
    # old ComfyUI reads no more than the depth and caption width.
    "lumina2": Family(LUMINA2_SPEC, "Lumina2", fixed=NEXTDIT_FIXED),
    # Z-Image is NextDiT with z_image_modulation; detection names it ZImage
    # only at the released width, so the tiny one loads as Lumina2's config.
    "z_image": Family(Z_IMAGE, "Lumina2", fixed=NEXTDIT_FIXED),
    # Wan 2.1: width from head.modulation, heads of 128, FFN width from the weights.
    "wan": Family(dataclasses.replace(WAN21_SPEC, unet_config={**TINY_WAN, "dim": 256, "num_heads": 2,
                                                               "ffn_dim": 512}), "WAN21_T2V"),
}

CASES = [pytest.param(file_format, family, id=f"{file_format}-{family}")
         for file_format in quantized_files.FORMATS for family in FAMILIES]


class Contract(FamilyContract):
    """The family contract's checks, run on a model loaded from a file in
    `file_format` (not collected)."""

    def __init__(self, spec: FamilySpec, file_format: str):
        self.spec = spec
        self.file_format = file_format

    def assert_sampled_input_close(self, value, expected, key) -> None:
        assert_close_for(self.file_format, value, expected, key)


@pytest.fixture(scope="module")
def load(comfy, nodes, tmp_path_factory):
    """load(file_format, family): the tiny model of the family written in the
    format and loaded through core's UNETLoader, once per module."""
    folder = str(tmp_path_factory.mktemp("diffusion_models"))
    loaded = {}

    def load_case(file_format: str, family_name: str):
        reason = quantized_files.unavailable(file_format)
        if reason:
            pytest.skip(reason)
        if (file_format, family_name) not in loaded:
            loaded[file_format, family_name] = load_file(nodes, folder, file_format, family_name)
        return loaded[file_format, family_name]

    return load_case


def load_file(nodes, folder: str, file_format: str, family_name: str):
    family = FAMILIES[family_name]
    spec = family.spec
    built = build(spec.config_class, spec.unet_config, overrides=spec.overrides).model.diffusion_model
    adapter = pack_module(nodes, "nodes.adapters").detect_adapter(built)
    quantized = quantized_files.block_linears(built, adapter)
    kept = quantized_files.first_block_linears(built, adapter)
    state_dict = quantized_files.file_state_dict(built.state_dict(), file_format, quantized, kept)
    # Named by the family key, not the adapter's family: Lumina 2 and Z-Image
    # share one adapter, and ComfyUI-GGUF maps its file while the model lives,
    # so a second file of the same name would change the first model's weights.
    name = quantized_files.write(state_dict, folder, f"{family_name}_{file_format}.safetensors", file_format,
                                 quantized, spec.name)
    with quantized_files.detection_completed(spec.unet_config, family.fixed):
        model = quantized_files.load_with_unet_loader(folder, name)
    loaded = model.model.diffusion_model
    assert type(model.model.model_config).__name__ == family.loads_as
    assert type(loaded) is type(built)
    assert pack_module(nodes, "nodes.adapters").detect_adapter(loaded).family == spec.name
    # The loader takes a file's weights leniently (a key the model lacks is
    # only logged): the model must have every one the file has, at its shape.
    shapes = {name: tuple(parameter.shape) for name, parameter in loaded.named_parameters()}
    assert {name: tuple(parameter.shape) for name, parameter in built.named_parameters()}.items() <= shapes.items()
    stored = {name: quantized_files.stored_as(loaded.get_submodule(name)) for name in quantized}
    assert stored == {name: quantized_files.expected_storage(file_format, name in kept,
                                                             built.get_submodule(name).in_features)
                      for name in quantized}
    return model


def modulation_linears(nodes, model) -> dict:
    diffusion_model = model.model.diffusion_model
    adapter = pack_module(nodes, "nodes.adapters").detect_adapter(diffusion_model)
    return {key: adapter.modulation_linear(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)}


def rows_read_in_a_run(nodes, model, spec: FamilySpec, monkeypatch) -> tuple[dict, list]:
    """A two-step run with the pack on strides of more than one channel:
    what `weight_rows` gave for each block's modulation linear, as
    (rows, conditioning, found) by block key, and the blocks whose sampled
    module input came from the stacked rows."""
    base = pack_module(nodes, "nodes.adapters.base")
    monkeypatch.setattr(base, "MODULE_INPUT_TOKENS", 4)
    monkeypatch.setattr(base, "MODULE_INPUT_CHANNELS", 8)
    block_of = {id(layer): key for key, layer in modulation_linears(nodes, model).items()}
    read, stacked = {}, []
    weight_rows, rows_for = base.weight_rows, base.SampledRows.rows_for

    def spy_weight_rows(layer, rows, like):
        found = weight_rows(layer, rows, like)
        read[block_of[id(layer)]] = (rows, like, found)
        return found

    def spy_rows_for(stack, key, conditioning):
        stacked.append(key)
        return rows_for(stack, key, conditioning)

    monkeypatch.setattr(base, "weight_rows", spy_weight_rows)
    monkeypatch.setattr(base.SampledRows, "rows_for", spy_rows_for)
    sample_spec(spec, rfc(nodes, model, **NEVER_SKIPS), steps=2)
    return read, stacked


def skip_without_modulation_linear(family: Family):
    if not family.has_modulation_linear:
        pytest.skip(f"{family.spec.name}: no modulation linear; its module input reads the blocks' "
                    "`modulation` parameter directly")


def rows_of_a_run(load, nodes, monkeypatch, file_format: str, family_name: str):
    """The family's model loaded from a file in the format, sampled once:
    the rows read and stacked there (rows_read_in_a_run), and the model's
    modulation linears by block key. Skips families without such linears."""
    family = FAMILIES[family_name]
    skip_without_modulation_linear(family)
    model = load(file_format, family_name)
    read, stacked = rows_read_in_a_run(nodes, model, family.spec, monkeypatch)
    return read, stacked, modulation_linears(nodes, model)


@pytest.mark.parametrize("file_format,family_name", CASES)
def test_modulation_rows_are_read_on_the_format(load, nodes, monkeypatch, file_format, family_name):
    read, stacked, layers = rows_of_a_run(load, nodes, monkeypatch, file_format, family_name)
    unreadable = {key: found for key, (_, _, found) in read.items() if isinstance(found, str)}
    assert not unreadable, unreadable
    block_keys = list(layers)
    assert set(read) == set(block_keys)
    # Every block but the first (whose full module input decides) took its sampled input from the stack.
    assert set(stacked) == set(block_keys[1:])


def assert_close_for(file_format: str, actual: torch.Tensor, expected: torch.Tensor, what) -> None:
    """Equal up to the summation order of float32 math, or, where the layer
    quantizes its input (quantized_files.QUANTIZED_INPUTS), up to that
    rounding: within 3% in norm, three times what Gaussian inputs give."""
    if file_format in quantized_files.QUANTIZED_INPUTS:
        relative = ((actual - expected).norm() / expected.norm()).item()
        assert relative < 3e-2, (what, relative)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("file_format,family_name", CASES)
def test_modulation_rows_are_the_layers_own(load, nodes, monkeypatch, file_format, family_name):
    read, _, layers = rows_of_a_run(load, nodes, monkeypatch, file_format, family_name)
    assert set(read) == set(layers)
    generator = torch.Generator().manual_seed(3)
    for key, (rows, like, found) in read.items():
        assert not isinstance(found, str), (key, found)
        weight, bias = found
        layer = layers[key]
        conditioning = torch.randn(3, layer.in_features, generator=generator).to(like.dtype)
        from_rows = conditioning @ weight.t() + (0 if bias is None else bias)
        assert_close_for(file_format, from_rows, layer(conditioning)[:, rows], key)


@pytest.mark.parametrize("file_format,family_name", CASES)
def test_threshold_zero_is_bit_identical(load, nodes, file_format, family_name):
    family = FAMILIES[family_name]
    Contract(family.spec, file_format).test_threshold_zero_is_bit_identical(load(file_format, family_name), nodes)


@pytest.mark.parametrize("file_format,family_name", CASES)
def test_module_input_is_what_the_block_feeds_its_first_layer(load, nodes, monkeypatch, file_format, family_name):
    """The family contract's check, with the sampled inputs compared at the
    format's tolerance: on int8 files the first block's full module input
    goes through the modulation layer, which rounds its input, and the
    sampled ones through the dequantized rows, which do not."""
    family = FAMILIES[family_name]
    Contract(family.spec, file_format).test_module_input_is_what_the_block_feeds_its_first_layer(
        load(file_format, family_name), nodes, monkeypatch)
