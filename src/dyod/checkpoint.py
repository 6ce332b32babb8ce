"""Resumable training state in safetensors (never pickle): tensors, optimizer moments, RNG state, JSON metadata.

Written atomically (temporary file, then rename), so a crash leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import to_dict
from .errors import DyodError, first_line, write_atomically

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"  # in RUN/inversion/ and RUN/vae/


def save_training_state(path: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, step: int, meta: dict | None = None) -> None:
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    out["generator"] = generator.get_state()
    metadata = {"step": str(step), **{k: json.dumps(v) for k, v in (meta or {}).items()}}
    write_atomically(path, lambda tmp: save_file(out, str(tmp), metadata=metadata), "checkpoint")


def load_training_state(path: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore the optimizer and the generator; return (step, the other tensors, the metadata)."""
    meta = checkpoint_meta(path)
    step = meta.pop("step")
    tensors = read_safetensors(path, "checkpoint", "start the stage again with --overwrite")
    state = optimizer.state_dict()
    for key in [k for k in tensors if k.startswith("optim.")]:
        _, i, name = key.split(".", 2)
        value = tensors.pop(key)
        state["state"].setdefault(int(i), {})[name] = value.to(device) if value.ndim else value
    optimizer.load_state_dict(state)
    generator.set_state(tensors.pop("generator"))
    return step, tensors, meta


def truncate_log(path: Path, last: int, key: str = "step") -> None:
    """Keep the lines of a JSON-lines log up to ``last`` (of ``key``): a resumed run logs what it redoes once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)[key] <= last]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def checkpoint_meta(path: Path) -> dict:
    """A checkpoint's metadata alone (the step and what ``save_training_state`` was given), without its tensors."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return {k: int(v) if k == "step" else json.loads(v) for k, v in metadata.items()}
    except (OSError, ValueError, SafetensorError) as e:
        raise DyodError(_damaged(path, "checkpoint", e, "start the stage again with --overwrite")) from None


def read_safetensors(path: Path, what: str, remedy: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file dyod wrote; a damaged one is named, with ``remedy``, not a traceback."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DyodError(_damaged(path, what, e, remedy)) from None


def _damaged(path: Path, what: str, error: Exception, remedy: str) -> str:
    detail = first_line(error) or type(error).__name__
    return (f"the {what} {path} cannot be read ({detail}): it is damaged (dyod writes its files whole, so a copy cut "
            f"short or another program changed it); {remedy}")


def check_resumed_config(recorded: dict | None, config, shape: tuple[str, ...], results: tuple[str, ...],
                         where: Path) -> None:
    """A stage resumed with other settings than its checkpoint's: those that shape what the checkpoint holds
    (``shape``: the number of vectors, the VAE's size) are refused, before anything loads into the wrong shape; those
    that change what is learned (``results``: batch size, learning rate, ...) are taken, with a warning that the
    result is not an uninterrupted run's (halving the batch size after running out of memory is such a change). The
    others (steps, checkpointing, precision, ...) change nothing that is learned. ``recorded``: None for a checkpoint
    older than this record, which is then taken as it is."""
    if not recorded:
        return
    asked = to_dict(config)

    def changes(names: tuple[str, ...]) -> list[str]:
        return [f"{k} {recorded[k]!r} then, {asked[k]!r} now" for k in names
                if k in recorded and recorded[k] != asked[k]]

    if changes(shape):
        raise DyodError(f"--resume: the checkpoint in {where} was made with other settings "
                        f"({'; '.join(changes(shape))}), which shape what it holds; resume with its settings (on the "
                        "command line, the settings not given are the run's own) or pass --overwrite to start over")
    if changes(results):
        logger.warning(
            "--resume with other settings than the checkpoint in %s (%s): training goes on with them, so the result "
            "is not what an uninterrupted run would give", where, "; ".join(changes(results)))


def divergence_advice(problem: str, checkpoint: Path, remedy: str, again: str = "the same command") -> str:
    """What to say when training diverges: the checkpoint to --resume from only where one exists (a training that
    starts over removes the earlier one first, so one that exists is this training's), else to start again."""
    if checkpoint.exists():
        return f"{problem}; the last checkpoint in {checkpoint} is intact. {remedy}, then {again} with --resume"
    return f"{problem}, before any checkpoint was written, so nothing is lost. {remedy}, then {again} again"


class CheckpointOnInterrupt:
    """Ctrl-C during a training loop: the step in progress finishes (an optimizer step cut in two would leave its
    moments half-updated), the loop writes a checkpoint there and stops, so that --resume loses nothing done; a second
    Ctrl-C stops at once. ``stopping(done, total)`` is what the loop reads after each step. Only in a single process's main thread:
    signal handlers can be set nowhere else, and the processes of a multi-process launch would stop at different steps
    (there Ctrl-C stops at once, back to the last periodic checkpoint)."""

    def __init__(self, enabled: bool = True, what: str = "step"):
        self.enabled, self.what = enabled, what
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CheckpointOnInterrupt":
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):  # ignored (nohup, `&`): left ignored
            # None: a handler set outside Python, which cannot be put back; Python's own is the nearest
            self._previous = signal.signal(signal.SIGINT, self._handle) or signal.default_int_handler
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts as it always does
        logger.warning("interrupted: finishing the %s in progress and writing a checkpoint (Ctrl-C again stops at "
                       "once)", self.what)

    def stopping(self, done: int, total: int) -> bool:
        """Whether the loop stops after ``done`` of ``total`` (the last one ends the loop anyway, as usual)."""
        return self.requested and done < total

    def stop(self, bar, done: int, total: int, what: str, unit: str, checkpoint: Path):
        """Once the checkpoint of ``done`` is written: say where ``what`` stopped and raise KeyboardInterrupt."""
        bar.n = done  # the bar counts an iteration when the next begins
        bar.close()
        logger.warning("%s stopped at %s %d of %d; %s holds it: the same command with --resume continues", what, unit,
                       done, total, checkpoint)
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None
