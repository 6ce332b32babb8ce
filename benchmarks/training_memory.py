"""Peak memory of one dataset-prompt training step at Stable Diffusion 1.5 scale, measured without a GPU.

What a training step needs above the weights it keeps on the device is the activations autograd saves for the
backward pass and the step's transient buffers. Those are the same tensors, of the same sizes, on any device (the
attention kernel keeps its output and log-sum-exp on the CPU as the CUDA flash kernel does), so they can be measured on
the CPU: each method's step, the same code ``sd15_speed.py`` times on a GPU, runs in bf16 with randomly initialized
SD-1.5-shaped components in a process of its own, and the process's peak resident memory is read (Linux ``VmHWM``,
reset after a warm-up step; large allocations are memory-mapped, so they go back to the system when freed,
``MALLOC_MMAP_THRESHOLD_``). Two batch sizes give the memory per image; the table projects batch 8:

    projected peak = weights and optimizer state on the device + (step peak at batch b1) + (8 - b1) × per image

What it leaves out: the CUDA context (not in ``torch.cuda.max_memory_allocated`` either), the caching allocator's
rounding and cuDNN's workspaces. On the H100 (docs/PERFORMANCE.md) the old dyod step measured 8.31 GiB at batch 8 and
the peer 8.24; the peer's row and the old step's (docs/results/training_memory_cpu_run1.md, measured before the text
encoder's linear layers were stored in bf16) show how close the projection comes.

    python benchmarks/training_memory.py              # SD-1.5 shapes, 512 px; about 10 minutes on 2 CPU cores
    python benchmarks/training_memory.py --tiny       # toy shapes (the same code; used by a test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sd15_speed  # noqa: E402  (the same step builders and model shapes)

# name -> (builder, options); the first is the peer every ratio is against
METHODS = {
    "diffusers example": ("peer", {}),
    "dyod": ("dyod", {}),
    "dyod with autograd's own frozen layers (before)": ("dyod", {"lean_layers": False}),
    **{f"dyod + checkpointing {sd15_speed.checkpointing_label(setting)}": ("dyod", {"gradient_checkpointing": setting})
       for setting in ("feed-forward", "1", "2", "all")},
    # not by default: inductor compiles the step on the CPU for minutes, and its CPU kernels are not the GPU's
    "dyod + torch.compile(default)": ("dyod", {"compile_mode": "default"}),
    **{f"dyod + torch.compile(default) + checkpointing {sd15_speed.checkpointing_label(setting)}": (
           "dyod", {"compile_mode": "default", "gradient_checkpointing": setting})
       for setting in ("feed-forward", "1")},
}
DEFAULT_METHODS = [m for m in METHODS if "compile" not in m]
SMALL = sd15_speed.Shapes(  # tiny widths at a real latent size: activations dominate, as at full scale
    resolution=128,
    unet=dict(sample_size=64, cross_attention_dim=32, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              attention_head_dim=8),
    text=sd15_speed.TINY.text,
    vae=dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=128,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    batch=2, train_batches=(1, 2), iters=1, train_iters=1,
)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(model: Path, method: str, batch: int) -> dict:
    """One method's step at one batch size, in this (fresh) process; returns its memory in bytes."""
    kind, options = METHODS[method]
    device, half = torch.device("cpu"), torch.bfloat16
    torch.manual_seed(0)
    if kind == "peer":
        step = sd15_speed.peer_training_step(model, batch, device, half, "bf16")
    else:
        step = sd15_speed.dyod_training_step(model, batch, device, half, "bf16", **options)
    step()  # warm-up: the optimizer's state and the first gradients exist from here on
    gc.collect()
    _reset_peak()
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    state = [t for s in step.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    on_device = [t for m in step.on_device for t in [*m.parameters(), *m.buffers()]]
    resident = _tensor_bytes(on_device + state) + getattr(step, "extra_bytes", 0)
    return {"method": method, "batch": batch, "resident_bytes": resident, "step_peak_bytes": peak - before,
            "step_s": seconds}


def saved_for_backward(loss: torch.Tensor, exclude: set[int]) -> dict[str, int]:
    """Bytes the autograd graph behind ``loss`` keeps for the backward pass, by the operation that keeps them (each
    storage counted once, the frozen weights in ``exclude`` left out)."""
    seen_nodes, seen_storages, by_op = set(), set(exclude), {}
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        # built-in operations expose each saved tensor as _saved_<name>; custom autograd Functions as saved_tensors
        names = [a for a in dir(node) if a.startswith("_saved_")] or (["saved_tensors"] if hasattr(node, "saved_tensors") else [])
        for attr in names:
            try:
                values = getattr(node, attr)
            except RuntimeError:  # freed or not accessible
                continue
            for value in values if isinstance(values, (tuple, list)) else (values,):
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen_storages:
                    seen_storages.add(value.untyped_storage().data_ptr())
                    op = type(node).__name__.removesuffix("Backward0").removesuffix("Backward").lstrip("_")
                    key = op + "." + attr.removeprefix("_saved_")
                    by_op[key] = by_op.get(key, 0) + value.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def breakdown(shapes: sd15_speed.Shapes) -> str:
    """What one eager bf16 step of the frozen UNet keeps for the gradient reaching the text condition, by operation,
    at a quarter of the latent area (one image); and the forward FLOPs of each resolution level (on the meta device:
    no arithmetic), which is what checkpointing that level recomputes."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from dyod.frozen_layers import keep_less_for_backward

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shapes.unet).to(torch.bfloat16).requires_grad_(False)
    side = shapes.unet["sample_size"] // 2
    x = torch.randn(1, 4, side, side, dtype=torch.bfloat16)
    context = torch.randn(1, 77, shapes.unet["cross_attention_dim"], dtype=torch.bfloat16, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def kept() -> dict[str, int]:
        out = unet(x, torch.tensor([500]), encoder_hidden_states=context)
        return saved_for_backward(out.sample.float().pow(2).mean(), weights)

    plain = kept()
    keep_less_for_backward(unet)  # what dyod's step runs (dyod.frozen_layers)
    lean = kept()
    total, lean_total = sum(plain.values()), sum(lean.values())
    lines = [f"kept for the backward pass, one image, {side} x {side} latents, bf16: {total / 2**20:.1f} MiB with "
             f"autograd's own layers, {lean_total / 2**20:.1f} MiB with dyod's frozen layers "
             f"(x {(shapes.unet['sample_size'] // side) ** 2} at {shapes.unet['sample_size']} x "
             f"{shapes.unet['sample_size']}: {total * 4 / 2**20:.0f} and {lean_total * 4 / 2**20:.0f} MiB)", "",
             "| operation . saved tensor | MiB | share | MiB with dyod's frozen layers |", "|---|---|---|---|"]
    ops = list(plain) + [op for op in lean if op not in plain]
    lines += [f"| {op} | {plain.get(op, 0) / 2**20:.1f} | {100 * plain.get(op, 0) / total:.1f} % | "
              f"{lean.get(op, 0) / 2**20:.1f} |" for op in ops if max(plain.get(op, 0), lean.get(op, 0)) / total >= 0.001]

    with torch.device("meta"):
        meta_unet = UNet2DConditionModel(**shapes.unet).requires_grad_(False)  # frozen: input gradients only
        size = shapes.unet["sample_size"]
        x = torch.randn(1, 4, size, size)
        ctx = torch.randn(1, 77, shapes.unet["cross_attention_dim"], requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            pred = meta_unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        with FlopCounterMode(display=False) as backward_counter:  # input gradients only: the weights are frozen
            pred.sum().backward()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    whole = counts["UNet2DConditionModel"]
    backward = backward_counter.get_total_flops()
    n = len(meta_unet.down_blocks)
    lines += ["", f"forward FLOPs by resolution level, {size} x {size} latents ({whole / 1e12:.3f} TFLOP per image; the "
              f"backward pass to the text condition {backward / 1e12:.3f}, x{backward / whole:.2f}; checkpointing a "
              "level adds its share of the forward to the step):", "",
              "| level | blocks | share of the forward FLOPs | added to a step |", "|---|---|---|---|"]
    for level in range(n):
        names = [f"UNet2DConditionModel.down_blocks.{level}", f"UNet2DConditionModel.up_blocks.{n - 1 - level}"]
        share = sum(counts.get(name, 0) for name in names) / whole
        lines.append(f"| {level + 1} ({size >> level} x {size >> level}) | down_blocks[{level}], up_blocks[{n - 1 - level}] "
                     f"| {100 * share:.1f} % | +{100 * share * whole / (whole + backward):.1f} % |")
    middle = counts.get("UNet2DConditionModel.mid_block", 0) / whole
    lines.append(f"| middle | mid_block | {100 * middle:.1f} % | +{100 * middle * whole / (whole + backward):.1f} % |")
    return "\n".join(lines)


def measure(model: Path, method: str, batch: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", method, str(batch), "--model", str(model)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "batch": batch, "error": tail[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], batches: tuple[int, int], target_batch: int = 8) -> list[dict]:
    """Per method: resident weights, the step's peak at each batch, per image, and the projection to ``target_batch``."""
    out = []
    b1, b2 = batches
    for method in METHODS:
        by_batch = {r["batch"]: r for r in rows if r["method"] == method}
        if any("error" in by_batch.get(b, {"error": "missing"}) for b in batches):
            errors = [by_batch.get(b, {}).get("error", "not run") for b in batches]
            out.append({"method": method, "error": "; ".join(dict.fromkeys(errors))})
            continue
        per_image = (by_batch[b2]["step_peak_bytes"] - by_batch[b1]["step_peak_bytes"]) / (b2 - b1)
        resident = by_batch[b1]["resident_bytes"]
        projected = resident + by_batch[b1]["step_peak_bytes"] + (target_batch - b1) * per_image
        out.append({"method": method, "resident_bytes": resident,
                    "step_peak_bytes": {b: by_batch[b]["step_peak_bytes"] for b in batches},
                    "per_image_bytes": per_image, "projected_bytes": projected, "target_batch": target_batch,
                    "step_s": {b: by_batch[b]["step_s"] for b in batches}})
    return out


def table(summary: list[dict], batches: tuple[int, int], unit: float, unit_name: str) -> str:
    b1, b2 = batches
    target = next((s["target_batch"] for s in summary if "error" not in s), 8)
    lines = [f"| method | weights + optimizer on device ({unit_name}) | step peak at batch {b1} | at batch {b2} | "
             f"per image | projected peak at batch {target} ({unit_name}) | vs peer | CPU s per step (batch {b2}) |",
             "|---|---|---|---|---|---|---|---|"]
    peer = summary[0].get("projected_bytes") if summary and summary[0]["method"] == "diffusers example" else None
    for s in summary:
        if "error" in s:
            lines.append(f"| {s['method']} | {s['error']} | | | | | | |")
            continue
        ratio = f"×{s['projected_bytes'] / peer:.2f}" if peer else "-"
        peaks = s["step_peak_bytes"]
        lines.append(f"| {s['method']} | {s['resident_bytes'] / unit:.2f} | {peaks[b1] / unit:.2f} | "
                     f"{peaks[b2] / unit:.2f} | {s['per_image_bytes'] / unit:.3f} | **{s['projected_bytes'] / unit:.2f}** | "
                     f"{ratio} | {s['step_s'][b2]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths at a 64 × 64 latent (seconds, for the test)")
    parser.add_argument("--batches", default="1,2", help="the two batch sizes measured (default 1,2)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of: {', '.join(METHODS)} (default: all but the compiled ones)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: what an eager step keeps for its backward pass, by operation, and the share of "
                             "the UNet's forward FLOPs in each resolution level (quick: one step at 32 x 32 latents)")
    parser.add_argument("--json", default=None, help="also write the rows and the summary as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Path(args.model), args.worker[0], int(args.worker[1]))))
        return ""
    if args.breakdown:
        text = breakdown(SMALL if args.tiny else sd15_speed.SD15)
        print(text)
        return text
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("training_memory.py reads peak memory from Linux's /proc; run it on Linux")
    batches = tuple(int(x) for x in args.batches.split(","))
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if len(batches) != 2 or batches[0] >= batches[1] or unknown:
        raise SystemExit(f"--batches takes two increasing sizes and --methods names from {list(METHODS)}")
    shapes = SMALL if args.tiny else sd15_speed.SD15
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = sd15_speed.build_model(Path(tmp) / "model", shapes, torch.device("cpu"))
        for method in methods:
            for batch in batches:
                rows.append(measure(model, method, batch))
                print("row:", json.dumps(rows[-1]), flush=True)
    summary = [s for s in summarize(rows, batches) if s["method"] in methods]
    unit, unit_name = (2**20, "MiB") if args.tiny else (2**30, "GiB")
    text = (f"peak memory of one dataset-prompt step, measured on the CPU in bf16 "
            f"({'tiny widths, 64 × 64 latents' if args.tiny else 'SD-1.5 shapes, 512 px'}); torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - start:.0f} s\n\n"
            f"{table(summary, batches, unit, unit_name)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print(text)
    return text


if __name__ == "__main__":
    main()
