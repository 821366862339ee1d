"""The pack's cost per block on the weight files users load: ComfyUI's own
Flux loaded by core's UNETLoader from bf16, legacy scaled-fp8 and
int8_convrot files (benchmarks.overhead --weights), counted at FLUX.1-dev's
size. The limits are the core test's (tests/core/test_overhead_counts.py):
a skipped block's modulation rows are read once per run through the
format, so no format may cost a skipped block more than a bf16 file does.
Before the rows were read through the format, a skipped block on int8 or
fp8 weights ran its whole modulation layer: about 11.5 kernels and 14.5 R."""

from __future__ import annotations

import pytest

from benchmarks import quantized_files

# Not GGUF: ComfyUI-GGUF's layers turn their output back into a plain tensor
# with torch.Tensor(...), which fails under the counter's TorchDispatchMode.
# test_quantized_weights checks that its rows are read.
FORMATS = (quantized_files.BF16, quantized_files.FP8_SCALED, quantized_files.INT8_CONVROT)
LIMITS = {  # name: (kernels, traffic in R, host syncs), as in the core test
    "skipped block": (8, 6.0, 0),
    "computed block (pack's share)": (None, 6.0, 0),
}


@pytest.fixture(scope="module", params=FORMATS)
def counts(request, comfy, nodes, tmp_path_factory):
    from benchmarks import overhead

    reason = quantized_files.unavailable(request.param)
    if reason:
        pytest.skip(reason)
    build = overhead.ComfyFluxInFormat(request.param, str(tmp_path_factory.mktemp("diffusion_models")))
    return request.param, overhead.counts_at_flux_dev(8, build, overhead.NARROW_COMFY_FLUX)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_block_costs_stay_within_the_limits_on_every_format(counts, name):
    file_format, summary = counts
    kernels, traffic, syncs = LIMITS[name]
    cost = summary[name]
    print(f"{file_format} {name}: {cost.kernels:.3g} kernels, {cost.bytes:.2f} R, {cost.syncs:.3g} syncs")
    if kernels is not None:
        assert cost.kernels <= kernels, f"{file_format} {name}: {cost.kernels} kernels"
    assert cost.bytes <= traffic, f"{file_format} {name}: {cost.bytes:.2f} R of traffic"
    assert cost.syncs <= syncs, f"{file_format} {name}: {cost.syncs} host syncs"
