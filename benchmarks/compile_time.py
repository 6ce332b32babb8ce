"""How long ``torch.compile`` takes before the first batch, measured without a GPU.

`--compile` costs a minute of compilation on an H100 before the first SD-1.5 batch (docs/PERFORMANCE.md). That time
goes into tracing the graph and generating its kernels, and depends on the UNet's topology (how many layers), not on
its widths, so this script compiles SD 1.5's topology at tiny widths (``host_overhead.TOPOLOGY``) with inductor on the
CPU, each method in a process of its own:

* the whole UNet with an empty inductor cache (what a first run on a machine does, and what dyod does);
* the whole UNet again in a new process with the cache the first one left (inductor keeps its compiled graphs and
  kernels on disk, ``TORCHINDUCTOR_CACHE_DIR``, by default under /tmp: a later run on the same machine);
* the transformer blocks alone (diffusers' ``compile_repeated_blocks``: one compilation serves every block of a
  shape, the rest of the UNet runs eager), with an empty cache.

The CPU's kernels are C++, a GPU's are Triton's, so the seconds differ there; the ratios show where compile time goes.

    python benchmarks/compile_time.py            # about 3 minutes on 2 CPU cores
    python benchmarks/compile_time.py --tiny     # a two-level toy UNet (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {  # name -> (what compiles, whether the cache is the previous method's)
    "whole UNet, empty cache (peer)": ("whole", False),
    "whole UNet, the cache of the run before (a later run)": ("whole", True),
    "transformer blocks only (compile_repeated_blocks), empty cache": ("blocks", False),
}


def child(scope: str, tiny: bool, calls: int) -> dict:
    """In this process: build the UNet, compile it, time the first call (compiling) and the calls after it."""
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(HERE))
    import host_overhead
    import sd15_speed

    shapes = sd15_speed.TINY if tiny else host_overhead.TOPOLOGY
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shapes.unet).eval().requires_grad_(False)
    side = shapes.unet["sample_size"]
    x, t = torch.randn(2, 4, side, side), torch.tensor(500)
    context = torch.randn(2, 77, shapes.unet["cross_attention_dim"])
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context).sample
        if scope == "whole":
            unet = torch.compile(unet, fullgraph=True, dynamic=False)
        else:
            unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
        start = time.perf_counter()
        out = unet(x, t, encoder_hidden_states=context).sample
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            unet(x, t, encoder_hidden_states=context)
        after = (time.perf_counter() - start) / calls
    return {"first_call_s": first, "ms_per_call": 1e3 * after, "max_abs_difference_vs_eager": float((out - expected).abs().max())}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a two-level toy UNet (quick; the test)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls after the first (default 10)")
    parser.add_argument("--child", choices=("whole", "blocks"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tiny, args.calls)))
        return ""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = None
        for i, (name, (scope, warm)) in enumerate(METHODS.items()):
            if not warm:
                cache = Path(tmp) / f"cache-{i}"  # an empty inductor cache
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
            command = [sys.executable, __file__, "--child", scope, "--calls", str(args.calls)] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    peer = results[next(iter(METHODS))]["first_call_s"]
    lines = [f"torch.compile (inductor) of the {'toy' if args.tiny else 'SD-1.5-topology'} UNet at tiny widths on the CPU, "
             f"forward under no-grad, batch 2, each method in its own process; torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}", "",
             "| method | first call, compiling (s) | vs peer | ms per call after | max difference vs eager |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['first_call_s']:.1f} | ×{r['first_call_s'] / peer:.2f} | {r['ms_per_call']:.1f} | "
                     f"{r['max_abs_difference_vs_eager']:.1e} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
