"""The host's share of a dataset-prompt training step: Python and dispatch work per layer, measured without a GPU.

On the H100 the eager training step was bound by the host (110-150 ms a step at batch 1, 4 and 8 alike; see
docs/PERFORMANCE.md): what the host does per step, not the arithmetic, set its speed. That work depends on the
UNet's topology (how many layers, how many calls), not on its widths, so this script times each method's step with
SD 1.5's topology (4 resolution levels, 2 resnets and transformer blocks per level, 12 text-encoder layers) at tiny
widths on the CPU, where the arithmetic is next to nothing and what is left is the host's part. dyod's frozen layers
(``dyod.frozen_layers``) and the checkpointing settings run Python of their own (custom autograd functions,
checkpoint bookkeeping); this shows what that costs. It is a proxy: a CUDA kernel launch costs the host more than a
tiny CPU kernel, and the GPU rows of ``sd15_speed.py`` (eager and CUDA graphs, with and without the frozen layers)
measure the real thing.

    python benchmarks/host_overhead.py            # about a minute on 2 CPU cores
    python benchmarks/host_overhead.py --steps 2  # a quick run (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sd15_speed  # noqa: E402  (the same step builders)

# SD 1.5's UNet topology (UNet2DConditionModel's defaults) and text-encoder depth, every width as small as group norm
# allows; latents 16 x 16 keep the coarsest level at 2 x 2
TOPOLOGY = dataclasses.replace(
    sd15_speed.TINY, resolution=32, vae=dict(sd15_speed.TINY.vae, sample_size=32),
    unet=dict(sample_size=16, cross_attention_dim=32, block_out_channels=(32, 32, 32, 32), attention_head_dim=8),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=12,
              max_position_embeddings=77),
)

# name -> (builder, options); the first is the peer every ratio is against
METHODS = {
    "diffusers example": ("peer", {}),
    "dyod with autograd's own frozen layers (before)": ("dyod", {"lean_layers": False}),
    "dyod": ("dyod", {}),
    **{f"dyod + checkpointing {sd15_speed.checkpointing_label(s)}": ("dyod", {"gradient_checkpointing": s})
       for s in ("feed-forward", "1")},
}


def build_steps(model: Path, batch: int) -> dict:
    device = torch.device("cpu")
    steps = {}
    for name, (builder, options) in METHODS.items():
        if builder == "peer":
            steps[name] = sd15_speed.peer_training_step(model, batch, device, torch.float32, "no")
        else:
            steps[name] = sd15_speed.dyod_training_step(model, batch, device, torch.float32, "no", **options)
        for _ in range(3):  # warm-up: AdamW's state, the allocator's blocks
            steps[name]()
    return steps


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round (default 40)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds, each timing every method once in turn; the table gives the median (default 5)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host's work is one thread's
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = sd15_speed.build_model(Path(tmp) / "sd15-topology", TOPOLOGY, torch.device("cpu"))
            steps = build_steps(model, args.batch)
            times = {name: [] for name in steps}
            for _ in range(args.rounds):  # interleaved, so that a slow moment of the machine hits every method alike
                for name, step in steps.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[name].append((time.perf_counter() - start) / args.steps)
    finally:  # called in-process (the test): the caller's thread count, which its numbers depend on, comes back
        torch.set_num_threads(threads)
    medians = {name: statistics.median(t) for name, t in times.items()}
    peer = medians[next(iter(METHODS))]
    lines = [f"host time of one training step, SD-1.5 topology at tiny widths on the CPU (batch {args.batch}, one "
             f"thread, median of {args.rounds} rounds of {args.steps} steps); torch {torch.__version__}", "",
             "| method | ms per step | vs peer | spread over rounds (ms) |", "|---|---|---|---|"]
    for name, median in medians.items():
        lines.append(f"| {name} | {1e3 * median:.1f} | ×{median / peer:.2f} | "
                     f"{1e3 * min(times[name]):.1f}–{1e3 * max(times[name]):.1f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
