"""What `dyod info` prints: a run folder (its model, data, stages, chosen t0 and what comes next), a folder of dyod's
outputs, or a folder of images, each said as what it is. ``dyod.run`` is the run folder itself."""

from __future__ import annotations

import os
from pathlib import Path

from .config import read_json
from .data import RUN_FILE
from .errors import DyodError, first_line
from .run import Run, _folder_kind, _output_record, outputs_dataset, shell_quoted


def describe_outputs(path: str | os.PathLike) -> str:
    """What a folder of dyod's outputs holds (``dyod info SAMPLES``), from the record written beside them: the command
    and run that made them, how, and how to score them."""
    path = Path(path)
    made = _output_record(path)
    config, images, run = made.get("config") or {}, made.get("images") or [], made.get("run_path") or made.get("run")
    lines = [f"outputs {path}: {_count(len(images), 'image')} made by `dyod {made.get('command', '?')}` from run {run}"
             + (f" (model {made['model']})" if made.get("model") else "")]
    if config:
        steps = made.get("denoising_steps")
        lines.append(f"  t0 {config.get('t0')}" + (f" ({steps} of {config.get('num_inference_steps')} DDIM steps)"
                                                    if steps is not None else "")
                     + f", guidance {config.get('guidance_scale')}, prompt {config.get('prompt')!r}")
    seeds, command = made.get("seeds") or [], made.get("command")
    ends = (f"seeds {seeds[0]} and {seeds[1]}" if len(seeds) == 2 else
            f"images {made['end_images'][0]} and {made['end_images'][1]}" if len(made.get("end_images") or []) == 2
            else None)
    if command == "interpolate" and ends:
        lines.append(f"  between the custom VAE latents of {ends}, {made.get('steps')} steps, "
                     f"the forward noise {'held fixed' if made.get('fix_noise') else 'drawn for each image'}")
    elif command == "traverse" and (made.get("dims") or made.get("dim") is not None):
        dims = made.get("dims") or [made["dim"]]  # a record of one dimension, as dyod wrote them before rows
        lines.append(f"  latent dimension{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims))}"
                     + (" (a row each)" if len(dims) > 1 else "")
                     + f" at {', '.join(map(str, made.get('values') or []))}, the rest from "
                     + (f"image {made['image']} (ε from seed {made.get('seed')})" if made.get("image")
                        else f"seed {made.get('seed')}"))
        if made.get("posterior_mean_variance"):  # chosen by --active
            lines.append(f"  the {_count(len(dims), 'dimension')} the dataset uses most (--active): posterior-mean "
                         f"variance {', '.join(f'{v:.3g}' for v in made['posterior_mean_variance'])}")
    elif seeds:
        lines.append(f"  seeds {seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
                     else f"  seeds {', '.join(map(str, seeds[:8]))}" + (", ..." if len(seeds) > 8 else ""))
    if made.get("inputs"):
        lines.append(f"  inputs: {_count(len(made['inputs']), 'image')}, e.g. {made['inputs'][0]}"
                     + (f"; {len(made['skipped'])} skipped" if made.get("skipped") else ""))
    data_dir = outputs_dataset(path)
    against = f"(KID × 100 against the run's dataset, {data_dir})" if data_dir else (
        "DATA_DIR (KID × 100 against a folder of images)")
    lines.append(f"  next: dyod eval {shell_quoted(path)} {against}")
    return "\n".join(lines)


def describe_folder(path: str | os.PathLike) -> str:
    """``dyod info PATH``: a run folder, a folder of dyod's outputs or a folder of images, each said as what it is."""
    path = Path(path)
    kind = None if (path / RUN_FILE).exists() else _folder_kind(path)
    if kind == "outputs":
        return describe_outputs(path)
    if kind == "images":
        return describe_data(path)
    return describe_run(path)  # a run, or the reason it is none


def describe_data(path: str | os.PathLike) -> str:
    """What a folder of images is to dyod before a run is fitted on it (``dyod info DATA_DIR``): how many images it
    reads and of which kinds, their sizes and the resolution outputs will have, and which files it cannot open (from
    their headers: a file damaged further in is found when it is read)."""
    import collections

    from tqdm.auto import tqdm

    from .data import dataset_resolution, find_image_files, read_size

    files = find_image_files(path)
    sizes, unreadable = [], []
    for f in tqdm(files, desc="reading headers", disable=len(files) < 500, leave=False):
        try:
            sizes.append(read_size(f))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; each file's reason is said
            unreadable.append(f"{f.relative_to(path) if f != path else f.name}: {first_line(e) or type(e).__name__}")
    kinds = collections.Counter(f.suffix.lower() for f in files)
    lines = [f"data {path}: {_count(len(files), 'image file')} "
             f"({', '.join(f'{n} {kind}' for kind, n in kinds.most_common())})"]
    if sizes:
        common = collections.Counter(f"{w}x{h}" for w, h in sizes).most_common(3)
        lines.append(f"  sizes: {', '.join(f'{size} ({n})' for size, n in common)}"
                     + (", ..." if len(set(sizes)) > 3 else "") + f"; outputs at {dataset_resolution(sizes)} px, or at "
                     "the model's resolution where that is smaller (non-square images are centre-cropped)")
    if unreadable:
        lines.append(f"  cannot be read: {len(unreadable)}, e.g. {unreadable[0]} (left out, with the reason in the "
                     "run's data.json)")
    lines.append(f"  next: dyod fit {shell_quoted(path)} --model MODEL --out RUN")
    return "\n".join(lines)


