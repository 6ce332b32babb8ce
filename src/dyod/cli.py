"""The ``dyod`` command: a thin layer over the library. Config flags are generated from the frozen dataclasses."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, get_type_hints

from . import __version__
from .config import (
    COMPILE_MODES,
    PRECISIONS,
    SEED_LIMIT,
    DataConfig,
    InversionConfig,
    PretrainConfig,
    SampleConfig,
    VAEConfig,
    from_dict,
    read_json,
    to_dict,
    write_json,
)
from .errors import DyodError
from .outputs import (
    GRID_MAX,
    check_resumable,
    clear_previous_results,
    finish_outputs,
    prepare_output,
    sample_record,
    save_outputs,
    write_batches,
)

logger = logging.getLogger("dyod")


# -- flags from configs -------------------------------------------------------------------------------------------
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ranged(kind, name: str, low: float | None, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a{'n integer' if kind is int else ' number'}, got {text!r}") from None
        if not math.isfinite(value):  # float() reads "nan" and "inf"; no setting means either
            raise argparse.ArgumentTypeError(f"{name} takes a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{name} must be <= {high}, got {value}")
        return value

    return parse


def _seed(name: str):
    return _ranged(int, name, 0, SEED_LIMIT - 1)


_CONFIG_FLAGS: dict[str, str] = {}  # "SampleConfig.t0" -> "--t0": a config's refusal names the flag the user gave


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0].rstrip(".") if cls.__doc__ else cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = f"{cls.__name__}.{f.name}"
        _CONFIG_FLAGS[dest] = flag
        hint, help_text = hints[f.name], f.metadata.get("help", "").replace("%", "%%")  # argparse formats help
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": f"{help_text} (default: {f.default!r})"}
        if hint is bool:  # --flag alone is true, as for the other commands' switches; --flag false still reads
            kwargs.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
            kwargs["help"] = f"{help_text} (--{flag[2:]} alone: true; default: {f.default!r})"
        elif hint in (int, float):
            kwargs.update(type=_ranged(hint, flag, f.metadata.get("min"), f.metadata.get("max")), metavar=hint.__name__.upper())
        elif str(hint).startswith("tuple"):
            kwargs.update(nargs="+", metavar="VALUE")
            inner = int if "int" in str(hint) else str
            kwargs["type"] = inner
        else:
            kwargs.update(metavar="TEXT")
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any):
    prefix = cls.__name__ + "."
    values = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    values.update(overrides)
    try:
        return from_dict(cls, values)
    except (TypeError, ValueError) as e:
        name, _, rest = str(e).partition(" ")
        if prefix + name in _CONFIG_FLAGS and prefix + name in vars(args):  # "t0 must be" -> "--t0 must be"
            raise DyodError(f"{_CONFIG_FLAGS[prefix + name]} {rest}") from None
        raise DyodError(f"bad {cls.__name__} settings: {e}") from None


# -- helpers -------------------------------------------------------------------------------------------------------
def _parse_csv(text: str, kind, flag: str, count: int | None = None) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DyodError(f"{flag} takes comma-separated {kind.__name__} values, got {text!r}") from None
    if count is not None and len(values) != count:
        raise DyodError(f"{flag} takes exactly {count} comma-separated values, got {text!r}")
    return values


def _check_output(folder: Path, overwrite: bool) -> None:
    from .run import check_output_folder  # run.py imports the data stack: not before a command needs it

    check_output_folder(folder, overwrite)


# Commands whose work the processes of a multi-process launch (torchrun, accelerate launch) share: the training stages
# (data parallel through Accelerate) and `sample` (the seeds dealt out). The others run in the main process alone.
SHARED_COMMANDS = ("fit", "invert", "train-vae", "sample")


def _processes(args):
    """Accelerate's state of a multi-process launch (process index and count, this process's device, barriers); None
    when dyod runs as one process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import PartialState

    return PartialState(cpu=args.device == "cpu")


class _RunLog(logging.FileHandler):
    """RUN/dyod.log, opened (and its folder made) at the first record: a command refused for its settings or data
    before it logs anything leaves no run folder behind."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _attach_run_log(run: Path) -> None:
    from .run import is_main_process

    if not is_main_process():  # the main process keeps the run's log
        return
    handler = _RunLog(run / "dyod.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dyod").addHandler(handler)


def _detach_run_logs() -> None:
    """Close the run logs a command attached: a later command in the same process (``main`` called from Python, the
    tests) would otherwise write its records into this run's log too."""
    dyod_logger = logging.getLogger("dyod")
    for handler in [h for h in dyod_logger.handlers if isinstance(h, _RunLog)]:
        dyod_logger.removeHandler(handler)
        handler.close()


def _quiet_libraries() -> None:
    """diffusers' and transformers' info and warnings off. Not imported for it (4 s, most of `dyod info`'s time): each
    reads its verbosity from the environment when first imported (a user's own setting is kept); where one is imported
    already (``main`` called from Python), it is told directly."""
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers"):
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
        if name in sys.modules:
            try:
                sys.modules[name].utils.logging.set_verbosity_error()
            except Exception:  # noqa: BLE001 - logging tweaks only
                pass


# -- commands ------------------------------------------------------------------------------------------------------
def _check_embedding_flags(args) -> str | None:
    """With --embedding, S* is imported, not trained: a training flag given beside it would be silently ignored, so
    it is refused. Returns the token to give the imported S* (--placeholder-token's, where given)."""
    if args.embedding is None:
        return None
    unused = [f"--{name.split('.', 1)[1].replace('_', '-')}" for name in vars(args)
              if name.startswith("InversionConfig.") and name != "InversionConfig.placeholder_token"]
    if unused:
        raise DyodError(f"{', '.join(sorted(unused))}: S* is imported from --embedding {args.embedding}, not "
                        "trained, so these training flags would do nothing; leave them out")
    if args.resume and args.command != "fit":
        raise DyodError("--resume continues a training; --embedding imports S* without training: give one of them")
    return getattr(args, "InversionConfig.placeholder_token", None)


