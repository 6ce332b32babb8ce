"""Experiment behind the results page's findings: is the reference prior's autoencoder what holds DYOD back?

Fine-tune only the decoder of the prior's AutoencoderKL on the prior's own training corpus. The encoder stays
frozen, so the latent space the UNet was trained in is unchanged and the UNet, the learned S* and the fitted runs
remain valid; only what turns latents back into pixels improves. Then measure, against the original decoder:

1. reconstruction error on held-out scenes (never in the corpus);
2. the floor: the dataset's own images through the autoencoder, KID × 100 against the dataset;
3. DYOD at the dataset's best t0 (from docs/results/summary.json) on the runs benchmarks/results.py fitted, with the
   new decoder swapped in (same seeds).

    .venv/bin/python benchmarks/decoder_finetune.py [--steps 1500] [--work benchmarks/work] [--n 200]

Writes docs/results/decoder_finetune.json and prints a Markdown table. The bundled prior is not modified.

With ``--on dataset`` the question is the other one: does the encoder keep what the decoder loses? Each dataset gets
its own copy of the decoder, fine-tuned on that dataset's images alone (the encoder still frozen); then its floor, DYOD
across t0 and the prior + S* alone (t0 = 1) are scored with it, same runs and seeds, and a grid is written beside the
dataset's results (rows: dataset, through the original autoencoder, through the tuned one, DYOD at the best t0 with
the tuned decoder). Writes docs/results/decoder_on_dataset.json.

    .venv/bin/python benchmarks/decoder_finetune.py --on dataset [--steps 600]"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dyod.data import pil_to_tensor, pil_to_uint8, resize_lanczos
from dyod.evaluation import feature_extractor, kid
from dyod.pipeline import DyodPipeline
from dyod.prior import bundled_prior_path
from dyod.run import Run
from dyod.sweep import reference_images
from dyod.world.prior_training import PretrainConfig, corpus, to_unit


def render(indices, config: PretrainConfig) -> torch.Tensor:
    gen = corpus(config)
    images = np.stack([np.asarray(gen.scene(i).render(gen.atlas)) for i in indices])
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@torch.no_grad()
def reconstruction_mse(vae, images_uint8: torch.Tensor) -> float:
    x = to_unit(images_uint8)
    return float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))


def finetune_decoder(vae, images_uint8: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """The prior's own reconstruction loss (MSE + 0.5·L1, latents sampled from the posterior), decoder only."""
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    vae.train()
    for _ in tqdm(range(steps), desc="decoder"):
        x = to_unit(images_uint8[torch.randint(len(images_uint8), (batch_size,), generator=generator)])
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval()
    vae.requires_grad_(False)
    return losses


def fitted_runs(args, summary: dict, extractor):
    """Each dataset benchmarks/results.py fitted: its summary row, pipeline, images, their features and the sweep's
    sampling settings."""
    for name, row in summary.items():
        run_path = args.work / name / "run"
        if not (run_path / "run.json").exists():
            continue
        pipe = DyodPipeline.from_run(run_path, device="cpu")
        real = reference_images(Run.open(run_path))
        run_config = pipe_config(json.loads((Path("docs/results") / name / "sweep.json").read_text())["config"])
        yield name, row, pipe, real, extractor(real), run_config


def on_dataset(args, original, summary: dict, extractor) -> dict:
    """Per dataset: the decoder fine-tuned on that dataset alone, and every DYOD score with it."""
    from dyod.images import make_grid, save_png

    result = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "t0": list(args.t0), "datasets": {}}
    for name, row, pipe, real, ref, run_config in fitted_runs(args, summary, extractor):
        tuned = copy.deepcopy(original)
        started = time.time()
        pixels = pil_to_uint8([resize_lanczos(im, pipe.prior.resolution) for im in real])
        losses = finetune_decoder(tuned, pixels, args.steps, args.batch_size, args.lr, args.seed)
        entry = {"tune_s": round(time.time() - started, 1), "final_loss_mean_last_50": float(np.mean(losses[-50:])),
                 "vae_alone_kid_x100": row["vae_kid_x100"], "alone_kid_x100": row["alone_kid_x100"],
                 "best_t0_original": row["best_t0"], "best_kid_x100_original": row["best_kid_x100"]}
        round_trips = {}
        for label, vae in (("original", original), ("tuned", tuned)):
            pipe.prior.vae = vae
            round_trips[label] = pipe.round_trip(real[: args.n])
            entry[f"floor_{label}_kid_x100"] = kid(extractor(round_trips[label]), ref, num_subsets=50, seed=args.seed).mean_x100
        scores, samples = {}, {}
        for t0 in args.t0:
            samples[t0] = pipe.sample(args.n, dataclasses.replace(run_config, t0=t0), seed=args.seed, progress=False)
            scores[t0] = kid(extractor(samples[t0]), ref, num_subsets=50, seed=args.seed)
        entry["tuned"] = {f"{t0:.1f}": {"kid_x100": s.mean_x100, "kid_x100_std": s.std_x100} for t0, s in scores.items()}
        best = min((t0 for t0 in args.t0 if t0 < 1), key=lambda t0: scores[t0].mean_x100)
        entry["best_t0_tuned"] = best
        rows = [real[:16], round_trips["original"][:16], round_trips["tuned"][:16], samples[best][:16]]
        save_png(make_grid([im for r in rows for im in r], 16), Path("docs/results") / name / "decoder_on_dataset.png")
        result["datasets"][name] = entry
        print(f"{name}: done in {time.time() - started:.0f} s", flush=True)
    return result


