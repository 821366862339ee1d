"""RFC under sequence parallelism, simulated: two CPU processes
(torch.distributed, gloo) each hold half of every hidden stream's tokens, as
with Raylight's or xDiT's Ulysses and ring attention, and sample the
bundled model through the pack's own runtime.

Each rank's cache sees only its slice: its module inputs, its residuals.
What would let the ranks drift apart is the decision (RCS's forecast error)
and RFE's norms, both sums over tokens; the session is given the ranks' sum
(`rank_sum`, an all-reduce) and takes them over every rank's tokens, so each
rank takes the decisions and the relational steps one unsplit run takes. A
block only communicates when it is computed (here: gather the streams, run
the block, keep this rank's slice), so if the ranks ever disagreed on a
decision their collectives would not match: equal decisions are a
requirement, not a nicety.

How a sequence-parallel pack calls it, inside ComfyUI: put the sum in the
model's transformer options before sampling,

    def rank_sum(t):
        t = t.clone()
        torch.distributed.all_reduce(t, group=sequence_group)
        return t

    model.model_options["transformer_options"]["rfc_cache_rank_sum"] = rank_sum

and run RFC Cache's block patches on the sharded streams (what its blocks
receive is each rank's slice).

    python -m benchmarks.sequence_parallel      # a few seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .methods import StandaloneSampler, rfc_core
from .run import sample_set
from .tiny_flux import load_bundled

WORLD = 2
STREAMS = {"double_block": ("img", "txt"), "single_block": ("img",)}


def token_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=1)[rank].contiguous()


def gather_tokens(t: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def rank_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


class TokenSlicedBlock:
    """One block as a sequence-parallel model runs it: the cache entry gets
    this rank's slice of the streams; the block itself, when computed,
    gathers every rank's slice and returns this rank's part. The unsplit
    model around it gets the whole streams back."""

    def __init__(self, entry, rank: int, world: int):
        self.entry, self.rank, self.world = entry, rank, world
        self.streams = STREAMS[entry.kind]

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]

        def block(sliced_args):
            whole = dict(sliced_args, **{name: gather_tokens(sliced_args[name], self.world) for name in self.streams})
            return {name: token_slice(value, self.rank, self.world) for name, value in original(whole).items()}

        sliced = dict(args, **{name: token_slice(args[name], self.rank, self.world) for name in self.streams})
        out = self.entry(sliced, {"original_block": block})
        return {name: gather_tokens(value, self.world) for name, value in out.items()}


def sampler(samples: int, steps: int) -> StandaloneSampler:
    model, encoder, _ = load_bundled()
    labels, seeds = sample_set(samples, len(encoder.names))
    return StandaloneSampler(model, encoder, labels, seeds, steps, cfg=3.0)


def unsplit_run(samples: int, steps: int, threshold: float):
    """The same run on one rank (its rank sum is the tensor itself, so the
    cache takes the sequence-parallel path: trust over every feature)."""
    config = rfc_core().CacheConfig(threshold=threshold, max_skip=3)
    with torch.no_grad():
        return sampler(samples, steps)._run_blocks(config, 0.0, rank_sum=lambda t: t)


def _rank(rank: int, world: int, rendezvous: str, samples: int, steps: int, threshold: float, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        config = rfc_core().CacheConfig(threshold=threshold, max_skip=3)
        with torch.no_grad():
            result = sampler(samples, steps)._run_blocks(
                config, 0.0, wrap=lambda entry: TokenSlicedBlock(entry, rank, world), rank_sum=rank_sum)
        torch.save({"latent": result.latent, "computed": result.computed, "block_calls": result.block_calls},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def split_run(samples: int, steps: int, threshold: float, world: int = WORLD) -> list[dict]:
    """Each rank's final latent (gathered, so whole), decisions and block calls."""
    with tempfile.TemporaryDirectory() as directory:
        rendezvous = str(Path(directory) / "rendezvous")
        mp.spawn(_rank, args=(world, rendezvous, samples, steps, threshold, directory), nprocs=world, join=True)
        return [torch.load(Path(directory) / f"rank{rank}.pt") for rank in range(world)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args(argv)
    whole = unsplit_run(args.samples, args.steps, args.threshold)
    ranks = split_run(args.samples, args.steps, args.threshold)
    print("| run | computed evaluations | block calls | max difference to the unsplit latent |")
    print("|---|---|---|---|")
    print(f"| unsplit | {sum(whole.computed)} of {len(whole.computed)} | {whole.block_calls} | - |")
    for rank, result in enumerate(ranks):
        difference = (result["latent"] - whole.latent).abs().max().item()
        same = "same decisions" if tuple(result["computed"]) == whole.computed else "DIFFERENT decisions"
        print(f"| rank {rank} of {WORLD} ({same}) | {sum(result['computed'])} of {len(result['computed'])} | "
              f"{result['block_calls']} | {difference:.2e} |")


if __name__ == "__main__":
    main()