def cmd_invert(args) -> None:
    from .inversion import invert
    from .prompt_import import import_dataset_prompt

    token = _check_embedding_flags(args)
    config, data_config = _inversion_config(args), _data_config(args)  # bad settings: before any work
    _attach_run_log(Path(args.out))
    if args.embedding is not None:
        path = import_dataset_prompt(args.data_dir, args.model, args.out, args.embedding, data_config, token=token,
                                     overwrite=args.overwrite, device=args.device)
        print(f"dataset prompt: {path} (imported from {args.embedding})")
        return
    path = invert(args.data_dir, args.model, args.out, config, data_config, resume=args.resume,
                  overwrite=args.overwrite, device=args.device)
    print(f"dataset prompt: {path}")


def _resumed_config(args, cls: type, recorded: dict | None):
    """A stage's settings from its flags; with --resume, those not given are what the run recorded, so that
    `dyod invert DATA --model M --out RUN --resume` goes on as the run started, whatever flags it was started with."""
    if not (args.resume and recorded):
        return config_from_args(args, cls)
    return config_from_args(args, cls, **{k: v for k, v in recorded.items() if f"{cls.__name__}.{k}" not in vars(args)})


def _data_config(args) -> DataConfig:
    """The data flags; with --resume, those not given are the run's own (say, the images --choose-t0 held out stay
    out), so that a stage resumes on the data it started on."""
    from .run import RUN_FILE

    run_file = Path(args.out) / RUN_FILE
    return _resumed_config(args, DataConfig, read_json(run_file).get("data_config") if run_file.exists() else None)


def _inversion_config(args) -> InversionConfig:
    from .inversion import recorded_inversion_config

    return _resumed_config(args, InversionConfig, recorded_inversion_config(args.out))


def _vae_config(args) -> VAEConfig:
    from .vae_training import recorded_vae_config

    return _resumed_config(args, VAEConfig, recorded_vae_config(Path(args.out) / "vae"))


def cmd_train_vae(args) -> None:
    from .vae_training import train_vae

    config, data_config = _vae_config(args), _data_config(args)  # bad settings: before any work
    _attach_run_log(Path(args.out))
    path = train_vae(args.data_dir, args.out, config, data_config, overwrite=args.overwrite, device=args.device,
                     resume=args.resume)
    print(f"custom VAE: {path}")


def cmd_fit(args) -> None:
    from .fitting import fit
    from .run import is_main_process

    # bad settings of either stage: before any work
    token = _check_embedding_flags(args)
    configs = _inversion_config(args), _vae_config(args), _data_config(args)
    if args.choose_t0 and "DataConfig.holdout_fraction" not in vars(args) and not configs[2].holdout_fraction:
        # t0 is chosen on held-out images: 0.2 of them unless given (or, resuming, recorded)
        configs = configs[:2] + (dataclasses.replace(configs[2], holdout_fraction=0.2),)
    _attach_run_log(Path(args.out))
    run = fit(args.data_dir, args.model, args.out, *configs, choose_t0=args.choose_t0,
              choose_t0_samples=args.choose_t0_samples, resume=args.resume, overwrite=args.overwrite,
              device=args.device, embedding=args.embedding, token=token)
    print(f"dataset prompt: {run / 'learned_embeds.safetensors'}\ncustom VAE: {run / 'vae'}")
    if args.choose_t0 and is_main_process():
        t0 = json.loads((run / "run.json").read_text())["chosen_t0"]["t0"]
        print(f"chosen t0: {t0:.2f} (stored in {run / 'run.json'}; `dyod sample` uses it by default)")


def _t0_list(text: str) -> list[float]:
    from .sampling import num_denoising_steps

    values = _parse_csv(text, float, "--t0")
    for v in values:
        num_denoising_steps(v, 50)  # validates the range
    return values


def cmd_sweep(args) -> None:
    from .sweep import sweep

    config, t0s = config_from_args(args, SampleConfig), _t0_list(args.t0s)  # bad flags: before --out is made
    out = Path(args.out)
    _check_output(out, args.overwrite)  # made as the sweep writes: a sweep refused for its reference leaves none
    sweep(args.run, t0s, n=args.n, seed=args.seed, config=config, features=args.features,
          inception_weights=args.inception_weights, ref_dir=args.ref, out=out, pipe=lambda: _pipeline(args))
    print((out / "sweep.md").read_text())
    print(f"table, JSON, plot and sample grids in {out}")


def cmd_tune(args) -> None:
    from .sweep import choose_t0

    config, t0s = config_from_args(args, SampleConfig), _t0_list(args.t0s)  # bad flags: before --out is made
    out = Path(args.out or Path(args.run) / "t0_sweep")
    _check_output(out, args.overwrite)  # made as the sweep writes
    t0, rows = choose_t0(args.run, t0s, n=args.n, seed=args.seed, config=config, out=out,
                         pipe=lambda: _pipeline(args), ref_dir=args.ref)
    print((out / "sweep.md").read_text())
    print(f"chosen t0: {t0:.2f}")


def cmd_sweep_transform(args) -> None:
    from .pipeline import load_input_images
    from .sweep import sweep_transform

    config, t0s = config_from_args(args, SampleConfig), _t0_list(args.t0s)  # bad flags: before any work
    images, _, skipped = load_input_images(args.inputs, size=_model_resolution(args.run))
    out = Path(args.out)
    _check_output(out, args.overwrite)  # made as the sweep writes: a sweep refused for its run leaves none
    sweep_transform(args.run, images, t0s, seed=args.seed, config=config,
                    baseline_prompt=args.baseline_prompt, out=out, pipe=lambda: _pipeline(args))
    print((out / "sweep_transform.md").read_text())


