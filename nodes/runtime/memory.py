"""What memory a run's cache may take, read from ComfyUI's own queries, and
what ComfyUI is told about it (the memory plan itself is rfc_core.memory)."""

from __future__ import annotations

import contextlib
import logging

import torch

from ...rfc_core.memory import GIB, Budget

logger = logging.getLogger("ComfyUI-RFC")

# System memory the cache leaves to everything else: this share of the RAM,
# at least SYSTEM_MARGIN_MIN (ComfyUI's offloaded weights, the VAE and the
# text encoders come and go through it during a run).
SYSTEM_MARGIN_SHARE = 0.1
SYSTEM_MARGIN_MIN = 2 * GIB


def system_available() -> int | None:
    """Available system memory less the margin; None where it cannot be read."""
    try:
        import psutil

        memory = psutil.virtual_memory()
    except Exception:
        return None
    return max(0, memory.available - max(SYSTEM_MARGIN_MIN, int(SYSTEM_MARGIN_SHARE * memory.total)))


def dynamic_vram() -> bool:
    """Whether ComfyUI's Dynamic VRAM (comfy-aimdo) manages the weights: it
    evicts weights when PyTorch's allocator runs short instead of planning."""
    try:
        import comfy.memory_management

        return bool(getattr(comfy.memory_management, "aimdo_enabled", False))
    except Exception:
        return False


def device_available(device: torch.device, step_bytes: int) -> int | None:
    """What the device can give the cache without taking from the step or
    the weights it needs: free memory, less ComfyUI's estimate of the
    step's activations (`step_bytes`) and its own reserve. Under Dynamic
    VRAM only memory no weight holds counts as free, so the cache never
    makes ComfyUI evict weights. None where ComfyUI cannot be asked."""
    try:
        import comfy.model_management as model_management

        if device.type == "cuda" and dynamic_vram():
            free = torch.cuda.mem_get_info(device)[0]
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        else:
            free = model_management.get_free_memory(device)
        reserve = model_management.extra_reserved_memory()
    except Exception:
        return None
    return max(0, int(free) - int(step_bytes) - int(reserve))


def budget_for(device: torch.device, step_bytes: int, cap_gb: float) -> tuple[Budget, bool]:
    """The run's budget, and whether system memory is a place of its own
    (not where the model already is)."""
    cap = int(cap_gb * GIB) or None
    system = system_available()
    on_device = device_available(device, step_bytes)
    if device.type == "cpu":
        # The model's device is system memory: one budget, one place.
        limits = [b for b in (on_device, system) if b is not None]
        return Budget(device=min(limits) if limits else None, system=0, cap=cap), False
    return Budget(device=on_device, system=system, cap=cap), True


def step_estimate(model_patcher, noise_shape, conds) -> int:
    """ComfyUI's own estimate of a step's memory (what `prepare_sampling`
    loads the weights to leave free); 0 where it cannot be had."""
    try:
        import comfy.sampler_helpers

        return int(comfy.sampler_helpers.estimate_memory(model_patcher, noise_shape, conds)[0])
    except Exception:
        logger.debug("RFC: ComfyUI's memory estimate for the step could not be read", exc_info=True)
        return 0


@contextlib.contextmanager
def reserved_for_loading(device_bytes: int):
    """On ComfyUI's legacy loader, what the cache will take on the device is
    added to the memory it keeps free while it loads weights for this run,
    so it offloads weights instead of running out during sampling. Under
    Dynamic VRAM the loader does not plan, and the cache is planned into
    memory no weight holds instead (device_available)."""
    if device_bytes <= 0 or dynamic_vram():
        yield
        return
    import comfy.model_management as model_management

    before = model_management.EXTRA_RESERVED_VRAM
    model_management.EXTRA_RESERVED_VRAM = before + device_bytes
    try:
        yield
    finally:
        model_management.EXTRA_RESERVED_VRAM = before
