"""MiniMax H3: which module inputs scale each stream's forecast best, measured
on ComfyUI's own MiniMax H3 class at tiny size with random weights (no
trained MiniMax H3 fits here).

Three ways to cache a block's packed rows are compared at the same compute:

- streams: the adapter as shipped: video, audio and the text and
  conditioning prefix cached as three modules; the video's and the prefix's
  module inputs cover their own rows, the audio's the audio and video rows;
- own rows: the same three modules, the audio's module input its own rows
  only (every stream scaled by its own segments alone);
- one module: the block's rows as one module, its module input the target
  audio and video rows together (one RFE scale for everything).

Each runs 30 euler steps at cfg 3 with a speedup target of 2 and 3 and with
threshold 0.1, on three seeds. The error of each latent, video and audio
apart, is taken relative to how far the uncached run moved it from its
noise. Block weights are scaled up (--gain, default 3) so that the blocks,
not the skip connections, make the output, as in a trained model.

    COMFYUI_PATH=/path/to/ComfyUI-v0.31 python -m benchmarks.minimax_streams   # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HOST_TESTS = Path(__file__).resolve().parents[1] / "tests" / "host"
SETTINGS = ({"target_speedup": 2.0}, {"target_speedup": 3.0}, {"threshold": 0.1})
VIDEO, AUDIO = (24, 6, 8, 8), (32, 2, 40)


def variants(nodes):
    """The adapters to compare, by name."""
    from family_harness import pack_module

    minimax = pack_module(nodes, "nodes.adapters.minimax_h3")
    base = pack_module(nodes, "nodes.adapters.base")
    shipped = minimax.ADAPTERS[0]

    class OwnRows(minimax.MiniMaxH3Adapter):
        module_input_rows = {name: (name,) for name in minimax.STREAMS}

    class OneModule(minimax.MiniMaxH3Adapter):
        block_groups = (base.BlockGroup("double_block", "blocks", ("img",)),)

        def read_streams(self, kind, values):
            return {"img": values["img"].unsqueeze(0)}

        def write_streams(self, kind, streams):
            return {"img": streams["img"][0]}

        def module_input(self, diffusion_model, kind, index, args):
            return super().module_input(diffusion_model, kind, index, args, stream="audio")

        def sampled_module_input(self, diffusion_model, kind, index, args):
            return super().sampled_module_input(diffusion_model, kind, index, args, stream="audio")

    return {"streams": shipped, "own rows": OwnRows(), "one module": OneModule()}


def use(nodes, adapter) -> None:
    """Make `adapter` the one the node detects for MiniMax H3."""
    from family_harness import pack_module

    adapters = pack_module(nodes, "nodes.adapters")
    adapters.ADAPTERS = tuple(adapter if known.family == adapter.family else known for known in adapters.ADAPTERS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gain", type=float, default=3.0, help="scale of the blocks' attention and MLP weights")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI v0.31 (or later) tree")
    sys.path.insert(0, str(HOST_TESTS))
    from benchmarks.host import boot_comfyui

    torch.set_num_threads(1)
    nodes = boot_comfyui(comfyui_path)
    import test_family_minimax_h3 as minimax_tests
    from family_harness import rfc, sample_spec
    from tiny_models import build

    compared = variants(nodes)
    spec = minimax_tests.spec(video=VIDEO, audio=AUDIO)
    video = torch.Size(VIDEO).numel()
    print(f"relative error (video / audio), gain {args.gain}, 30 steps, cfg 3")
    print(f"{'seed':>4} {'setting':>18} " + " ".join(f"{name:>19}" for name in compared))
    try:
        for seed in range(args.seeds):
            model = build("MiniMaxH3", minimax_tests.CONFIG, seed=seed)
            minimax_tests.fill_inv_freq(model.model.diffusion_model)
            with torch.no_grad():
                for name, parameter in model.model.diffusion_model.blocks.named_parameters():
                    if "adaln" not in name and "norm" not in name:
                        parameter.mul_(args.gain)
            reference = sample_spec(spec, model, steps=30, cfg=3.0, seed=seed)
            noise = torch.cat([t.reshape(1, -1) for t in spec.latent(1, seed)[1].unbind()], dim=1)
            moved = reference - noise
            for setting in SETTINGS:
                cells = []
                for adapter in compared.values():
                    use(nodes, adapter)
                    latent = sample_spec(spec, rfc(nodes, model, **setting), steps=30, cfg=3.0, seed=seed)
                    errors = [((latent[:, part] - reference[:, part]).norm() / moved[:, part].norm()).item()
                              for part in (slice(None, video), slice(video, None))]
                    cells.append("{:.2e} / {:.2e}".format(*errors))
                label = ", ".join(f"{key} {value:g}" for key, value in setting.items())
                print(f"{seed:>4} {label:>18} " + " ".join(f"{cell:>19}" for cell in cells), flush=True)
    finally:
        use(nodes, compared["streams"])


if __name__ == "__main__":
    main()
