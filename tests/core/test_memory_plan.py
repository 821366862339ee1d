"""The memory plan (rfc_core.memory) and int8 storage: the projection is
what the run then allocates, the layout chosen is the finest that fits, and
int8 slots forecast what the model's dtype does, within int8's error."""

import pytest
import torch

from rfc_core import CacheConfig, RFCRun
from rfc_core.memory import GIB, Budget, Footprint, Layout, candidates, choose_layout
from rfc_core.storage import FeatureStorage, QuantizedSlots, storage_for

FIRST = ("block", 0)
# FLUX.1 dev at 1024x1024: 4608 image and 512 text tokens, 3072 wide, 19
# double and 38 single blocks, bf16, cond only (cfg 1, as the guidance-
# distilled model runs).
FLUX_DEV = Footprint(group_blocks=(19, 38), residual_features=(4608 + 512) * 3072,
                     first_input_features=4608 * 3072, sampled_input_features=256 * 256, element_size=2, samples=1,
                     slots=2)


def test_per_block_bf16_at_flux_dev_size_is_what_issue_30_measured():
    # 57 blocks x 2 slots x 31.5 MB: about 3.3 GB with the first block's input.
    assert 3.5e9 < FLUX_DEV.total(Layout()) < 3.8e9


def test_a_span_divides_the_residual_slots_and_int8_halves_them():
    per_block = FLUX_DEV.parts(Layout())["residual slots"]
    assert FLUX_DEV.parts(Layout(span=2))["residual slots"] == per_block * (10 + 19) // 57
    int8 = FLUX_DEV.parts(Layout(int8=True))["residual slots"]
    assert int8 == pytest.approx(per_block * (1 + 2 / 64) / 2)


def test_the_finest_layout_that_fits_is_chosen():
    roomy = Budget(device=24 * GIB, system=64 * GIB)
    assert choose_layout(FLUX_DEV, roomy) == Layout()
    # Not on the device in bf16, but in int8.
    assert choose_layout(FLUX_DEV, Budget(device=2 * GIB, system=64 * GIB)) == Layout(int8=True)
    # Not on the device at all: system memory, still per block.
    assert choose_layout(FLUX_DEV, Budget(device=200 * 2 ** 20, system=64 * GIB)) == Layout(system=True)
    # Little of either: spans.
    layout = choose_layout(FLUX_DEV, Budget(device=200 * 2 ** 20, system=GIB))
    assert layout.span > 1 and FLUX_DEV.on_system(layout) <= GIB
    # Nothing fits: None (the whole model call is cached).
    assert choose_layout(FLUX_DEV, Budget(device=0, system=0)) is None


def test_the_cap_bounds_the_whole_cache_and_fixed_widgets_stay_fixed():
    cap = GIB
    layout = choose_layout(FLUX_DEV, Budget(cap=cap))
    assert FLUX_DEV.total(layout) <= cap
    assert all(layout.span == 3 for layout in candidates(FLUX_DEV, span=3))
    assert all(layout.int8 and not layout.system for layout in candidates(FLUX_DEV, int8=True, system=False))


def test_wan_720p_with_cfg_keeps_a_block_or_span_cache_on_a_24_gb_gpu_with_64_gb_ram():
    """Wan 2.2 14B, 1280x720, 81 frames (75600 tokens, 5120 wide, 40 blocks),
    cond and uncond as two chunks (ComfyUI splits them under memory
    pressure): 127 GB per block in bf16; with about 4 GB of the GPU and 50 GB
    of RAM free the plan still caches at block or span level."""
    wan = Footprint(group_blocks=(40,), residual_features=75600 * 5120, first_input_features=75600 * 5120,
                    sampled_input_features=256 * 256, element_size=2, samples=2, slots=2, chunk_samples=1)
    assert wan.total(Layout()) > 120e9
    budget = Budget(device=4 * GIB, system=50 * GIB)
    layout = choose_layout(wan, budget)
    assert layout is not None and budget.admits(wan, layout)


def drive(run, steps=10, width=256):
    outputs = []
    for i in range(steps):
        sigma = 1.0 - i / steps
        run.start_evaluation(sigma)
        module_input = torch.full((2, width), 1.0 + sigma) + torch.linspace(0, 1, width)
        residual = run.predict("chunk", FIRST, module_input)
        if residual is None:
            residual = module_input * sigma * torch.linspace(-3, 3, width)
            run.record("chunk", FIRST, module_input, residual)
        outputs.append(residual)
    return outputs


@pytest.mark.parametrize("order", [1, 2])
def test_int8_slots_take_the_same_decisions_and_forecast_within_int8_error(order):
    config = dict(threshold=0.5, max_skip=2, order=order)
    native = RFCRun(CacheConfig(**config), FIRST)
    int8 = RFCRun(CacheConfig(**config, cache_dtype="int8"), FIRST, storage=storage_for("auto", "int8"))
    native_outputs, int8_outputs = drive(native), drive(int8)
    assert [e.computed for e in native.evaluations] == [e.computed for e in int8.evaluations]
    assert not all(e.computed for e in int8.evaluations)
    for a, b in zip(native_outputs, int8_outputs):
        # Residuals up to 6: half an int8 step of 6 / 127, times the forecast's weights.
        torch.testing.assert_close(a, b, rtol=0, atol=0.1)
    assert int8.peak_bytes < native.peak_bytes


def test_quantized_slots_round_trip_and_accumulate():
    slots = QuantizedSlots(2, 2, 192, torch.float32, torch.device("cpu"))
    assert slots.group == 64
    values = torch.randn(2, 2, 192)
    for slot in range(2):
        slots.write(slot, values[:, slot])
    step = values.abs().amax() / 127
    torch.testing.assert_close(slots.values(), values, rtol=0, atol=float(step))
    weights = torch.tensor([0.25, 1.5]).view(1, 1, 2).repeat(2, 1, 1)
    base = torch.randn(2, 192)
    expected = base + 0.25 * values[:, 0] + 1.5 * values[:, 1]
    torch.testing.assert_close(slots.accumulate(weights, base), expected, rtol=0, atol=float(3 * step))
    # A sampled read follows each feature's own scale.
    torch.testing.assert_close(slots.values(features=slice(None, None, 5)), slots.values()[..., ::5])


def test_an_int8_storage_keeps_module_inputs_in_the_features_dtype():
    storage = FeatureStorage(dtype=torch.int8)
    assert storage.quantized and storage.keep(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.bfloat16
