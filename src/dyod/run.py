"""The run folder: everything a later command needs, so that ``dyod sample RUN`` takes only RUN.

Layout::

    RUN/run.json                     model id or path, prior facts, token, stage summaries (JSON)
    RUN/data.json                    dataset statistics and the skipped files with their reasons
    RUN/learned_embeds.safetensors   the dataset prompt S*, diffusers' format
    RUN/inversion/                   config.json, log.jsonl, checkpoint.safetensors (resumable)
    RUN/vae/                         model.safetensors, config.json, log.jsonl, samples/*.png
    RUN/dyod.log                     the CLI's log
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path

from . import __version__
from .config import read_json, write_json
from .data import RUN_FILE
from .embeddings import EMBEDDINGS_FILE
from .errors import DyodError

logger = logging.getLogger(__name__)

ACTIVITY_FILE = "latent_activity.json"  # in RUN/vae/: how much the dataset uses each latent dimension


def check_run_to_resume(out: str | os.PathLike) -> None:
    """--resume continues a run: where ``out`` holds none, say so before anything is made there."""
    if not (Path(out) / RUN_FILE).exists():
        raise DyodError(f"--resume: {out} holds no run ({RUN_FILE} is missing), so there is nothing to resume; leave "
                        "out --resume to start one there")


def check_output_folder(folder: str | os.PathLike, overwrite: bool, what: str = "output folder",
                        flag: str = "--out") -> Path:
    """A folder dyod may write its outputs into: one that does not exist yet, an empty one, or with ``overwrite`` one
    that holds files already; never a file. Checked before any work, so a refusal costs nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DyodError(f"{what} {folder} is a file, not a folder; choose another {flag}")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise DyodError(f"{what} {folder} is not empty; pass --overwrite or choose another {flag}")
    return folder


def _folder_kind(path: Path) -> str | None:
    """What dyod makes of a folder that is not a run: "outputs" (a record of dyod's beside them), "model" (a diffusers
    model's model_index.json), "images" (image files, at any depth), or None."""
    from itertools import islice

    from .data import IMAGE_SUFFIXES, OUTPUT_RECORD

    if not path.is_dir():
        return None
    if (path / OUTPUT_RECORD).is_file():
        return "outputs"
    if any((path / part).exists() for part in RUN_PARTS):
        return "run without record"
    if (path / "model_index.json").is_file():
        return "model"
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in islice(path.rglob("*"), 10_000)):
        return "images"
    return None


# What a run folder holds besides run.json: a folder with one of them and no run.json lost its record
RUN_PARTS = (EMBEDDINGS_FILE, "vae/model.safetensors", "inversion/checkpoint.safetensors", "vae/checkpoint.safetensors")

# The type of each field of run.json that commands read: a record edited by hand or damaged is named, not a TypeError
RUN_FIELD_TYPES = {"model": str, "placeholder_token": str, "num_vectors": int, "stages": dict, "data": dict,
                   "data_config": dict, "prior": dict, "chosen_t0": (dict, type(None))}


def check_run_record(path: Path, info: dict) -> dict:
    """run.json's fields of the types dyod writes, or a DyodError naming the file, the field and what to do."""
    wrong = [(k, v) for k, v in info.items() if k in RUN_FIELD_TYPES and not isinstance(v, RUN_FIELD_TYPES[k])]
    wrong += [(f"stages.{k}", v) for k, v in (info.get("stages") or {}).items()
              if isinstance(info.get("stages"), dict) and not isinstance(v, dict)]
    if wrong:
        key, value = wrong[0]
        raise DyodError(f"{path} records {key} as {json.dumps(value)[:60]} ({type(value).__name__}), not what dyod "
                        "writes there: the file was edited or damaged; restore it from a copy, or fit the run again "
                        "into a new --out")
    return info