def describe_run(path: str | os.PathLike) -> str:
    """What a run folder holds, in a few lines (``dyod info RUN``): its model and data, each stage finished or where
    it stopped, the chosen t0, and the command that comes next."""
    from .checkpoint import CHECKPOINT_FILE, checkpoint_meta
    from .prior import hub_cache_note

    run = Run.open(path)
    info, stages = run.info, run.info.get("stages", {})
    data = info.get("data", {})
    model = info.get("model")
    # local folders are recorded absolute: one that is not here has moved (or the run was copied to another machine)
    moved = model is not None and Path(model).is_absolute() and not Path(model).exists()
    in_cache = hub_cache_note(model) if model else None
    lines = [f"run {run.path}",
             f"  model: {model or 'none yet'}" + (
                 f" ({info['prior'].get('resolution')} px, {info['prior'].get('prediction_type')})"
                 if info.get("prior") else "")
             + (" — not on this machine: the sampling commands take --model NEW_PLACE" if moved else "")
             + (f" — {in_cache}" if in_cache else "")]
    if data:
        lines.append(f"  data: {data.get('num_images')} images at {data.get('resolution')} px from {data.get('root')}"
                     + (f", {data.get('num_skipped')} skipped (data.json says why)" if data.get("num_skipped") else "")
                     + (f", {held_out:g} of the folder held out (--holdout-fraction; `dyod tune` chooses t0 on it)"
                        if (held_out := info.get("data_config", {}).get("holdout_fraction")) else ""))

    def stopped_at(folder: Path, unit: str, unfinished_only: bool = False) -> str | None:
        """Where the stage's checkpoint stopped (``unfinished_only``: only if short of its steps, as after an
        `--overwrite` training stopped beside the stage's earlier result)."""
        checkpoint = folder / CHECKPOINT_FILE
        if not checkpoint.exists():
            return None
        try:
            meta = checkpoint_meta(checkpoint)
        except DyodError:
            if unfinished_only:  # the stage's output is written: the damaged checkpoint is not needed
                return None
            return f"its checkpoint {checkpoint} is damaged; train the stage again with --overwrite"
        total = (meta.get("config") or {}).get("steps" if unit == "step" else "epochs")
        if unfinished_only and (total is None or meta.get("step", 0) >= total):
            return None
        return f"stopped at {unit} {meta.get('step')}" + (f" of {total}" if total else "") + "; --resume continues"

    def stage_line(name: str, made: bool, summary: dict | None, describe, folder: Path, unit: str) -> str:
        if not made:
            return f"  {name}: " + (stopped_at(folder, unit) or "not trained")
        again = stopped_at(folder, unit, unfinished_only=True)
        return (f"  {name}: " + (describe(summary) if summary else "made, with no training record")
                + (f"; a new training {again} it" if again else ""))

    def prompt_summary(p: dict) -> str:
        if p.get("imported_from"):
            return (f"{info.get('placeholder_token')} ({_count(info.get('num_vectors', 1), 'vector')}), imported from "
                    f"{p['imported_from']}")
        loss = f", final loss {p['final_loss']:.4f}" if p.get("final_loss") is not None else ""
        return (f"{info.get('placeholder_token')} ({_count(info.get('num_vectors', 1), 'vector')}), "
                f"{_count(p.get('steps'), 'step')}{loss}, {p.get('wall_time_s')} s on {p.get('device')}")

    def vae_summary(v: dict) -> str:
        active = v.get("active_dimensions")  # recorded by the training; a VAE trained before, `traverse --active`
        if active is None and run.latent_activity_path.exists():  # measures
            active = read_json(run.latent_activity_path).get("active_dimensions")
        return (f"{v.get('resolution')} px, latent {v.get('config', {}).get('latent_dim')}"
                + (f" ({active} active)" if active is not None else "") + ", "
                f"{_count(v.get('epochs'), 'epoch')}, final loss {v.get('final_loss', float('nan')):.4f}, "
                f"{v.get('wall_time_s')} s on {v.get('device')}")

    lines.append(stage_line("dataset prompt S*", run.embeddings_path.exists(), stages.get("inversion"), prompt_summary,
                            run.inversion_path, "step"))
    lines.append(stage_line("custom VAE", run.vae_weights_path.exists(), stages.get("vae"), vae_summary, run.vae_path,
                            "epoch"))
    chosen = info.get("chosen_t0")
    if chosen:
        current = run.chosen_t0()
        against = "held-out" if chosen.get("reference", "heldout") == "heldout" else f"{chosen['reference']}:"
        score = chosen.get("kid_x100", float("nan"))
        lines.append(f"  chosen t0: {chosen['t0']:.2f} ({against} KID × 100 {score:.2f})"
                     + ("" if current is not None else ", stale: a stage was trained again since; `dyod tune` "
                        "chooses again"))
    data_dir = shell_quoted(data["root"]) if data.get("root") else "DATA"
    todo = [f"{command} --out {shell_quoted(path)}" + (" --resume" if (folder / CHECKPOINT_FILE).exists() else "")
            for command, made, folder in (
                (f"dyod invert {data_dir} --model {shell_quoted(info['model']) if info.get('model') else 'MODEL'}",
                 run.embeddings_path.exists(), run.inversion_path),
                (f"dyod train-vae {data_dir}", run.vae_weights_path.exists(), run.vae_path))
            if not made]
    lines.append(f"  next: {'; then '.join(todo)}" if todo
                 else f"  next: dyod sample {shell_quoted(path)} -n 16 --out SAMPLES")
    return "\n".join(lines)


def _count(n, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
