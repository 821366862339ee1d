"""The model call in progress on this thread, which blocks reach their
session through: some families pass blocks no transformer options."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, NamedTuple

import torch

from .settings import SESSION_KEY

if TYPE_CHECKING:
    from .session import SamplingSession


class ActiveCall(NamedTuple):
    """The model call in progress on this thread: its session (None when the
    run is not cached), its transformer options, and the diffusion model
    running it, which under core's MultiGPU node is the device's own clone."""

    session: SamplingSession | None
    transformer_options: dict
    diffusion_model: torch.nn.Module | None


# Set by the APPLY_MODEL wrapper, so blocks of families whose block arguments
# carry no transformer options (HunyuanDiT, Wan S2V, PixArt, object-patched
# blocks) still find their session, and every block finds the model it runs
# in. A context variable: each of MultiGPU's worker threads has its own.
_ACTIVE_CALL: ContextVar[ActiveCall | None] = ContextVar("rfc_active_call", default=None)


def active_diffusion_model():
    active = _ACTIVE_CALL.get()
    return None if active is None else active.diffusion_model


def session_for(args: dict) -> tuple[SamplingSession | None, dict]:
    transformer_options = args.get("transformer_options")
    if isinstance(transformer_options, dict) and SESSION_KEY in transformer_options:
        return transformer_options[SESSION_KEY], transformer_options
    active = _ACTIVE_CALL.get()
    if active is None or active.session is None:
        return None, {}
    return active.session, active.transformer_options