def _not_a_run(path: Path) -> str:
    """Why ``path`` is no run, and what to give instead: a folder of samples or of images, given where a run goes
    (`dyod info SAMPLES`, `dyod sample DATA_DIR`), was told to make a run inside it."""
    from .data import OUTPUT_RECORD

    if path.is_file():
        inside = next((folder for folder in path.parents[:3] if (folder / RUN_FILE).is_file()), None)
        return (f"{path} is a file, not a run folder" + (f"; it is in the run {inside}: give that folder" if inside
                                                          else "; give the folder `dyod fit --out` made"))
    kind = _folder_kind(path)
    if kind == "run without record":
        held = ", ".join(part for part in RUN_PARTS if (path / part).exists())
        return (f"{path} holds a run's files ({held}) but not its {RUN_FILE}, the record of its model, data and "
                f"stages, which every command reads; restore {RUN_FILE} from a copy, or fit the run again: "
                f"`dyod fit DATA_DIR --model MODEL --out {shell_quoted(path)} --overwrite` (or a new --out)")
    if kind == "outputs":
        made = _output_record(path)
        return (f"{path} holds the outputs of `dyod {made.get('command', '?')}` (its {OUTPUT_RECORD}), not a run; the "
                f"run that made them: {made.get('run_path') or made.get('run') or '(not recorded)'}")
    if kind == "model":
        return (f"{path} is a diffusers model (model_index.json), not a run; fit a run with it: `dyod fit DATA_DIR "
                f"--model {shell_quoted(path)} --out RUN`")
    if kind == "images":
        return (f"{path} holds images, not a run (no {RUN_FILE}); fit a run on them with "
                f"`dyod fit {shell_quoted(path)} --model MODEL --out RUN` and give RUN")
    what = "does not exist" if not path.exists() else f"has no {RUN_FILE}"
    return f"run folder {path} {what}; create one with `dyod fit DATA_DIR --model MODEL --out {shell_quoted(path)}`"


def _output_record(path: Path) -> dict:
    from .data import OUTPUT_RECORD

    try:
        return read_json(path / OUTPUT_RECORD)
    except (DyodError, OSError):  # none, or a damaged one: it says nothing
        return {}


def is_main_process() -> bool:
    """False in the other processes of a multi-process launch (torchrun and accelerate launch set RANK): the main
    process alone writes the run folder and does what is one process's work."""
    return int(os.environ.get("RANK", "0")) == 0