def _model_resolution(run: str) -> int | None:
    """The run's model resolution, from run.json, before the model loads (None for a run that does not record it)."""
    from .run import Run

    return Run.open(run).info.get("prior", {}).get("resolution")


def _pipeline(args, device: str | None = None):
    from .pipeline import DyodPipeline

    return DyodPipeline.for_sampling(args.run, device=device or args.device, precision=args.precision,
                                     compile=args.compile, model=args.model)


def _run_default_t0(args) -> tuple[dict, dict]:
    """``dyod sample`` without --t0 uses the t0 chosen on held-out images (``--choose-t0``), if the run has one:
    the override, and the settings it was chosen with (empty for older records)."""
    if "SampleConfig.t0" in vars(args):
        return {}, {}
    from .run import Run

    run = Run.open(args.run)
    chosen = run.chosen_t0()
    if chosen is None:
        return {}, {}
    logger.info("using the run's chosen t0 = %.2f", chosen)
    return {"t0": chosen}, run.info["chosen_t0"].get("config") or {}


def _warn_if_chosen_with_other_settings(args, config: SampleConfig, recorded: dict) -> None:
    """The chosen t0 is the best for the settings it was swept with; sampling with others, it may not be."""
    now = to_dict(config)
    differ = [k for k in recorded if k in now and recorded[k] != now[k]]
    if differ:
        logger.warning("the run's t0 = %.2f was chosen with %s; sampling with %s, another t0 may be better "
                       "(`dyod tune %s` with these settings chooses again)", config.t0,
                       ", ".join(f"{k}={recorded[k]!r}" for k in differ),
                       ", ".join(f"{k}={now[k]!r}" for k in differ), args.run)


def cmd_sample(args) -> None:
    """Under a multi-process launch the seeds are dealt out among the processes, each on its own device, and the
    images are the ones a single process makes: a seed gives the same image in any batch."""
    from .data import OUTPUT_RECORD
    from .pipeline import sample_noise_seeds

    if args.n < 1:
        raise DyodError(f"-n must be >= 1, got {args.n}")
    chosen, chosen_with = _run_default_t0(args)
    config = config_from_args(args, SampleConfig, **chosen)
    _warn_if_chosen_with_other_settings(args, config, chosen_with)
    _require_what_sampling_needs(args.run, config)  # a bad t0 was refused as the config was made
    seeds = list(range(args.seed, args.seed + args.n))
    names = [f"seed-{s:06d}.png" for s in seeds]
    out = Path(args.out)
    if args.resume:
        check_resumable(out, Path(args.run), config, seed=args.seed, noise_seed=args.noise_seed)
        todo = [(s, name) for s, name in zip(seeds, names) if not (out / name).exists()]
        logger.info("--resume: %d of %d samples are in %s; sampling the other %d", len(seeds) - len(todo), len(seeds),
                    out, len(todo))
    else:
        _check_output(out, args.overwrite)
        todo = list(zip(seeds, names))
    processes = _processes(args)
    main = processes is None or processes.is_main_process
    if main and args.overwrite and not args.resume:
        clear_previous_results(out)
    if processes is not None:
        processes.wait_for_everyone()  # every process has looked at --out before the main one writes there
        todo = todo[processes.process_index::processes.num_processes]
    pipe = _pipeline(args, None if processes is None or args.device else str(processes.device))
    record = sample_record(args.command, Path(args.run), config, pipe, seeds=seeds, noise_seed=args.noise_seed,
                            processes=1 if processes is None else processes.num_processes)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / OUTPUT_RECORD, {**record, "complete": False})  # the settings, for a --resume; no image list yet
    todo_seeds = [s for s, _ in todo]
    batches = pipe.iter_seeds(todo_seeds, config, noise_seed=args.noise_seed, progress=main) if todo else []
    made = [{"seed": s, "noise_seed": e} for s, e in zip(todo_seeds, sample_noise_seeds(todo_seeds, args.noise_seed))]
    write_batches(batches, [name for _, name in todo], out, record, made)
    if processes is not None:
        processes.wait_for_everyone()  # every process's images are written
    if main:
        finish_outputs(out, None, record, names)


def _require_what_sampling_needs(run: str, config: SampleConfig, from_vae: bool = True) -> None:
    """The custom VAE below t0 = 1 (``from_vae``: the samples start from it) and S* for a prompt with {}: a run without
    them is refused before the model loads."""
    from .run import Run

    opened = Run.open(run)
    opened.check_can_sample(config.prompt, (config.t0,) if from_vae else ())
    token = opened.info.get("placeholder_token")
    if token and "{}" not in config.prompt and token not in config.prompt:
        logger.warning("--prompt %r holds neither {} nor the learned token %s: the images are not conditioned on the "
                       "dataset prompt S* (\"a photo of {}\" is)", config.prompt, token)


def cmd_transform(args) -> None:
    from .pipeline import load_input_images

    config = config_from_args(args, SampleConfig)
    _require_what_sampling_needs(args.run, config, from_vae=False)  # transforms start from the inputs
    images, paths, skipped = load_input_images(args.inputs, grayscale=args.grayscale, size=_model_resolution(args.run))
    out = prepare_output(Path(args.out), args.overwrite)
    pipe = _pipeline(args)
    results = pipe.iter_transform(images, config, seed=args.seed)  # read in grayscale, at the model's size
    names = [f"{i:04d}-{p.stem}.png" for i, p in enumerate(paths)]
    save_outputs(results, names, out, None,  # written a batch at a time
                  sample_record(args.command, Path(args.run), config, pipe, inputs=[str(p) for p in paths], skipped=skipped,
                                 seed=args.seed, grayscale=args.grayscale),
                  made=[{"input": str(p), "noise_seed": args.seed + i, "grayscale": args.grayscale}
                        for i, p in enumerate(paths)])


