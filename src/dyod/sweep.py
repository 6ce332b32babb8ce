"""The paper's Table 1 for a run: KID × 100 of DYOD samples at each t0 against the dataset, next to the two
baselines (the custom VAE alone; the prior with S* alone, t0 = 1), with the measured speed. Also the same for
image initialization (Fig. 5), and the automatic choice of t0 on held-out images."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from .config import SampleConfig, read_json, to_dict, write_json
from .errors import DyodError
from .images import make_grid, save_png
from .run import Run

logger = logging.getLogger(__name__)

DEFAULT_T0S = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
GRID_IMAGES = 32  # samples shown per column of a sweep


@dataclasses.dataclass
class SweepRow:
    label: str
    t0: float | None  # None for the VAE alone
    kid_x100: float
    kid_x100_std: float
    unet_calls: int
    seconds_per_image: float
    n: int
    grid: str = ""


def reference_images(run: Run, split: str = "all", ref_dir: str | os.PathLike | None = None):
    """The dataset a run was fitted on (or ``ref_dir``); ``split="heldout"`` gives the images kept out of training."""
    from .data import read_images

    return read_images(*_reference_files(run, split, ref_dir)).images


def reference_features(run: Run, extractor, split: str = "all", ref_dir: str | os.PathLike | None = None):
    """``extractor``'s features of ``reference_images``, read a chunk at a time (a folder of large photos is never
    held whole)."""
    from .data import image_features

    return image_features(*_reference_files(run, split, ref_dir), extractor)[0]


def _reference_files(run: Run, split: str, ref_dir: str | os.PathLike | None):
    from .data import dataset_files

    data = run.info.get("data", {})
    root = ref_dir or data.get("root")
    if root is None:
        raise DyodError(f"run {run.path} records no dataset folder; pass --ref DATA_DIR")
    fraction = run.info.get("data_config", {}).get("holdout_fraction", 0.0) if ref_dir is None else 0.0
    if split == "heldout" and not fraction:
        raise DyodError(f"run {run.path} holds no images out; fit it with --holdout-fraction 0.2 (or use --choose-t0), "
                        "or give `dyod tune --ref DIR` a folder of images kept out of its training")
    return root, dataset_files(root, holdout_fraction=fraction, split=split if fraction else "all")


def sweep(run: str | os.PathLike | Run, t0s=DEFAULT_T0S, n: int = 100, seed: int = 0,
          config: SampleConfig = SampleConfig(), features: str = "emoji", inception_weights: str | None = None,
          reference: str = "all", ref_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          pipe=None, progress: bool = True) -> list[SweepRow]:
    """Sample n images at each t0 (and the VAE alone), KID against the reference; write table, JSON, plot, grids.

    ``pipe``: the run's ``DyodPipeline``, or a function that makes one, called once the reference images are found
    (so that a sweep refused for its reference, e.g. a run that holds no images out, loads no model)."""
    from .evaluation import feature_extractor, kid
    from .pipeline import DyodPipeline

    run = run if isinstance(run, Run) else Run.open(run)
    t0s = sorted(set(float(t) for t in t0s))
    if n < 2:
        raise DyodError(f"-n must be >= 2 for KID, got {n}")
    check_run_can_sample(run, config.prompt, t0s)
    extractor = feature_extractor(features, inception_weights)
    ref_features = reference_features(run, extractor, reference, ref_dir)
    pipe = pipe() if callable(pipe) else pipe or DyodPipeline.for_sampling(run)
    seeds = list(range(seed, seed + n))
    out = Path(out) if out else None
    rows: list[SweepRow] = []

    def record(label: str, t0: float | None, batches) -> None:
        """Score ``batches`` (an iterator of lists of images) as they come: only their features and the first
        GRID_IMAGES images are kept, so a sweep of thousands of samples per t0 holds one batch of images. The
        seconds are the sampler's alone (the feature network runs between batches)."""
        scored, shown, seconds = [], [], 0.0
        started = time.perf_counter()
        for images in batches:
            seconds += time.perf_counter() - started
            scored.append(extractor(images))
            shown += images[:GRID_IMAGES - len(shown)]
            started = time.perf_counter()
        scored = torch.cat(scored)
        score = kid(scored, ref_features, num_subsets=50, seed=seed)
        grid = ""
        if out is not None:
            grid = f"samples_{label.replace(' ', '_').replace('=', '').replace('*', 's')}.png"
            save_png(make_grid(shown, 8), out / grid)
        calls = pipe.last_unet_calls if t0 is not None else 0
        rows.append(SweepRow(label, t0, score.mean_x100, score.std_x100, calls, seconds / len(scored), len(scored),
                             grid))
        logger.info("%s: KID×100 %.3f ± %.3f", label, score.mean_x100, score.std_x100)

    if pipe.custom_vae is not None:
        record("VAE alone", None, (pipe.vae_samples(seeds[i:i + 256]) for i in range(0, n, 256)))
    for t0 in t0s:
        record(f"t0={t0:.2f}", t0, pipe.iter_samples(n, dataclasses.replace(config, t0=t0), seed=seed,
                                                     progress=progress))
    if out is not None:
        write_sweep_outputs(rows, out, {"run": str(run.path), "n": n, "seed": seed, "features": features,
                                        "reference": reference, "config": to_dict(config)})
    return rows