def print_on_dataset(result: dict) -> None:
    t0s = [f"{t0:.1f}" for t0 in result["t0"]]
    print("| dataset | floor: original → tuned decoder | " + " | ".join(
        f"DYOD t0 = {t}" if t != "1.0" else "prior + S* alone" for t in t0s) + " | VAE alone |")
    print("|---|---|" + "---|" * len(t0s) + "---|")
    for name, e in result["datasets"].items():
        cells = [f"{e['tuned'][t]['kid_x100']:.1f}" for t in t0s]
        print(f"| {name} | {e['floor_original_kid_x100']:.1f} → {e['floor_tuned_kid_x100']:.1f} | " + " | ".join(cells)
              + f" | {e['vae_alone_kid_x100']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--corpus", type=int, default=10000, help="scenes of the prior's corpus to train on")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"), help="runs fitted by results.py")
    parser.add_argument("--summary", type=Path, default=Path("docs/results/summary.json"))
    parser.add_argument("--n", type=int, default=200, help="samples / images per KID")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the results (default: "
                        "docs/results/decoder_finetune.json, or decoder_on_dataset.json with --on dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on", choices=("corpus", "dataset"), default="corpus",
                        help="fine-tune one decoder on the prior's corpus, or one per dataset on its own images")
    parser.add_argument("--t0", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5, 0.7, 0.9, 1.0],
                        help="with --on dataset: the t0 to score (1.0 = the prior + S* alone)")
    args = parser.parse_args()
    started = time.time()

    from diffusers import AutoencoderKL

    config = PretrainConfig()
    original = AutoencoderKL.from_pretrained(bundled_prior_path() / "vae").eval()
    if args.on == "dataset":
        summary = {row["dataset"]: row for row in json.loads(args.summary.read_text())}
        result = on_dataset(args, original, summary, feature_extractor("emoji"))
        result["wall_s"] = round(time.time() - started, 1)
        (args.out or Path("docs/results/decoder_on_dataset.json")).write_text(json.dumps(result, indent=2))
        print_on_dataset(result)
        print(f"wall {result['wall_s'] / 60:.1f} min")
        return
    tuned = copy.deepcopy(original)
    train_images = render(range(args.corpus), config)
    heldout = render(range(config.corpus_size, config.corpus_size + 256), config)  # past the prior's corpus
    losses = finetune_decoder(tuned, train_images, args.steps, args.batch_size, args.lr, args.seed)
    result = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "corpus": args.corpus,
        "heldout_mse": {"original": reconstruction_mse(original, heldout), "finetuned": reconstruction_mse(tuned, heldout)},
        "final_train_loss_mean_last_100": float(np.mean(losses[-100:])), "datasets": {},
    }
    summary = {row["dataset"]: row for row in json.loads(args.summary.read_text())}
    extractor = feature_extractor("emoji")
    for name, row, pipe, real, ref, run_config in fitted_runs(args, summary, extractor):
        x = pil_to_tensor([resize_lanczos(im, pipe.prior.resolution) for im in real[: args.n]])
        sample_config = dataclasses.replace(run_config, t0=row["best_t0"])
        entry = {"best_t0": row["best_t0"]}
        for label, vae in (("original", original), ("finetuned", tuned)):
            pipe.prior.vae = vae
            floor = kid(extractor(pipe.to_images(pipe.decode(pipe.encode(x)), None)), ref, num_subsets=50, seed=args.seed)
            samples = pipe.sample(args.n, sample_config, seed=args.seed, progress=False)
            score = kid(extractor(samples), ref, num_subsets=50, seed=args.seed)
            entry[label] = {"floor_kid_x100": floor.mean_x100, "dyod_kid_x100": score.mean_x100,
                            "dyod_kid_x100_std": score.std_x100}
        entry["vae_alone_kid_x100"] = row["vae_kid_x100"]
        entry["alone_kid_x100"] = row["alone_kid_x100"]
        result["datasets"][name] = entry
    result["wall_s"] = round(time.time() - started, 1)
    (args.out or Path("docs/results/decoder_finetune.json")).write_text(json.dumps(result, indent=2))
    print(f"held-out reconstruction MSE: original {result['heldout_mse']['original']:.5f}, "
          f"decoder fine-tuned {result['heldout_mse']['finetuned']:.5f}")
    print("| dataset | best t0 | floor, original decoder | floor, fine-tuned | DYOD, original decoder | DYOD, fine-tuned | "
          "prior + S* alone | VAE alone |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in result["datasets"].items():
        print(f"| {name} | {e['best_t0']:.1f} | {e['original']['floor_kid_x100']:.1f} | {e['finetuned']['floor_kid_x100']:.1f} | "
              f"{e['original']['dyod_kid_x100']:.1f} | {e['finetuned']['dyod_kid_x100']:.1f} | {e['alone_kid_x100']:.1f} | "
              f"{e['vae_alone_kid_x100']:.1f} |")
    print(f"wall {result['wall_s'] / 60:.1f} min")


def pipe_config(data: dict):
    from dyod import SampleConfig
    from dyod.config import from_dict

    return from_dict(SampleConfig, data)


if __name__ == "__main__":
    main()