def cmd_interpolate(args) -> None:
    from .pipeline import interpolation_noise_seeds

    if args.images is not None:  # z of each end from an image; ε drawn from --noise-seed (default 0)
        inputs = _latent_images(args.images, "--images")
        seed_a = seed_b = 0 if args.noise_seed is None else args.noise_seed
        ends_made = {"end_images": args.images}  # "images": the outputs, in the record
    else:
        seed_a, seed_b = _parse_csv(args.seeds, int, "--seeds", 2)
        if not all(0 <= s < SEED_LIMIT for s in (seed_a, seed_b)):
            raise DyodError(f"--seeds must be in [0, {SEED_LIMIT - 1}], got {args.seeds!r}")
        ends_made = {"seeds": [seed_a, seed_b]}
    config = config_from_args(args, SampleConfig)
    _require_what_sampling_needs(args.run, config)
    out = prepare_output(Path(args.out), args.overwrite)
    pipe = _pipeline(args)
    ends = tuple(pipe.latents_of(inputs)) if args.images is not None else None
    images = pipe.interpolate(seed_a, seed_b, args.steps, config, fix_noise=args.fix_noise, noise_seed=args.noise_seed,
                              ends=ends)
    noise_seeds = interpolation_noise_seeds(seed_a, args.steps, args.fix_noise, args.noise_seed)
    save_outputs([images], [f"frame-{i:03d}.png" for i in range(len(images))], out, min(len(images), GRID_MAX),
                  sample_record(args.command, Path(args.run), config, pipe, **ends_made, steps=args.steps,
                                 fix_noise=args.fix_noise),
                  made=[{**ends_made, "lambda": i / (args.steps - 1), "noise_seed": noise_seeds[i]}
                        for i in range(len(images))])


def _latent_images(paths: list[str], flag: str) -> list:
    """The image files whose custom-VAE latents ``interpolate --images`` and ``traverse --image`` start from."""
    from .pipeline import load_input_images

    for path in paths:
        if not Path(path).is_file():
            raise DyodError(f"{flag} takes image files; {path} is {'a folder' if Path(path).is_dir() else 'not there'}")
    return [load_input_images([path])[0][0] for path in paths]


def cmd_traverse(args) -> None:
    low, high = _parse_csv(args.range, float, "--range", 2)
    if args.steps < 2:
        raise DyodError(f"--steps must be >= 2, got {args.steps}")
    values = [low + (high - low) * i / (args.steps - 1) for i in range(args.steps)]
    from .run import Run
    from .vae import model_config_of

    run = Run.open(args.run)
    latent_dim = model_config_of(run.vae_path)["latent_dim"]  # before the model loads
    config = config_from_args(args, SampleConfig)
    _require_what_sampling_needs(args.run, config, from_vae=False)  # the VAE is checked above
    dims, activity = _traversed_dimensions(args, run, latent_dim)
    inputs = _latent_images([args.image], "--image") if args.image is not None else None
    out = prepare_output(Path(args.out), args.overwrite)
    pipe = _pipeline(args)
    z = pipe.latents_of(inputs) if args.image is not None else None
    images = pipe.traverse(args.seed, dims, values, config, z=z)
    # a row per dimension, as many whole rows as the grid holds
    save_outputs([images], [f"dim-{d:03d}-value-{i:03d}.png" for d in dims for i in range(len(values))], out,
                  len(values), sample_record(args.command, Path(args.run), config, pipe, seed=args.seed, dims=dims,
                                              values=values, image=args.image, **activity),
                  made=[{"seed": args.seed, "image": args.image, "dim": d, "value": v} for d in dims for v in values],
                  grid_max=GRID_MAX // len(values) * len(values) or len(values))


def _traversed_dimensions(args, run, latent_dim: int) -> tuple[list[int], dict]:
    """``--dim`` as given, or the ``--active`` most used ones (with their variances, for the record)."""
    if args.dim is not None:
        dims = _parse_csv(args.dim, int, "--dim")
        if not dims or len(set(dims)) < len(dims):  # a dimension twice would write its row's files twice
            raise DyodError(f"--dim takes one or more different dimensions, e.g. 3 or 3,5,7; got {args.dim!r}")
        wrong = [d for d in dims if not 0 <= d < latent_dim]
        if wrong:
            raise DyodError(f"--dim must be in [0, {latent_dim - 1}]: the run's custom VAE has {latent_dim} latent "
                            f"dimensions; got {', '.join(map(str, wrong))}")
        return dims, {}
    from .vae_training import most_used_dimensions

    if args.active > latent_dim:
        raise DyodError(f"--active {args.active}: the run's custom VAE has {latent_dim} latent dimensions")
    dims, variances = most_used_dimensions(run, args.active)
    return dims, {"posterior_mean_variance": variances}


def cmd_demo(args) -> None:
    from .demo import DemoConfig, run_demo

    config = DemoConfig() if args.num_samples is None else DemoConfig(num_samples=args.num_samples)
    report = run_demo(args.out, config, model=args.model, overwrite=args.overwrite)
    print(f"demo report: {report}")


def _positional_or_flag(positional: str | None, flag: str | None, what: str, usage: str) -> str:
    """A folder a command takes either way, as ``dyod CMD ... FOLDER`` or ``--flag FOLDER``: the one given."""
    name = usage.split()[-1]
    if positional is None and flag is None:
        raise DyodError(f"give the {what}: `{usage}` or `--{name.lower()} {name}`")
    if positional is not None and flag is not None and Path(positional) != Path(flag):
        raise DyodError(f"two {what}s given: {name} {positional} and --{name.lower()} {flag}; give one")
    return positional or flag


def cmd_datasets_make(args) -> None:
    from .world.datasets import make_dataset

    out = _positional_or_flag(args.out, args.out_flag, "output folder", "dyod datasets make NAME OUT")
    out = make_dataset(args.name, out, n=args.n, seed=args.seed, overwrite=args.overwrite, strokes=args.strokes)
    print(f"dataset {args.name}{' as strokes' if args.strokes else ''}: {out}")


def cmd_datasets_list(args) -> None:
    from .world.datasets import DATASETS

    for spec in DATASETS.values():
        print(f"{spec.name:14s} {spec.resolution}x{spec.resolution}  default n={spec.default_n:<5d} {spec.description}")


def cmd_train_features(args) -> None:
    from .world.features import FeatureTrainConfig, train_feature_net

    card = train_feature_net(args.out, FeatureTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed))
    print(json.dumps(card, indent=2))