def check_run_can_sample(run: Run, prompt: str, t0s=(1.0,)) -> None:
    """Before any model loads (a sweep that left out the rows it cannot make would print a table of fewer rows, or
    none, and pass for done)."""
    run.check_can_sample(prompt, t0s, otherwise="sweep --t0 1 alone (the VAE-alone baseline needs it too)")


def best_row(rows: list[SweepRow]) -> SweepRow:
    candidates = [r for r in rows if r.t0 is not None]
    if not candidates:
        raise DyodError("the sweep has no DYOD rows")
    return min(candidates, key=lambda r: r.kid_x100)


def t0_label(t0: float) -> str:
    """t0 as a table names it: all its digits (0.05 is not 0.1), no float noise (0.3, not 0.30000000000000004)."""
    return f"{t0:g}"


def markdown_table(rows: list[SweepRow], num_inference_steps: int) -> str:
    """Shaped like the paper's Table 1: one column per t0, then the two baselines."""
    dyod_rows = [r for r in rows if r.t0 is not None and r.t0 < 1.0]
    alone = next((r for r in rows if r.t0 == 1.0), None)
    vae = next((r for r in rows if r.t0 is None), None)
    best = min(dyod_rows, key=lambda r: r.kid_x100) if dyod_rows else None
    cols = [f"{t0_label(r.t0)}T" for r in dyod_rows] + (["prior + S* (t0 = T)"] if alone else []) + (["VAE"] if vae else [])
    ordered = dyod_rows + ([alone] if alone else []) + ([vae] if vae else [])
    base_seconds = alone.seconds_per_image if alone else None

    def fmt_kid(r):
        text = f"{r.kid_x100:.2f} ± {r.kid_x100_std:.2f}"
        return f"**{text}**" if r is best else text

    lines = [
        "| | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
        "| KID × 100 | " + " | ".join(fmt_kid(r) for r in ordered) + " |",
        "| UNet calls | " + " | ".join(str(r.unet_calls) for r in ordered) + " |",
        "| speed, paper's T/t0 | " + " | ".join(f"×{num_inference_steps / r.unet_calls:.2f}" if r.unet_calls else "-" for r in ordered) + " |",
    ]
    if base_seconds:  # measured against the prior + S* alone: a sweep without t0 = 1 has nothing to measure against
        lines.append("| speed, measured | " + " | ".join(
            f"×{base_seconds / r.seconds_per_image:.2f}" if r.t0 is not None else "-" for r in ordered) + " |")
    lines.append("| s / image | " + " | ".join(f"{r.seconds_per_image:.3f}" for r in ordered) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[SweepRow], path: Path, title: str = "", floor: float | None = None) -> None:
    _save_figure(sweep_figure(rows, title, floor), path)


