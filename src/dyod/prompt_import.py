"""S* learned elsewhere (diffusers' textual-inversion example, another dyod run, a web UI) as a run's dataset prompt,
in place of stage 1."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .checkpoint import CHECKPOINT_FILE
from .config import DataConfig, InversionConfig, to_dict, write_json
from .data import RUN_FILE, ImageFolder, dataset_files, iter_images, nothing_readable
from .embeddings import save_learned_embeds
from .errors import DyodError
from .performance import new_accelerator, training_on_cpu
from .prior import load_prior, model_reference
from .run import Run

logger = logging.getLogger(__name__)


def import_dataset_prompt(
    data_dir: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    embedding: str | os.PathLike,
    data_config: DataConfig = DataConfig(),
    token: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> Path:
    """S* from a textual inversion learned elsewhere for ``model`` on the images in ``data_dir`` (diffusers'
    ``learned_embeds.safetensors``, or the AUTOMATIC1111 web UI's ``.safetensors``), instead of learning it: the run
    is then as ``invert`` leaves it, ready for the custom VAE and sampling. ``token`` renames the file's pseudo-word
    (the web UI's names none). Returns the run's ``learned_embeds.safetensors``."""
    from .embeddings import load_into, read_textual_inversion
    from .run import file_sha256

    embedding = Path(embedding)
    token, vectors = read_textual_inversion(embedding, token)  # an unreadable file is named before anything is made
    try:
        InversionConfig(placeholder_token=token, num_vectors=len(vectors))  # the token's own checks (spaces, {})
    except ValueError as e:
        raise DyodError(f"{embedding}: {e}") from None
    files = dataset_files(data_dir, data_config.holdout_fraction)
    # Under a multi-process launch (`dyod fit --embedding` with the custom VAE's processes) every process checks what
    # the main process alone writes, so that each fails or goes on alike; as in invert, the run folder is the main's.
    accelerator = new_accelerator(mixed_precision="no", cpu=training_on_cpu(device))
    main = accelerator.is_main_process
    with accelerator.main_process_first():
        made_here = None if (Path(out) / RUN_FILE).exists() else Path(out).exists()
        run = Run.open_or_create(out)
    checkpoint = run.inversion_path / CHECKPOINT_FILE
    if not overwrite and (checkpoint.exists() or run.embeddings_path.exists()):
        raise DyodError(f"{run.path} already holds a dataset prompt; pass --overwrite to replace it with {embedding}")
    accelerator.wait_for_everyone()  # every process has seen the run as it was before the main one changes it
    try:
        prior = load_prior(model)
        # the width and the token checked the way sampling will load them: an embedding made for another text
        # encoder, or a token that is a word of the model's vocabulary, is refused here, naming the file
        try:
            load_into(prior.tokenizer, prior.text_encoder, token, vectors)
        except DyodError as e:
            raise DyodError(f"{embedding}: {e}") from None
    except DyodError:
        if main and made_here is not None:  # a run this command began and nothing else: gone, as if never begun
            run.remove_if_bare(folder_existed=made_here)
        raise
    # the dataset is read as invert reads it (each image decoded once, the unreadable ones recorded with the reason):
    # the run's record of its data sets the samples' resolution and what `dyod eval` scores against
    data = ImageFolder(Path(data_dir), images=[], paths=[], skipped=[], sizes=[])
    for _ in iter_images(data, files, data_config.grayscale, data_config.max_images):
        pass
    if not len(data):
        raise nothing_readable(Path(data_dir), files, data.skipped)
    if main:
        run.bind_model(model_reference(model), prior.describe())
        run.update(data={k: v for k, v in data.stats().items() if k != "skipped"}, data_config=to_dict(data_config))
        write_json(run.path / "data.json", data.stats())
        if overwrite:
            checkpoint.unlink(missing_ok=True)  # a training's checkpoint would --resume into another S*
        save_learned_embeds(run.embeddings_path, token, vectors)
        run.update(placeholder_token=token, num_vectors=len(vectors))
        run.set_stage("inversion", {
            "imported_from": str(embedding.resolve()),
            "sha256": file_sha256(embedding),
            "num_vectors": len(vectors),
        })
        logger.info("dataset prompt: %s (%d vector(s)) imported from %s", token, len(vectors), embedding)
    accelerator.wait_for_everyone()  # the next stage (fit's custom VAE) reads what the main process wrote
    return run.embeddings_path


def holds_import_of(out: str | os.PathLike, embedding: str | os.PathLike) -> bool:
    """Whether the run in ``out`` holds S* imported (``import_dataset_prompt``) from this very file, the same bytes."""
    from .run import file_sha256

    if not (Path(out) / RUN_FILE).exists() or not Path(embedding).is_file():
        return False
    run = Run.open(out)
    stage = run.info.get("stages", {}).get("inversion", {})
    return (run.embeddings_path.exists() and stage.get("imported_from") is not None
            and stage.get("sha256") == file_sha256(Path(embedding)))