def cmd_pretrain(args) -> None:
    from .world.prior_card import card_for
    from .world.prior_training import pretrain

    recorded = Path(args.out) / "training" / "pretrain_config.json"  # with --resume, the flags not given
    config = _resumed_config(args, PretrainConfig, read_json(recorded) if recorded.exists() else None)
    out = pretrain(args.out, config, resume=args.resume, device=args.device)
    card, rows = card_for(out, device=args.device or "cpu")
    print(f"reference prior: {out} (model card: {card})")
    for prop, measured, target, met in rows:
        print(f"  {prop}: {measured} (target {target}{'' if met else ', not met'})")


def cmd_info(args) -> None:
    from .run_info import describe_folder

    print(describe_folder(args.run))


def cmd_ui(args) -> None:
    from .ui import require_gradio, serve

    require_gradio()  # before any run is opened: the way to get it, at once
    serve(args.runs, host=args.host, port=args.port, device=args.device, model=args.model)


def cmd_export(args) -> None:
    from .export import export_embedding

    out = export_embedding(args.run, args.out, args.format, overwrite=args.overwrite)
    print(f"wrote {out} ({args.format})")


def cmd_eval(args) -> None:
    from .data import dataset_files
    from .evaluation import feature_extractor, folder_features, kid
    from .run import outputs_dataset

    if args.ref is None and args.ref_flag is None and (dataset := outputs_dataset(args.samples_dir)):
        logger.info("reference: %s, the dataset of the run that made %s", dataset, args.samples_dir)
        args.ref = dataset
    args.ref = _positional_or_flag(args.ref, args.ref_flag, "reference folder", "dyod eval SAMPLES_DIR REF")
    # Both folders are listed before any features are computed: a mistyped one is named at once.
    ref_files, sample_files = dataset_files(args.ref), dataset_files(args.samples_dir)
    extractor = feature_extractor(args.features, args.inception_weights, args.device or "cpu")
    ref, ref_info = folder_features(args.ref, extractor, files=ref_files)
    samples, sample_info = folder_features(args.samples_dir, extractor, files=sample_files)
    result = kid(samples, ref, subset_size=args.subset_size, num_subsets=args.num_subsets, seed=args.seed)
    print(f"{result}  [features: {args.features}; samples {args.samples_dir}, reference {args.ref}]")
    if args.json:
        write_json(args.json, {"kid_x100": result.mean_x100, "kid_x100_std": result.std_x100, "n_samples": result.n_x,
                               "n_reference": result.n_y, "subset_size": result.subset_size,
                               "num_subsets": result.num_subsets, "features": args.features})


