"""The learned dataset prompt S* for the tools people generate with: diffusers' format, or the web UIs'.

    dyod export RUN --format diffusers|a1111 --out FILE

``a1111`` writes what AUTOMATIC1111's web UI, ComfyUI and InvokeAI load as a textual-inversion embedding: a
safetensors file holding one tensor, ``emb_params`` [num_vectors, width] (every vector of S*, in order), named after
the file in the prompt (``my-data.safetensors`` is written ``my-data`` in A1111, ``embedding:my-data`` in ComfyUI),
with the name, step count and model it was trained for in the file's metadata. ``diffusers`` writes
``{token: [num_vectors, width]}``, what ``StableDiffusionPipeline.load_textual_inversion`` reads."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from .embeddings import load_learned_embeds, save_learned_embeds
from .errors import DyodError, write_atomically
from .run import Run, check_output_folder

FORMATS = ("diffusers", "a1111")


def export_embedding(run: str | os.PathLike, out: str | os.PathLike, format: str = "diffusers",
                     overwrite: bool = False) -> Path:
    """Write the run's S* to ``out`` (a .safetensors file) in ``format``; return ``out``."""
    if format not in FORMATS:
        raise DyodError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    run = Run.open(run)
    if not run.embeddings_path.exists():
        raise DyodError(f"run {run.path} has no dataset prompt S* ({run.embeddings_path.name}); learn it first with "
                        f"`dyod invert DATA --model MODEL --out {run.path}` (or `dyod fit`)")
    token, vectors = load_learned_embeds(run.embeddings_path)  # refuses non-finite values, naming the file
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise DyodError(f"--out {out}: give a file name ending in .safetensors (the web UIs and diffusers read "
                        "embeddings from safetensors; dyod writes no pickles)")
    if out.is_dir():
        raise DyodError(f"--out {out} is a folder; give a file name ending in .safetensors")
    if out.exists() and not overwrite:
        raise DyodError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    check_output_folder(out.parent, overwrite=True, what="folder")  # a file where the folder goes is refused
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "diffusers":
        save_learned_embeds(out, token, vectors)
        return out
    inversion = run.info.get("stages", {}).get("inversion", {})
    metadata = {"name": out.stem, "token": token, "num_vectors": str(vectors.shape[0]),
                "sd_checkpoint_name": str(run.info.get("model", "")), "format": "dyod dataset prompt (S*)"}
    if inversion.get("steps") is not None:
        metadata["step"] = str(inversion["steps"])
    tensors = {"emb_params": vectors.float().contiguous()}
    write_atomically(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "embedding")
    return out