def _pyplot():
    """pyplot drawing to files (no display is needed, nor used where there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend below the axes too
    _pyplot().close(fig)


def sweep_figure(rows: list[SweepRow], title: str = "", floor: float | None = None):
    """KID against t0, the VAE alone as a line; the measured speed-up on a second axis when the sweep has the
    t0 = 1 row it is measured against (and only then: an empty axis would read as a measurement). ``floor``: the KID
    of the dataset's own images through the prior's autoencoder, which every DYOD sample leaves through."""
    plt = _pyplot()

    curve = [r for r in rows if r.t0 is not None]
    vae = next((r for r in rows if r.t0 is None), None)
    alone = next((r for r in curve if r.t0 == 1.0), None)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar([r.t0 for r in curve], [r.kid_x100 for r in curve], yerr=[r.kid_x100_std for r in curve],
                marker="o", label="DYOD (t0 = 1: prior + S* alone)" if alone else "DYOD")
    if vae is not None:
        ax.axhline(vae.kid_x100, color="gray", linestyle="--", label="VAE alone")
    if floor is not None:
        ax.axhline(floor, color="tab:red", linestyle=":", label="dataset through the prior's autoencoder (floor)")
    ax.set_xlabel("t0 (fraction of T)")
    ax.set_ylabel("KID × 100 (lower is better)")
    handles, labels = ax.get_legend_handles_labels()
    if alone is not None and alone.seconds_per_image:
        ax2 = ax.twinx()
        ax2.plot([r.t0 for r in curve], [alone.seconds_per_image / r.seconds_per_image for r in curve],
                 color="tab:orange", marker="s", alpha=0.7, label="measured speed-up")
        ax2.set_ylabel("speed-up vs t0 = 1", color="tab:orange")
        handles2, labels2 = ax2.get_legend_handles_labels()
        handles, labels = handles + handles2, labels + labels2
    # below the plot: inside it, the legend hides the curves or the baselines' lines wherever it goes
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def write_sweep_outputs(rows: list[SweepRow], out: Path, meta: dict) -> None:
    """The table, JSON and plot of a finished sweep; the sample grids of an earlier sweep in ``out`` (its sweep.json
    lists them) that this one did not make again go, so that every grid there is of this sweep."""
    out.mkdir(parents=True, exist_ok=True)
    remove_earlier_grids(out / "sweep.json", {r.grid for r in rows}, lambda row: row.get("grid"))
    steps = meta.get("config", {}).get("num_inference_steps", 50)
    write_json(out / "sweep.json", {**meta, "rows": [dataclasses.asdict(r) for r in rows]})
    (out / "sweep.md").write_text(markdown_table(rows, steps) + "\n")
    plot_sweep(rows, out / "sweep.png", title=Path(meta.get("run", "")).name)


def remove_earlier_grids(record: Path, kept: set, grid_of) -> None:
    """Remove the grids an earlier sweep's ``record`` (JSON) lists, ``grid_of(row)`` for each row, but for ``kept``:
    what a new sweep into the same folder (``--overwrite``) did not make again would otherwise pass for its own."""
    if not record.exists():
        return
    earlier = {grid_of(row) for row in read_json(record).get("rows", [])}
    for name in earlier - set(kept) - {"", None}:
        (record.parent / Path(name).name).unlink(missing_ok=True)


def transform_grid_name(t0: float, label: str) -> str:
    return f"transform_t0_{t0:.2f}_{'s' if label == 'with S*' else 'plain'}.png"


# the sampling settings a chosen t0 holds for: another guidance or schedule may have another best t0
CHOSEN_T0_SETTINGS = ("num_inference_steps", "guidance_scale", "prompt", "negative_prompt")


def choose_t0(run: str | os.PathLike | Run, t0s=DEFAULT_T0S, n: int = 100, seed: int = 0,
              config: SampleConfig = SampleConfig(), out: str | os.PathLike | None = None, progress: bool = True,
              pipe=None, ref_dir: str | os.PathLike | None = None) -> tuple[float, list[SweepRow]]:
    """Sweep t0 against the run's held-out images (or ``ref_dir``: images kept out of training some other way, for a
    run fitted without a held-out fraction); store the argmin as the run's default t0."""
    run = run if isinstance(run, Run) else Run.open(run)
    rows = sweep(run, [t for t in t0s if t < 1.0] or t0s, n=n, seed=seed, config=config,
                 reference="all" if ref_dir else "heldout", ref_dir=ref_dir, out=out, pipe=pipe, progress=progress)
    best = best_row(rows)
    chosen_with = {k: v for k, v in to_dict(config).items() if k in CHOSEN_T0_SETTINGS}
    reference = str(Path(ref_dir).resolve()) if ref_dir else "heldout"
    run.update(chosen_t0={"t0": best.t0, "kid_x100": best.kid_x100, "n": n, "config": chosen_with,
                          "reference": reference,
                          "sweep": {f"{r.t0:.2f}": r.kid_x100 for r in rows if r.t0 is not None},
                          "fingerprint": run.results_fingerprint()})
    logger.info("chosen t0 = %.2f (KID×100 %.3f against %s)", best.t0, best.kid_x100,
                "the held-out images" if reference == "heldout" else reference)
    return best.t0, rows