# -- parser ---------------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, where the text does not say it already and there is one to say."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if ("default" in help_text or not action.option_strings or action.nargs == 0
                or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))):  # 0 == False
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """dyod's parsers, the commands' included (argparse makes them of the parser's class): flags are taken whole, not by
    a prefix (`--step` for `--steps`), which a flag added later would make ambiguous; a mistyped or shortened flag
    is refused naming the flag it is nearest."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dyod", description="Customize a pre-trained text-to-image diffusion model to your own data (DYOD)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"dyod {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def training(name: str, help_text: str, inversion: bool, vae: bool):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (searched recursively)")
        if inversion:
            p.add_argument("--model", required=True,
                           help="diffusers Stable Diffusion folder or hub id (emoji-prior: the bundled reference "
                                "prior, a miniature SD on emoji scenes, to try dyod offline)")
        p.add_argument("--out", required=True, help="run folder")
        p.add_argument("--overwrite", action="store_true", help="replace what the run folder already holds")
        p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
        p.add_argument("--device", default=None, help="cpu to force the CPU (default: Accelerate's choice, the first GPU; "
                       "CUDA_VISIBLE_DEVICES picks another)")
        add_config_flags(p, DataConfig)
        if inversion:
            add_config_flags(p, InversionConfig)
            p.add_argument("--embedding", metavar="FILE", default=None,
                           help="take S* from a textual inversion already learned for --model on these images "
                                "(diffusers' learned_embeds.safetensors, or an AUTOMATIC1111 .safetensors with "
                                "--placeholder-token) instead of training one")
        if vae:
            add_config_flags(p, VAEConfig, prefix="vae-")
        return p

    p = training("fit", "stage 1 (dataset prompt) and stage 2 (custom VAE)", True, True)
    p.add_argument("--choose-t0", action="store_true",
                   help="hold out 20%% of the images (--holdout-fraction), sweep t0 against them, store the best in the run")
    p.add_argument("--choose-t0-samples", metavar="INT", type=_ranged(int, "--choose-t0-samples", 2), default=100,
                   help="samples per t0 for --choose-t0 (default: 100)")
    p.set_defaults(func=cmd_fit)
    training("invert", "stage 1 alone: learn the dataset prompt S* (Eq. 7)", True, False).set_defaults(func=cmd_invert)
    training("train-vae", "stage 2 alone: train the custom VAE", False, True).set_defaults(func=cmd_train_vae)

    def sampling(name: str, help_text: str, out_required: bool = True, skip: tuple[str, ...] = ()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("run", metavar="RUN", help="run folder made by `dyod fit`")
        p.add_argument("--out", required=out_required, default=None,
                       help="output folder (PNG images, grids, JSON)" + ("" if out_required else " (default: RUN/t0_sweep)"))
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
        p.add_argument("--model", default=None,
                       help="load the prior from this folder or hub id instead of the one RUN records (the same model "
                            "moved, or a run copied to another machine; a model of other shape is refused)")
        p.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="weights of the frozen prior (default auto: fp16 on CUDA, fp32 on the CPU)")
        p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                       help="torch.compile the UNet and the autoencoder (a GPU of compute capability 7.0+; reduce-overhead "
                            "adds CUDA graphs; compiles once: the last batch is padded to --batch-size; cuda-graphs: "
                            "CUDA graphs of the eager kernels, no kernel generation, any CUDA GPU)")
        add_config_flags(p, SampleConfig, skip=skip)
        return p

    p = sampling("sample", "distribution initialization (Eq. 9-10): custom VAE -> perturb to t0 -> DDIM with S*")
    p.add_argument("-n", metavar="INT", type=int, default=16, help="number of samples (default: 16)")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="first seed; sample i uses seed+i")
    p.add_argument("--noise-seed", metavar="INT", type=_seed("--noise-seed"), default=None, help="fix ε to this seed for all samples")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run in --out (or extend one to a larger -n): sample only the seeds whose "
                        "image is missing, with the settings the folder was made with")
    p.set_defaults(func=cmd_sample)

    p = sampling("transform", "image initialization (Eq. 11): perturb inputs to t0 and denoise with S*")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--grayscale", action="store_true", help="convert inputs to grayscale first")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="input i uses noise seed seed+i")
    p.set_defaults(func=cmd_transform)

    p = sampling("interpolate", "Fig. 6: interpolate between the VAE latents of two seeds (or two images)")
    ends = p.add_mutually_exclusive_group(required=True)
    ends.add_argument("--seeds", metavar="INT,INT", help="two seeds, e.g. 3,7: their z and ε")
    ends.add_argument("--images", nargs=2, metavar="FILE",
                      help="two images: their custom-VAE latents (posterior means) as the ends, ε from --noise-seed")
    p.add_argument("--steps", metavar="INT", type=_ranged(int, "--steps", 2), default=8, help="frames, λ from 0 to 1 (default: 8)")
    p.add_argument("--fix-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="the same ε for every frame, so that only the VAE latent changes (default: on)")
    p.add_argument("--noise-seed", metavar="INT", type=_seed("--noise-seed"), default=None,
                   help="seed of ε (default: the first seed; 0 with --images)")
    p.set_defaults(func=cmd_interpolate)

    p = sampling("traverse", "Fig. 7: traverse one dimension of the VAE latent, the rest fixed (several: a row each)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--dim", metavar="INT[,INT...]", help="latent dimension(s), one row of the grid each")
    which.add_argument("--active", metavar="INT", type=_ranged(int, "--active", 1),
                       help="the dimensions the dataset uses most, this many, the most used first: the largest "
                            "variances of the custom VAE's posterior mean over the run's images (`dyod info RUN` says "
                            "how many are active)")
    p.add_argument("--range", metavar="LOW,HIGH", default="-3,3", help="the lowest and highest value of each traversed coordinate (default: -3,3)")
    p.add_argument("--steps", metavar="INT", type=_ranged(int, "--steps", 2), default=7,
                   help="values from low to high, evenly spaced: the columns (default: 7)")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="seed of z and ε (of ε alone with --image)")
    p.add_argument("--image", metavar="FILE", default=None,
                   help="start from this image's custom-VAE latent (posterior mean) instead of the seed's z")
    p.set_defaults(func=cmd_traverse)
    p = sampling("sweep", "the paper's Table 1: KID at each t0 against both baselines, with speed", skip=("t0",))
    p.add_argument("--t0", dest="t0s", metavar="T0[,T0...]", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="comma-separated t0 values")
    p.add_argument("-n", metavar="INT", type=_ranged(int, "-n", 2), default=100, help="samples per t0 (default: 100)")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="first seed")
    p.add_argument("--features", choices=("emoji", "inception"), default="emoji", help="KID features")
    p.add_argument("--inception-weights", metavar="FILE", default=None, help="path of the FID Inception weights")
    p.add_argument("--ref", metavar="DIR", default=None, help="reference folder (default: the run's dataset)")
    p.set_defaults(func=cmd_sweep)

    p = sampling("tune", "choose t0 on the run's held-out images and store it as `dyod sample`'s default", out_required=False,
                 skip=("t0",))
    p.add_argument("--t0", dest="t0s", metavar="T0[,T0...]", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated t0 values")
    p.add_argument("-n", metavar="INT", type=_ranged(int, "-n", 2), default=100, help="samples per t0 (default: 100)")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="first seed")
    p.add_argument("--ref", metavar="DIR", default=None,
                   help="score t0 against these images instead of the run's held-out ones: a folder kept out of "
                        "training, for a run fitted without --holdout-fraction (its training images would favour a "
                        "custom VAE that memorized them)")
    p.set_defaults(func=cmd_tune)

    p = sampling("sweep-transform", "Fig. 5 as numbers: KID of transformed inputs with and without S*", skip=("t0",))
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--t0", dest="t0s", metavar="T0[,T0...]", default="0.4,0.5,0.6,0.7,0.8", help="comma-separated t' values")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="noise seed")
    p.add_argument("--baseline-prompt", metavar="TEXT", default=None, help="prompt without S* (default: 'a photo of INITIALIZER')")
    p.set_defaults(func=cmd_sweep_transform)

    p = sub.add_parser("info", help="what a run folder holds: model, data, each stage (or where it stopped), the chosen "
                                    "t0, and what comes next; or what made a folder of dyod's outputs, or what a folder "
                                    "of images is to dyod")
    p.add_argument("run", metavar="RUN", help="run folder (or a folder dyod sample|transform|... wrote, or of images)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ui", help="a local web page: sketch → your dataset's domain, sampling at any t0, the latent "
                                  "space (needs the ui extra: pip install 'dyod[ui]')")
    p.add_argument("runs", metavar="RUN", nargs="*", default=["."],
                   help="run folders, or folders that hold runs (default: the current folder)")
    p.add_argument("--host", metavar="TEXT", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", metavar="INT", type=_ranged(int, "--port", 1, 65535), default=7860,
                   help="port (default: 7860)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--model", default=None,
                   help="the prior, where it is no longer where the runs were fitted (default: the runs' own)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("export", help="write the run's S* for diffusers or the web UIs (AUTOMATIC1111, ComfyUI, "
                                      "InvokeAI)")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--format", choices=("diffusers", "a1111"), default="diffusers",
                   help="a1111: emb_params, what the web UIs load, named after the file; diffusers: {token: vectors}, "
                        "for load_textual_inversion (default: diffusers)")
    p.add_argument("--out", metavar="FILE", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="KID × 100 of a folder of samples against a dataset folder")
    p.add_argument("samples_dir", metavar="SAMPLES_DIR", help="folder of generated images")
    p.add_argument("ref", metavar="REF", nargs="?", default=None,
                   help="the dataset folder to compare against (or --ref; default: the dataset of the run that made "
                        "SAMPLES_DIR, where its record, the run and the dataset are still here)")
    p.add_argument("--ref", dest="ref_flag", metavar="DIR", default=None, help="the dataset folder, as a flag")
    p.add_argument("--features", choices=("emoji", "inception"), default="emoji",
                   help="emoji: the bundled offline network (default); inception: FID InceptionV3 from a local file")
    p.add_argument("--inception-weights", metavar="FILE", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--subset-size", metavar="INT", type=_ranged(int, "--subset-size", 2), default=None,
                   help="KID subset size (default: min(1000, n_samples, n_reference))")
    p.add_argument("--num-subsets", metavar="INT", type=_ranged(int, "--num-subsets", 1), default=100, help="(default: 100)")
    p.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="subset seed (default: 0)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result to this JSON file")
    p.add_argument("--device", default=None, help="device for the feature network (default: cpu)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("datasets", help="the bundled custom datasets (made from the emoji atlas)")
    datasets = p.add_subparsers(dest="datasets_command", required=True)
    q = datasets.add_parser("make", help="write a bundled dataset as PNG files")
    q.add_argument("name", metavar="NAME", help="apple-orange, faces or fruit-stack (see `dyod datasets list`)")
    q.add_argument("out", metavar="OUT", nargs="?", default=None, help="output folder (or --out)")
    q.add_argument("--out", dest="out_flag", metavar="OUT", default=None, help="output folder, as every other command takes it")
    q.add_argument("-n", "--n", metavar="INT", type=_ranged(int, "-n", 1), default=None, help="number of images (default: the dataset's)")
    q.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="seed (default: 0)")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    q.add_argument("--strokes", action="store_true",
                   help="paint each scene as flat discs of its emoji's colours, inputs for `dyod transform` (give "
                        "another --seed than the dataset's for scenes it does not hold)")
    q.set_defaults(func=cmd_datasets_make)
    datasets.add_parser("list", help="list the bundled datasets").set_defaults(func=cmd_datasets_list)

    p = sub.add_parser("world", help="build the offline reference world's networks")
    world = p.add_subparsers(dest="world_command", required=True)
    q = world.add_parser("train-features", help="train the emoji feature network used by offline KID")
    q.add_argument("--steps", metavar="INT", type=_ranged(int, "--steps", 1), default=6000, help="optimization steps")
    q.add_argument("--batch-size", metavar="INT", type=_ranged(int, "--batch-size", 2), default=128, help="scenes per step")
    q.add_argument("--seed", metavar="INT", type=_seed("--seed"), default=0, help="training seed")
    q.add_argument("--out", default=None, help="folder (default: the package's assets)")
    q.set_defaults(func=cmd_train_features)

    p = sub.add_parser("reference", help="the reference prior: a miniature Stable Diffusion on the emoji world")
    reference = p.add_subparsers(dest="reference_command", required=True)
    q = reference.add_parser("pretrain", help="pre-train the reference prior (diffusers layout) on the scene corpus")
    q.add_argument("--out", required=True, help="output folder (a diffusers model folder)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted pre-training in --out")
    q.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add_config_flags(q, PretrainConfig)
    q.set_defaults(func=cmd_pretrain)

    from .demo import (
        DemoConfig,  # a dataclass; the demo's work imports its libraries when it runs
    )

    p = sub.add_parser("demo", help="the method end to end on bundled defaults, with a report")
    p.add_argument("--out", default="demo-out", help="demo folder (default: demo-out)")
    p.add_argument("--model", default="emoji-prior", help="diffusers model (default: the bundled reference prior)")
    p.add_argument("--num-samples", metavar="INT", type=_ranged(int, "--num-samples", 2), default=None,
                   help=f"samples per sampler (default: {DemoConfig.num_samples})")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    p.set_defaults(func=cmd_demo)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let ``--range -3,3`` work, and ``--guidance-scale -inf`` reach the check of its value: argparse reads "-3,3"
    and "-inf" as options ("expected one argument")."""
    out: list[str] = []
    for arg in argv:
        previous = out[-1] if out else ""
        negative_word = arg.lower() in ("-inf", "-infinity", "-nan")
        if previous.startswith("--") and "=" not in previous and arg.startswith("-") and (
                (previous == "--range" and arg[1:2].isdigit()) or negative_word):
            out[-1] = f"{previous}={arg}"
        else:
            out.append(arg)
    return out


