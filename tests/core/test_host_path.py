"""The skipped block's host path (issue 32): what it does in fewer Python
steps gives what the longer way gave. CachedForward binds a block call
without Signature.bind where it can, the adapters look up groups and blocks
without listing them, and RFE's weights skip the grad-mode switch where
grad is already off."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from benchmarks.methods import PACK_NAME, load_pack
from benchmarks.tiny_flux import TinyFlux

load_pack()
adapters = sys.modules[f"{PACK_NAME}.nodes.adapters"]
base = sys.modules[f"{PACK_NAME}.nodes.adapters.base"]
runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
rfc_core = sys.modules[f"{PACK_NAME}.rfc_core"]
estimators = sys.modules[f"{PACK_NAME}.rfc_core.estimators"]


def block_forward(x, cap_mask=None, freqs_cis=None, adaln_input=None, timestep_zero_index=None):
    return x


def chained_patch(*args, **kwargs):  # another pack's object patch: takes anything
    return args[0]


def bound_arguments(function, args, kwargs):
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


CALLS = [
    ((1, 2, 3, 4, 5), {}),
    ((1,), {}),
    ((1, 2), {"adaln_input": 4}),
    ((1,), {"timestep_zero_index": 5, "cap_mask": 2}),
    ((), {"x": 1, "freqs_cis": 3}),
]


@pytest.mark.parametrize("args, kwargs", CALLS)
def test_cached_forward_binds_as_signature_bind(args, kwargs):
    entry = runtime.CachedForward("layer", 0, ("x",), block_forward)
    arguments = entry._bind(args, kwargs)
    expected = bound_arguments(block_forward, args, kwargs)
    assert arguments == expected
    assert list(arguments) == list(expected)  # in the parameters' order


@pytest.mark.parametrize("args, kwargs", CALLS)
def test_chained_patch_binds_by_the_block_signature(args, kwargs):
    entry = runtime.CachedForward("layer", 0, ("x",), chained_patch, block_forward=block_forward)
    assert entry._bind(args, kwargs) == bound_arguments(block_forward, args, kwargs)


def test_signature_without_fast_binding_falls_back():
    entry = runtime.CachedForward("layer", 0, ("x",), chained_patch)
    assert entry._names is None
    assert entry._bind((1, 2), {"a": 3}) == bound_arguments(chained_patch, (1, 2), {"a": 3})


@pytest.mark.parametrize("args, kwargs", [((1, 2, 3, 4, 5, 6), {}), ((1,), {"x": 2}), ((1,), {"unknown": 2}),
                                          ((), {})])
def test_calls_that_do_not_fit_raise_as_before(args, kwargs):
    entry = runtime.CachedForward("layer", 0, ("x",), block_forward)
    with pytest.raises(TypeError):
        entry._bind(args, kwargs)


def tiny_flux():
    return TinyFlux({"in_channels": 4, "out_channels": 4, "vec_in_dim": 8, "context_in_dim": 8, "hidden_size": 32,
                     "mlp_ratio": 2.0, "num_heads": 2, "depth": 3, "depth_single_blocks": 4, "axes_dim": [4, 6, 6],
                     "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False})


def test_block_lookup_matches_the_listed_blocks():
    model = tiny_flux()
    adapter = adapters.adapter_for("flux")
    for kind, attribute in (("double_block", "double_blocks"), ("single_block", "single_blocks")):
        listed = list(getattr(model, attribute))
        for index in range(-len(listed), len(listed)):
            assert adapter.block(model, kind, index) is listed[index]
        with pytest.raises(IndexError):
            adapter.block(model, kind, len(listed))
    with pytest.raises(KeyError):
        adapter.group("no such kind")


def test_block_lookup_in_a_module_dict():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleDict({"b": torch.nn.Linear(1, 1), "a": torch.nn.Linear(1, 1)})

    class DictAdapter(base.BlockAdapter):
        block_groups = (base.BlockGroup("block", "blocks", ("x",)),)

    model, adapter = Model(), DictAdapter()
    assert adapter.block(model, "block", 1) is model.blocks["a"]
    # A group table set on the instance replaces the class's.
    adapter.block_groups = (base.BlockGroup("other", "blocks", ("x",)),)
    assert adapter.block(model, "other", 0) is model.blocks["b"]
    with pytest.raises(KeyError):
        adapter.group("block")


def rfe_with_history(order=1):
    torch.manual_seed(0)
    estimator = estimators.RelationalEstimator(order)
    for sigma in (1.0, 0.9, 0.8):
        module_input = torch.randn(2, 3, 5)
        estimator.update(sigma, [torch.randn(2, 40)], module_input)
    return estimator


@pytest.mark.parametrize("order", [1, 2])
def test_rfe_weights_alike_with_and_without_grad(order):
    estimator = rfe_with_history(order)
    module_input = torch.randn(2, 3, 5)
    with torch.no_grad():
        without = estimator.weights(0.7, module_input).clone()
    with torch.enable_grad():
        with_grad = estimator.weights(0.7, module_input.requires_grad_())
    assert not with_grad.requires_grad
    assert torch.equal(without, with_grad)
