"""Both training stages on one dataset, as ``dyod fit`` runs them: the dataset prompt (Eq. 7), the custom VAE, and
optionally t0 chosen on held-out images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import DataConfig, InversionConfig, VAEConfig
from .errors import DyodError

logger = logging.getLogger(__name__)


def check_heldout(data_dir: str | os.PathLike, fraction: float) -> None:
    """Choosing t0 scores it with KID against the held-out images, which needs two of them: say so before training."""
    from .data import dataset_files, is_heldout

    if not fraction:
        raise DyodError("--choose-t0 chooses t0 on held-out images; give --holdout-fraction above 0 (default 0.2)")
    # the folder read once: one that is no dataset at all is named as such, not as a split too small
    held = [f for f in dataset_files(data_dir) if is_heldout(f, Path(data_dir), fraction)]
    if len(held) < 2:
        raise DyodError(f"--choose-t0 scores t0 with KID against the held-out images, which needs at least 2; "
                        f"--holdout-fraction {fraction} holds out {len(held)} of the images in {data_dir}. Give a "
                        "larger --holdout-fraction, or more images")


def fit(
    data_dir: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    inversion_config: InversionConfig = InversionConfig(),
    vae_config: VAEConfig = VAEConfig(),
    data_config: DataConfig = DataConfig(),
    choose_t0: bool = False,
    choose_t0_samples: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    embedding: str | os.PathLike | None = None,
    token: str | None = None,
) -> Path:
    """Learn S* (``invert``), train the custom VAE (``train_vae``) and, with ``choose_t0``, sweep t0 < 1 against the
    images ``data_config.holdout_fraction`` keeps out of both stages and store the best as the run's default t0.
    ``resume`` continues whichever stage was stopped. With ``embedding`` (a textual inversion learned elsewhere, see
    ``import_dataset_prompt``; ``token`` renames it) S* is imported instead of learned. Returns the run folder."""
    from .inversion import invert
    from .prompt_import import holds_import_of, import_dataset_prompt
    from .run import Run, is_main_process
    from .vae_training import CHECKPOINT_FILE, train_vae

    if choose_t0:
        check_heldout(data_dir, data_config.holdout_fraction)  # before any training
    if embedding is None:
        invert(data_dir, model, out, inversion_config, data_config, resume=resume, overwrite=overwrite,
               progress=progress, device=device)
    else:
        if not (resume and holds_import_of(out, embedding)):  # resuming the VAE: the same file's import is kept
            import_dataset_prompt(data_dir, model, out, embedding, data_config, token=token, overwrite=overwrite,
                                  device=device)
        if choose_t0 and is_main_process():
            logger.warning("t0 is chosen on the images --holdout-fraction keeps out of training here, but S* from %s "
                           "was learned elsewhere, perhaps on them too: the chosen t0's score may be optimistic",
                           embedding)
    run = Run.open(out)
    resume_vae = resume and (run.vae_path / CHECKPOINT_FILE).exists()
    if resume and not resume_vae and run.vae_weights_path.exists():  # made before VAE checkpoints
        logger.info("custom VAE: %s (already trained)", run.vae_path)
    else:
        train_vae(data_dir, out, vae_config, data_config, overwrite=overwrite, progress=progress, device=device,
                  resume=resume_vae)
    if choose_t0 and is_main_process():  # sampling is one process's work
        from .sweep import DEFAULT_T0S
        from .sweep import choose_t0 as sweep_and_store_t0

        sweep_and_store_t0(out, DEFAULT_T0S, n=choose_t0_samples, out=Path(out) / "t0_sweep", progress=progress)
    return Path(out)