def _refuse_unknown_arguments(parser: argparse.ArgumentParser, args, unknown: list[str]) -> None:
    """argparse's own refusal shows the top-level usage, without the command's flags; this one is the command's,
    with the flag nearest to each mistyped one (``--t0s``: did you mean --t0?)."""
    import difflib

    while True:  # the innermost command given (`dyod datasets make` is two levels down)
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is None or getattr(args, commands.dest, None) not in commands.choices:
            break
        parser = commands.choices[getattr(args, commands.dest)]
    # compared without the dashes, which every flag shares: `--count` is not near enough `--out` to suggest it
    given = [flag for action in parser._actions for flag in action.option_strings]
    flags = [flag[2:] for flag in given if flag.startswith("--")]
    hints = []
    for name in (arg.split("=", 1)[0] for arg in unknown):
        if not name.startswith("--"):
            continue
        # a short flag with two dashes (`--n`), a shortened flag (`--step`: dyod takes flags only whole), a flag's
        # last words (`--steps` for sample's `--num-inference-steps`, `--epochs` for `--vae-epochs`), else the
        # nearest spelling
        close = ([name[1:]] if name[1:] in given else
                 ["--" + flag for flag in flags if flag.startswith(name[2:])]
                 or ["--" + flag for flag in flags if flag.endswith("-" + name[2:])]
                 or ["--" + flag for flag in difflib.get_close_matches(name[2:], flags, n=1, cutoff=0.8)])
        if close:
            listed = " or ".join(close) if len(close) <= 3 else f"one of {', '.join(close[:3])}, ... ({len(close)} flags)"
            hints.append(f"{name}: did you mean {listed}?")
    parser.error("; ".join([f"unrecognized arguments: {' '.join(unknown)}", *hints]))


