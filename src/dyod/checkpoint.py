"""Resumable training state in safetensors (never pickle): tensors, optimizer moments, RNG state, JSON metadata.

Written atomically (temporary file, then rename), so a crash leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_training_state(path: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, step: int, meta: dict | None = None) -> None:
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    out["generator"] = generator.get_state()
    metadata = {"step": str(step), **{k: json.dumps(v) for k, v in (meta or {}).items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_training_state(path: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore the optimizer and the generator; return (step, the other tensors, the metadata)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    state = optimizer.state_dict()
    for key in [k for k in tensors if k.startswith("optim.")]:
        _, i, name = key.split(".", 2)
        value = tensors.pop(key)
        state["state"].setdefault(int(i), {})[name] = value.to(device) if value.ndim else value
    optimizer.load_state_dict(state)
    generator.set_state(tensors.pop("generator"))
    meta = {k: json.loads(v) for k, v in metadata.items() if k != "step"}
    return int(metadata["step"]), tensors, meta


def truncate_log(path: Path, last: int, key: str = "step") -> None:
    """Keep the lines of a JSON-lines log up to ``last`` (of ``key``): a resumed run logs what it redoes once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)[key] <= last]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