def check_transform_inputs(inputs: list) -> None:
    if len(inputs) < 2:
        raise DyodError(f"sweep-transform scores the transformed inputs with KID, which needs at least 2 of them; "
                        f"got {len(inputs)} readable input image(s)")


def prompt_without_token(run: Run) -> str:
    """The baseline of Fig. 5: "a photo of" the word S* was initialized from, the prompt without S*."""
    initializer = run.info.get("stages", {}).get("inversion", {}).get("config", {}).get("initializer", "object")
    return f"a photo of {initializer}"


def sweep_transform(run: str | os.PathLike | Run, inputs: list, t0s=(0.4, 0.5, 0.6, 0.7, 0.8), seed: int = 0,
                    config: SampleConfig = SampleConfig(), baseline_prompt: str | None = None,
                    out: str | os.PathLike | None = None, progress: bool = True, pipe=None) -> list[dict]:
    """Fig. 5 as numbers: KID of transformed inputs against the dataset, with S* and with a plain prompt. ``pipe``: as
    for ``sweep``, the run's pipeline or a function that makes one once the run is found able to sample."""
    from .evaluation import feature_extractor, kid
    from .pipeline import DyodPipeline

    run = run if isinstance(run, Run) else Run.open(run)
    check_run_can_sample(run, config.prompt)  # both before the model loads
    check_transform_inputs(inputs)
    pipe = pipe() if callable(pipe) else pipe or DyodPipeline.for_sampling(run)
    extractor = feature_extractor("emoji")
    ref_features = reference_features(run, extractor)
    baseline_prompt = baseline_prompt or prompt_without_token(run)
    results = []
    out = Path(out) if out else None
    for t0 in t0s:
        for label, prompt in (("with S*", config.prompt), ("without S*", baseline_prompt)):
            images = pipe.transform(inputs, dataclasses.replace(config, t0=t0, prompt=prompt), seed=seed, progress=progress)
            score = kid(extractor(images), ref_features, num_subsets=50, seed=seed)
            grid = transform_grid_name(t0, label) if out is not None else ""
            results.append({"t0": t0, "prompt": label, "prompt_text": prompt, "kid_x100": score.mean_x100,
                            "kid_x100_std": score.std_x100, "n": len(images), "grid": grid})
            if out is not None:
                save_png(make_grid(images[:16], 8), out / grid)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # an earlier sweep's rows name their grids (older records only their t0 and prompt)
        remove_earlier_grids(out / "sweep_transform.json", {r["grid"] for r in results},
                             lambda row: row.get("grid") or (transform_grid_name(row["t0"], row.get("prompt"))
                                                           if isinstance(row.get("t0"), (int, float)) else None))
        write_json(out / "sweep_transform.json", {"run": str(run.path), "rows": results})
        lines = ["| t0 | " + " | ".join(t0_label(t) for t in t0s) + " |", "|---" * (len(t0s) + 1) + "|"]
        for label in ("with S*", "without S*"):
            cells = [next(f"{r['kid_x100']:.2f} ± {r['kid_x100_std']:.2f}" for r in results if r["t0"] == t and r["prompt"] == label)
                     for t in t0s]
            lines.append(f"| KID × 100, {label} | " + " | ".join(cells) + " |")
        (out / "sweep_transform.md").write_text("\n".join(lines) + "\n")
        _save_figure(transform_sweep_figure(results, title=run.path.name), out / "sweep_transform.png")
    return results


def transform_sweep_figure(results: list[dict], title: str = ""):
    """Fig. 5 as a plot: KID of the transformed inputs against t', with S* and with the plain prompt."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, marker in (("with S*", "o"), ("without S*", "s")):
        rows = sorted((r for r in results if r["prompt"] == label), key=lambda r: r["t0"])
        text = rows[0]["prompt_text"] if rows else ""
        ax.errorbar([r["t0"] for r in rows], [r["kid_x100"] for r in rows], yerr=[r["kid_x100_std"] for r in rows],
                    marker=marker, capsize=3, label=f"{label} ({text!r})")
    ax.set_xlabel("t' (fraction of T)")
    ax.set_ylabel("KID × 100 (lower is better)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig
