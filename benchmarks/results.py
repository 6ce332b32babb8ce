"""The results page: DYOD's t0 sweep (the paper's Table 1) on every bundled dataset with the bundled prior.

    .venv/bin/python benchmarks/results.py [--out docs] [--n-images 1000] [--n-samples 200]

For each dataset: make it, fit DYOD (dataset prompt + custom VAE), sweep t0 against both baselines, and write
docs/RESULTS.md with tables, plots, sample grids, seeds, commands, hardware and wall time."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dyod import InversionConfig, SampleConfig, VAEConfig
from dyod.inversion import invert
from dyod.sweep import DEFAULT_T0S, best_row, markdown_table, sweep
from dyod.vae_training import train_vae
from dyod.world.datasets import DATASETS, make_dataset


def diagnose(run: Path, best_t0: float, n: int, seed: int, config: SampleConfig) -> list[tuple[str, float, float]]:
    """Why DYOD lands where it does, at the dataset's best t0: the prior's autoencoder floor, the custom VAE's
    samples through that autoencoder without denoising (the t0 -> 0 limit), the guidance scale, and S* itself."""
    import dataclasses

    from dyod.data import lanczos_resize_tensor, pil_to_tensor, resize_lanczos
    from dyod.evaluation import feature_extractor, kid
    from dyod.pipeline import DyodPipeline
    from dyod.run import Run
    from dyod.sweep import reference_images

    pipe = DyodPipeline.from_run(run)
    extractor = feature_extractor("emoji")
    real = reference_images(Run.open(run))
    ref = extractor(real)
    res = pipe.prior.resolution
    rows = []

    def score(label, images):
        result = kid(extractor(images), ref, num_subsets=50, seed=seed)
        rows.append((label, result.mean_x100, result.std_x100))

    def round_trip(x):  # [-1, 1] at the prior's resolution -> through the prior's autoencoder -> output images
        return pipe.to_images(pipe.decode(pipe.encode(x)))

    x = pil_to_tensor([resize_lanczos(im, res) for im in real[:n]])
    score("dataset images through the prior's autoencoder (the floor of any t0)", round_trip(x))
    seeds = list(range(seed, seed + n))
    vae = lanczos_resize_tensor(pipe.vae_images(pipe.z(seeds)), res).clamp(-1, 1)
    score("VAE samples through the prior's autoencoder, no denoising (t0 -> 0)", round_trip(vae))
    for guidance in (1.0, 7.5):
        if guidance != config.guidance_scale:
            c = dataclasses.replace(config, t0=best_t0, guidance_scale=guidance)
            score(f"DYOD t0 = {best_t0:.1f}, guidance {guidance}", pipe.sample(n, c, seed=seed, progress=False))
    initializer = Run.open(run).info.get("inversion", {}).get("config", {}).get("initializer", "object")
    c = dataclasses.replace(config, t0=best_t0, prompt=f"a photo of {initializer}")
    score(f"DYOD t0 = {best_t0:.1f}, prompt \"a photo of {initializer}\" (no S*)", pipe.sample(n, c, seed=seed, progress=False))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--inversion-steps", type=int, default=500)
    parser.add_argument("--vae-epochs", type=int, default=40)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--model", default="emoji-prior")
    parser.add_argument("--t0s", default=",".join(str(t) for t in DEFAULT_T0S), help="comma-separated t0 values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the per-dataset diagnosis rows")
    args = parser.parse_args(argv)
    t0s = [float(t) for t in args.t0s.split(",")]

    started = time.time()
    try:  # the commit whose code runs (taken now: the tree may move on while this runs)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    shutil.rmtree(args.work, ignore_errors=True)
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    sections, summary = [], []
    config = SampleConfig(num_inference_steps=50, guidance_scale=args.guidance_scale, batch_size=50)
    for name in args.datasets.split(","):
        t = time.time()
        data = make_dataset(name, args.work / name / "data", n=args.n_images, seed=args.seed, progress=False)
        run = args.work / name / "run"
        invert(data, args.model, run, InversionConfig(steps=args.inversion_steps, batch_size=8, seed=args.seed,
               checkpoint_every=0), progress=False)
        train_vae(data, run, VAEConfig(epochs=args.vae_epochs, batch_size=32, latent_dim=32, seed=args.seed),
                  progress=False)
        fit_s = time.time() - t
        t = time.time()
        rows = sweep(run, t0s, n=args.n_samples, seed=args.seed, config=config, out=results_dir / name,
                     progress=False)
        sweep_s = time.time() - t
        shutil.copy(data / "dataset.json", results_dir / name / "dataset.json")
        best = best_row([r for r in rows if r.t0 is not None and r.t0 < 1.0])
        alone = next(r for r in rows if r.t0 == 1.0)
        vae = next(r for r in rows if r.t0 is None)
        beats = best.kid_x100 < alone.kid_x100 and best.kid_x100 < vae.kid_x100
        t = time.time()
        diagnosis = diagnose(run, best.t0, args.n_samples, args.seed, config) if not args.no_diagnosis else []
        diagnosis_s = time.time() - t
        summary.append((name, best, alone, vae, beats, diagnosis))
        grids = " ".join(f"![{r.label}](results/{name}/{r.grid})" for r in rows if r.grid)
        sections += [
            f"## {name}", "",
            f"{DATASETS[name].description}; {args.n_images} images, seed {args.seed}. Fit {fit_s:.0f} s, sweep {sweep_s:.0f} s, "
            f"diagnosis {diagnosis_s:.0f} s.",
            "", markdown_table(rows, config.num_inference_steps), "",
            *(["Diagnosis (same seeds and KID; guidance 3.0 and S* unless said):", "", "| | KID × 100 |", "|---|---|",
               *[f"| {label} | {m:.2f} ± {sd:.2f} |" for label, m, sd in diagnosis], ""] if diagnosis else []),
            f"![sweep](results/{name}/sweep.png)", "",
            "Samples (first 32 of each row; order: VAE alone, then t0 ascending, t0 = 1 is the prior + S* alone):", "",
            grids, "",
        ]
    wall = time.time() - started
    head = [
        "# Results: DYOD on the bundled datasets with the bundled reference prior", "",
        f"Measured {time.strftime('%Y-%m-%d')} at commit {commit} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU. Total wall time {wall / 60:.1f} min.", "",
        "Command: `" + " ".join([".venv/bin/python", "benchmarks/results.py", *(sys.argv[1:] if argv is None else argv)]) + "`", "",
        f"Setup: prior `{args.model}` (see its MODEL_CARD.md); dataset prompt {args.inversion_steps} steps × batch 8; "
        f"custom VAE {args.vae_epochs} epochs, z of 32; DDIM T = 50, guidance {args.guidance_scale}, prompt \"a photo of S*\"; "
        f"{args.n_samples} samples per column, seeds {args.seed}–{args.seed + args.n_samples - 1}; KID × 100 with the "
        "bundled emoji features against the whole dataset, mean ± std over 50 subsets; bold = best DYOD t0.", "",
        "| dataset | best DYOD t0 | KID × 100 | prior + S* alone | VAE alone | DYOD beats both? |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {b.t0:.1f} | {b.kid_x100:.2f} | {a.kid_x100:.2f} | {v.kid_x100:.2f} | {'yes' if ok else 'no'} |"
          for n, b, a, v, ok, _ in summary],
        "",
    ]
    findings = args.out / "results" / "findings.md"  # written by hand after reading the numbers; kept across runs
    if findings.exists():
        head += [findings.read_text().strip(), ""]
    (args.out / "RESULTS.md").write_text("\n".join(head + sections))
    (results_dir / "summary.json").write_text(json.dumps(
        [{"dataset": n, "best_t0": b.t0, "best_kid_x100": b.kid_x100, "alone_kid_x100": a.kid_x100,
          "vae_kid_x100": v.kid_x100, "beats_both": ok,
          "diagnosis": [{"label": label, "kid_x100": m, "kid_x100_std": sd} for label, m, sd in d]}
         for n, b, a, v, ok, d in summary], indent=2))
    print((args.out / "RESULTS.md").read_text()[:3000])


if __name__ == "__main__":
    main()
