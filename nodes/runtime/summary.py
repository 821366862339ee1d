"""The run's account for the front-end: the strip the RFC Cache node draws."""

from __future__ import annotations

import logging
import sys

from ...rfc_core import RFCRun
from .settings import SUMMARY_EVENT

logger = logging.getLogger("ComfyUI-RFC")


def summary_message(node_id: str, summary: str, run: RFCRun, advice: str | None = None) -> dict:
    """What the front-end draws: one entry per model evaluation."""
    return {
        "node": node_id,
        "summary": summary,
        "advice": advice,
        "computed": run.computed_evaluations,
        "total": len(run.evaluations),
        "target_speedup": run.config.target_speedup,
        "peak_bytes": run.peak_bytes,
        "evaluations": [{"sigma": e.sigma, "computed": e.counts_as_computed, "accumulated": e.accumulated,
                         "threshold": e.threshold, "reason": e.reason} for e in run.evaluations],
    }


def send_summary(node_id: str | None, summary: str, run: RFCRun, advice: str | None = None) -> None:
    """Show the run on the node when a browser is listening; without a
    server (headless use, tests) there is nobody to tell."""
    server_module = sys.modules.get("server")
    prompt_server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if node_id is None or prompt_server is None:
        return
    try:
        prompt_server.send_sync(SUMMARY_EVENT, summary_message(node_id, summary, run, advice))
    except Exception:
        logger.debug("RFC: could not send the summary to the front-end", exc_info=True)