def _check_device(device: str | None) -> None:
    """``--device`` names a device this machine has: PyTorch's own answer to a missing GPU is a traceback from deep
    inside the first tensor moved there."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise DyodError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DyodError(f"--device {device}: {why}; leave --device out (or give cpu) to run on the CPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DyodError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            "numbered from 0")
    elif parsed.type != "cpu":  # mps (Apple GPUs), xpu, ...: each backend says whether this machine has one
        backend = getattr(torch.backends, parsed.type, None) or getattr(torch, parsed.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise DyodError(f"--device {device}: this machine (or this PyTorch) has no {parsed.type} device; leave "
                            "--device out to run on the GPU if there is one, else the CPU")


TRAINING_COMMANDS = ("fit", "invert", "train-vae")


def _folders_written(args) -> list[tuple[str, str]]:
    """The folders a command writes, each held by one process at a time (``folder_lock``)."""
    folders = []
    out = getattr(args, "out", None)
    if out:
        folders.append((out, "run folder" if args.command in TRAINING_COMMANDS else "output folder"))
    if args.command == "tune":  # records the chosen t0 in the run
        folders.append((args.run, "run folder"))
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if unknown:
        _refuse_unknown_arguments(parser, args, unknown)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)  # also where logging was configured before us
    _quiet_libraries()
    try:
        _check_device(getattr(args, "device", None))
        from .locking import folder_lock
        from .run import is_main_process

        if not is_main_process() and args.command not in SHARED_COMMANDS:
            # the same work in every process would be repeated and would race for the same files
            logger.info("`dyod %s` runs in the main process alone", args.command)
            return 0
        with contextlib.ExitStack() as held:
            if is_main_process():  # the processes of one launch share its folders
                for folder, what in _folders_written(args):
                    held.enter_context(folder_lock(folder, what))
            args.func(args)
    except DyodError as e:
        print(f"dyod {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be written or read (a file where a folder goes, a full disk, ...)
        import errno

        logger.debug("dyod %s failed", args.command, exc_info=True)
        where = f" ({e.filename})" if e.filename and str(e.filename) not in str(e) else ""
        advice = ("free some space (or give another folder) and run the command again (--resume continues a "
                  "training); " if e.errno == errno.ENOSPC else "")
        print(f"dyod {args.command}: error: {e}{where}\n  ({advice}what was finished before it is kept; -v shows where "
              "it happened)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; completed checkpoints and outputs are kept{_how_to_go_on(args)}", file=sys.stderr)
        return 130
    finally:
        _detach_run_logs()
        _end_processes()
    return 0


def _how_to_go_on(args) -> str:
    """After Ctrl-C: the command that continues what was stopped."""
    if args.command in ("fit", "invert", "train-vae"):
        from .run import shell_quoted

        return (f": the same command with --resume continues (`dyod info {shell_quoted(args.out)}` shows where each "
                "stage stopped)")
    if args.command == "reference":
        return ": the same command with --resume continues"
    if args.command == "sample":
        return ": the same command with --resume makes only the samples not yet written"
    return ""


def _end_processes() -> None:
    """Under a multi-process launch (torchrun, accelerate launch), leave the process group once every stage is done."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