class Run:
    def __init__(self, path: Path, info: dict):
        self.path = path
        self.info = info

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        if not (path / RUN_FILE).exists():
            raise DyodError(_not_a_run(path))
        return cls(path, check_run_record(path / RUN_FILE, read_json(path / RUN_FILE)))

    @classmethod
    def open_or_create(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        if (path / RUN_FILE).exists():
            return cls.open(path)
        check_output_folder(path, overwrite=True, what="run folder")  # a file is refused; files already there stay
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, {"dyod_version": __version__, "created": _now(), "stages": {}})
        run.save()
        return run

    def remove_if_bare(self, folder_existed: bool) -> None:
        """Remove a run that holds nothing but its fresh run.json and the log of the command that made it (which
        failed before any work: the error was on the terminal), and its folder where the command made it."""
        names = {p.name for p in self.path.iterdir()}
        if RUN_FILE in names and names <= {RUN_FILE, "dyod.log"} and "model" not in self.info:  # its log, if any
            for name in names:
                (self.path / name).unlink()
            if not folder_existed:
                self.path.rmdir()

    def save(self) -> None:
        write_json(self.path / RUN_FILE, self.info)

    def update(self, **sections) -> None:
        self.info.update(sections)
        self.info["updated"] = _now()
        self.save()

    def set_stage(self, name: str, summary: dict) -> None:
        self.info.setdefault("stages", {})[name] = summary
        self.update()

    def bind_model(self, model: str, prior_facts: dict) -> None:
        """Record the prior; a run made for one model refuses another (an embedding only fits its text encoder)."""
        from .prior import same_model

        known = self.info.get("model")
        if known is not None and not same_model(known, model):
            raise DyodError(
                f"run {self.path} was made for model {known!r}, not {model!r}; use a new --out folder"
            )
        self.update(model=model, prior=prior_facts)

    @property
    def model(self) -> str:
        if "model" not in self.info:
            raise DyodError(f"run {self.path} records no model; run `dyod invert` or `dyod fit` on it first")
        return self.info["model"]

    @property
    def embeddings_path(self) -> Path:
        return self.path / EMBEDDINGS_FILE

    @property
    def vae_path(self) -> Path:
        return self.path / "vae"

    @property
    def vae_weights_path(self) -> Path:
        """The custom VAE's weights: there once stage 2 has finished."""
        return self.vae_path / "model.safetensors"

    @property
    def latent_activity_path(self) -> Path:
        """How much the dataset uses each latent dimension of the custom VAE (``vae.latent_activity``)."""
        return self.vae_path / ACTIVITY_FILE

    @property
    def inversion_path(self) -> Path:
        return self.path / "inversion"

    def results_fingerprint(self) -> dict:
        """SHA-256 of what the two stages made (S* and the custom VAE's weights; None for a stage not made): stored
        with the t0 ``dyod tune`` chooses, which holds only for the S* and VAE it was chosen with."""
        return {name: file_sha256(path) if path.exists() else None
                for name, path in (("embedding", self.embeddings_path), ("vae", self.vae_weights_path))}

    def changed_results(self, recorded: dict) -> list[str]:
        """What was trained again since ``recorded`` (a ``results_fingerprint``): "dataset prompt S*", "custom VAE"."""
        current = self.results_fingerprint()
        return [what for name, what in (("embedding", "dataset prompt S*"), ("vae", "custom VAE"))
                if recorded.get(name) != current[name]]

    def chosen_t0(self) -> float | None:
        """The t0 chosen on held-out images (``dyod tune``, ``fit --choose-t0``), if S* and the custom VAE are still
        those it was chosen for (a stage trained again since, by --overwrite or --resume, makes it stale)."""
        chosen = self.info.get("chosen_t0")
        if not chosen:
            return None
        recorded = chosen.get("fingerprint")  # runs from before fingerprints were recorded: taken as they are
        changed = self.changed_results(recorded) if recorded is not None else []
        if changed:
            logger.warning("run %s: the t0 chosen on held-out images (%.2f) was chosen with %s as it was before it was "
                           "trained again; not using it (`dyod tune %s` chooses again)", self.path, chosen["t0"],
                           " and ".join(f"the {what}" for what in changed), self.path)
            return None
        return float(chosen["t0"])

    def check_can_sample(self, prompt: str, t0s=(1.0,), otherwise: str = "use --t0 1") -> None:
        """Before any model loads: sampling below t0 = 1 starts from the custom VAE, and a prompt with {} uses S*.
        ``otherwise`` is the way round a missing VAE that the command offers."""
        below = [t for t in t0s if t < 1.0]
        if below and not self.vae_weights_path.exists():
            raise DyodError(f"run {self.path} has no custom VAE, which t0 = {below[0]:g} starts from; run "
                            f"`dyod train-vae` (or `dyod fit`) first, or {otherwise}")
        if "{}" in prompt and not self.embeddings_path.exists():
            raise DyodError(f"run {self.path} has no dataset prompt S* ({self.embeddings_path.name}), which the prompt "
                            f"{prompt!r} uses; run `dyod invert` (or `dyod fit`) first, or give a --prompt without "
                            "{}")

    @property
    def data_resolution(self) -> int | None:
        return self.info.get("data", {}).get("resolution")


def outputs_dataset(path: str | os.PathLike) -> str | None:
    """The dataset folder of the run that made the outputs in ``path``, where the record, the run and the folder are
    all still here: what ``dyod eval SAMPLES`` scores against when given no reference."""
    run = _output_record(Path(path)).get("run_path")
    try:
        root = Run.open(run).info.get("data", {}).get("root") if run else None
    except (DyodError, OSError, ValueError):
        return None
    return root if root and Path(root).is_dir() else None


def shell_quoted(path: str | os.PathLike) -> str:
    """A path as a shell reads it in a command to copy: `dyod eval 'my samples'`, not two arguments."""
    import shlex

    return shlex.quote(str(path))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
