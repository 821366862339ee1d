"""cache_device and cache_dtype: what is kept, where, and that forecasts survive it."""

import pytest
import torch

from rfc_core import CacheConfig, FeatureHistory, RFCRun
from rfc_core.storage import FeatureStorage, storage_for

FIRST = ("block", 0)


def drive(run, steps=8):
    outputs = []
    for i in range(steps):
        sigma = 1.0 - i / steps
        run.start_evaluation(sigma)
        module_input = torch.full((2, 32), 1.0 + sigma)
        residual = run.predict("chunk", FIRST, module_input)
        if residual is None:
            residual = module_input * sigma
            run.record("chunk", FIRST, module_input, residual)
        outputs.append(residual)
    return outputs


def test_a_half_precision_cache_halves_the_peak_and_keeps_the_forecast():
    config = dict(threshold=0.5, max_skip=2, order=1)
    full = RFCRun(CacheConfig(**config), FIRST)
    half = RFCRun(CacheConfig(**config, cache_dtype="float16"), FIRST, storage=storage_for("auto", "float16"))
    full_outputs, half_outputs = drive(full), drive(half)
    assert [e.computed for e in full.evaluations] == [e.computed for e in half.evaluations]
    assert not all(e.computed for e in half.evaluations)
    assert half.peak_bytes * 2 == full.peak_bytes
    for a, b in zip(full_outputs, half_outputs):
        assert b.dtype == torch.float32  # handed back in the model's dtype
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_a_float32_cache_forecasts_in_float32():
    history = FeatureHistory(1, FeatureStorage(dtype=torch.float32))
    history.push(1.0, [torch.tensor([1.0], dtype=torch.bfloat16)])
    history.push(0.999, [torch.tensor([1.0078125], dtype=torch.bfloat16)])
    assert history.values[0].dtype == torch.float32
    assert history.forecast(0.998)[0].item() == pytest.approx(1.015625, rel=1e-5)
    base = torch.zeros(1, 1, dtype=torch.bfloat16)
    assert history.combine(history.weights_by_slot(0.998), [base])[0].dtype == torch.bfloat16


def test_finishing_a_run_releases_every_cached_tensor():
    run = RFCRun(CacheConfig(threshold=0.5, max_skip=2), FIRST)
    drive(run)
    assert run.cache_bytes() > 0
    run.finish()
    assert run.cache_bytes() == 0 and not run.chunks
    assert run.peak_bytes > 0
    assert "cache peak" in run.summary()


@pytest.mark.parametrize("widget, value", [("cache_device", "gpu"), ("cache_dtype", "int4")])
def test_unknown_storage_names_the_widget(widget, value):
    with pytest.raises(ValueError, match=f"'{widget}' must be one of"):
        CacheConfig(**{widget: value})
