"""Training the custom generator (stage 2) on the dataset, at the dataset's own resolution."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (CHECKPOINT_FILE, CheckpointOnInterrupt, check_resumed_config, checkpoint_meta,
                         divergence_advice, load_training_state, save_training_state, truncate_log)
from .config import DataConfig, VAEConfig, from_dict, read_json, to_dict, write_json
from .data import (
    ImageFolder,
    dataset_files,
    header_resolution,
    iter_images,
    nothing_readable,
    tensor_to_pil,
    to_unit_range,
)
from .errors import DyodError
from .images import make_grid, save_png
from .run import Run, check_run_to_resume
from .vae import (VanillaVAE, check_resolution, default_hidden_dims, latent_activity,
                  load_vae, save_vae, vae_loss)

logger = logging.getLogger(__name__)

# --resume refuses other values of these (the checkpoint's weights have their shapes) and warns at other values of
# these (what is learned from there on changes)
VAE_SHAPE_FIELDS = ("resolution", "latent_dim", "hidden_dims")
VAE_RESULT_FIELDS = ("beta", "kld_weight", "batch_size", "learning_rate", "lr_gamma")


def vae_resolution(config: VAEConfig, data_resolution: int) -> int:
    """The configured resolution, else the largest power of two <= the dataset's (between 16 and 128)."""
    if config.resolution:
        return config.resolution
    res = 16
    while res * 2 <= min(data_resolution, 128):
        res *= 2
    return res


def epoch_batches(order: torch.Tensor, batch_size: int, process_index: int = 0, num_processes: int = 1):
    """The indices each update of one epoch gives this process: every update takes ``batch_size × num_processes``
    images of the shuffled ``order``, a disjoint ``batch_size`` of them per process (in one process, consecutive
    batches). The last incomplete update is dropped, which keeps BatchNorm's batch statistics sane."""
    per_update = batch_size * num_processes
    for start in range(0, len(order) - per_update + 1, per_update):
        first = start + process_index * batch_size
        yield order[first : first + batch_size]


def process_noise_seed(seed: int, epoch: int, process_index: int) -> int:
    """The seed of one process's reparameterization noise in one epoch of a multi-process run: every process draws
    its own noise for its own images, and a run resumed at an epoch draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])


def train_vae(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: VAEConfig = VAEConfig(),
    data_config: DataConfig = DataConfig(),
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    resume: bool = False,
) -> Path:
    """Train the vanilla VAE on ``data_dir`` and save it to ``out/vae``; return that folder. A checkpoint is written
    every ``config.checkpoint_every`` epochs; ``resume`` continues from it to what an uninterrupted run gives."""
    from .performance import new_accelerator, training_on_cpu

    if resume:
        check_run_to_resume(out)
    on_cpu = training_on_cpu(device)  # a device training cannot take: before anything else
    files = dataset_files(data_dir, data_config.holdout_fraction)  # an empty folder fails before anything is made
    accelerator = new_accelerator(mixed_precision="no", cpu=on_cpu)
    main = accelerator.is_main_process  # under a multi-process launch the main process alone writes the run folder
    with accelerator.main_process_first():
        run = Run.open_or_create(out)
    folder = run.vae_path
    checkpoint = folder / CHECKPOINT_FILE
    if resume and not checkpoint.exists():
        raise DyodError(f"--resume: {checkpoint} does not exist, so the custom VAE has nothing to resume")
    if resume:
        check_resumed_config(recorded_vae_config(folder), config, shape=VAE_SHAPE_FIELDS, results=VAE_RESULT_FIELDS,
                             where=checkpoint)
    if not resume and not overwrite and ((folder / "model.safetensors").exists() or checkpoint.exists()):
        raise DyodError(f"{folder} already holds a custom VAE; pass --resume to continue it or --overwrite to train a "
                        "new one")
    accelerator.wait_for_everyone()  # every process has seen the run as it was before this one changes it
    resolution = config.resolution or vae_resolution(config, header_resolution(files, data_config.max_images) or 128)
    hidden_dims = default_hidden_dims(resolution, config.hidden_dims)
    check_resolution(resolution, hidden_dims)  # before reading the images
    pixels, data = read_pixels(data_dir, files, resolution, data_config)
    n, processes = len(data), accelerator.num_processes
    if n < processes:
        raise DyodError(f"{data_dir}: {n} readable image(s) for {processes} processes; the custom VAE gives each "
                        "process at least one image per update, so launch fewer processes")
    if "data" not in run.info and main:
        run.update(data={k: v for k, v in data.stats().items() if k != "skipped"}, data_config=to_dict(data_config))
        write_json(run.path / "data.json", data.stats())

    torch.manual_seed(config.seed)
    model = VanillaVAE(resolution, config.latent_dim, hidden_dims)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_gamma)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(config.seed)
    fixed_z = torch.randn(64, config.latent_dim, generator=torch.Generator().manual_seed(config.seed + 1))
    # Each process trains on its own share of every update (DistributedDataParallel averages the gradients), as the
    # prompt's processes draw their own batches: the batch per update is the batch size times the processes.
    batch_size = min(config.batch_size, n // processes)
    steps = n // (batch_size * processes)
    # One process draws the reparameterization noise from torch's global generator, as it always has; several draw
    # their own (with one seed they would all draw the same noise for different images).
    noise_generator = torch.Generator() if processes > 1 else None
    # PyTorch-VAE weights the KL by kld_weight (0.00025 in its vanilla VAE config); beta > 1 gives the beta-VAE.
    kl_scale = config.beta * config.kld_weight

    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "log.jsonl"
    data_facts = {"num_images": n, "resolution": resolution}
    start_epoch, loss, rec = 0, math.nan, math.nan
    if resume:
        start_epoch, loss, rec = _load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler,
                                                  generator, data_facts, config)
        if start_epoch >= config.epochs:
            logger.warning("--resume: the custom VAE in %s already finished (%d of %d epochs); nothing to do (raise "
                           "--vae-epochs to train further)", folder, start_epoch, config.epochs)
        else:
            logger.info("resuming the custom VAE at epoch %d of %d", start_epoch, config.epochs)
        if main:
            truncate_log(log_path, start_epoch, "epoch")  # epochs logged after the checkpoint will be redone
    elif main:
        log_path.unlink(missing_ok=True)
        if overwrite:  # the earlier VAE's checkpoint: a failure of this training must not send --resume back to it
            checkpoint.unlink(missing_ok=True)
    started = time.time()
    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs,
               disable=not progress or not main, desc="custom VAE")
    with CheckpointOnInterrupt(enabled=processes == 1, what="epoch") as interrupt:
        for epoch in bar:
            model.train()
            order = torch.randperm(n, generator=generator)
            totals = torch.zeros(3, device=accelerator.device)  # read once an epoch: a read waits for the GPU
            if noise_generator is not None:
                noise_generator.manual_seed(process_noise_seed(config.seed, epoch, accelerator.process_index))
            for batch in epoch_batches(order, batch_size, accelerator.process_index, processes):
                x = to_unit_range(pixels[batch]).to(accelerator.device)
                noise = None
                if noise_generator is not None:
                    noise = torch.randn(len(batch), config.latent_dim,
                                        generator=noise_generator).to(accelerator.device)
                recons, mu, log_var = model(x, noise)
                loss, rec, kld = vae_loss(recons, x, mu, log_var, kl_scale)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                totals += torch.stack([loss.detach(), rec.detach(), kld.detach()])
            scheduler.step()
            if processes > 1:
                totals = accelerator.reduce(totals, "mean")  # the epoch's losses over every process's images
            loss, rec, kld = (totals.cpu() / steps).tolist()
            if not math.isfinite(loss):
                again = "the same command" + ("" if checkpoint.exists() or not (folder / "model.safetensors").exists()
                                               else " with --overwrite (the folder holds the earlier VAE)")
                raise DyodError(divergence_advice(f"the VAE loss became {loss} at epoch {epoch + 1}", checkpoint,
                                                  "Try a lower --vae-learning-rate", again))
            bar.set_postfix(loss=f"{loss:.4f}", recon=f"{rec:.4f}")
            if not main:
                continue
            with open(log_path, "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "loss": loss, "recon": rec, "kld": kld}) + "\n")
            stopping = interrupt.stopping(epoch + 1, config.epochs)
            if stopping or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0
                            and epoch + 1 < config.epochs):
                _save_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, generator,
                                 epoch + 1, {**data_facts, "loss": loss, "recon": rec, "config": to_dict(config)})
            if stopping:
                interrupt.stop(bar, epoch + 1, config.epochs, "the custom VAE", "epoch", checkpoint)
            if (epoch + 1) % config.sample_every == 0 or epoch + 1 == config.epochs:
                model.eval()
                with torch.no_grad():
                    samples = accelerator.unwrap_model(model).decode(fixed_z.to(accelerator.device))
                save_png(make_grid(tensor_to_pil(samples), 8), folder / "samples" / f"epoch-{epoch + 1:04d}.png")

    model = accelerator.unwrap_model(model).eval()
    if main:
        save_vae(model, folder, config, extra={"data_resolution": data.resolution, "num_images": n})
        activity = latent_activity(model, pixels)  # which dimensions `dyod traverse --active` shows
        write_json(run.latent_activity_path, activity)
        run.set_stage(
            "vae",
            {
                "resolution": resolution,
                "epochs": config.epochs,
                "processes": processes,
                "batch_per_update": batch_size * processes,
                "updates_per_epoch": steps,
                "final_loss": loss,
                "final_recon": rec,
                "active_dimensions": activity["active_dimensions"],
                "wall_time_s": round(time.time() - started, 1),
                "device": str(accelerator.device),
                "config": to_dict(config),
            },
        )
        try:  # after the run's record of the finished VAE: a disk that fills here leaves record and files agreeing
            _save_checkpoint(checkpoint, model, optimizer, scheduler, generator, config.epochs,  # --resume with more
                             {**data_facts, "loss": loss, "recon": rec, "config": to_dict(config)})  # --vae-epochs
        except DyodError:
            checkpoint.unlink(missing_ok=True)  # an earlier epoch's: it would tell --resume the VAE is unfinished
            raise
    accelerator.wait_for_everyone()  # what the main process wrote is there for every process's next step
    return folder


def read_pixels(data_dir: str | os.PathLike, files: list[Path], resolution: int,
                data_config: DataConfig) -> tuple[torch.Tensor, ImageFolder]:
    """The readable images among ``files`` as uint8 pixels (N, 3, H, W) at the VAE's resolution, and what was read.
    Each image is put there as it is read and made float a batch at a time: 30,000 images at 128 px are 1.5 GB so,
    5.9 GB in float32."""
    data = ImageFolder(Path(data_dir), images=[], paths=[], skipped=[], sizes=[], size=resolution)
    # Stored height, width, channels, as PIL gives them (the layout the batches have always had: the same numbers).
    pixels = torch.empty((min(len(files), data_config.max_images or len(files)), resolution, resolution, 3),
                         dtype=torch.uint8)
    rows = pixels.numpy()  # the same memory
    for i, image in enumerate(iter_images(data, files, data_config.grayscale, data_config.max_images)):
        rows[i] = np.asarray(image.convert("RGB"))
    if not len(data):
        raise nothing_readable(Path(data_dir), files, data.skipped)
    return pixels[:len(data)].permute(0, 3, 1, 2), data


def run_latent_activity(run: Run, device: str | torch.device = "cpu") -> dict:
    """The custom VAE's latent activity on the run's training images (``latent_activity``): as recorded when it was
    trained, or, for a VAE trained before it was, computed now from the run's dataset and recorded."""
    path = run.latent_activity_path
    if path.exists():
        return read_json(path)
    data_dir = run.info.get("data", {}).get("root")
    if not data_dir or not Path(data_dir).is_dir():
        raise DyodError(f"the custom VAE of run {run.path} was trained before dyod recorded how much it uses each latent "
                        f"dimension, and its dataset ({data_dir or 'not recorded'}) is not here to measure it; give "
                        "the dimensions with --dim")
    data_config = from_dict(DataConfig, run.info.get("data_config") or {})
    model = load_vae(run.vae_path, device)
    logger.info("measuring how much the custom VAE uses each latent dimension on %s", data_dir)
    pixels, _ = read_pixels(data_dir, dataset_files(data_dir, data_config.holdout_fraction), model.resolution,
                            data_config)
    activity = latent_activity(model, pixels)
    write_json(path, activity)
    return activity


def most_used_dimensions(run: Run, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` latent dimensions of the run's custom VAE with the largest posterior-mean variance on its images (the
    ones a traversal shows most), and their variances; what `dyod traverse --active` and the UI's traversal choose."""
    from .vae import most_active_dimensions

    activity = run_latent_activity(run)
    dims = most_active_dimensions(activity, k)
    variance = activity["posterior_mean_variance"]
    active = activity["active_dimensions"]
    logger.info("the %d most used latent dimensions: %s (variance of the posterior mean over %d images: %s); %d of %d "
                "are active (above %g)", len(dims), ", ".join(map(str, dims)), activity["num_images"],
                ", ".join(f"{variance[d]:.3g}" for d in dims), active, len(variance), activity["active_threshold"])
    if k > active:
        logger.warning("%d dimensions asked: only %d of the custom VAE's %d latent dimensions are active; traversing "
                       "the others changes little", k, active, len(variance))
    return dims, [variance[d] for d in dims]


def _save_checkpoint(path: Path, model: VanillaVAE, optimizer, scheduler, generator: torch.Generator, epoch: int,
                     meta: dict) -> None:
    """The VAE's weights and BatchNorm statistics, Adam's moments, the learning-rate schedule, the shuffling generator
    and torch's global generators (the reparameterization draws from them): what the next epoch needs to be what it
    would have been."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_training_state(path, tensors, optimizer, generator, epoch, {**meta, "scheduler": scheduler.state_dict()})


def recorded_vae_config(folder: Path) -> dict | None:
    """The training settings of the custom VAE in ``folder``: its checkpoint's, or (a checkpoint written before they
    were recorded there) those of the finished VAE's config.json; None where neither says."""
    checkpoint = folder / CHECKPOINT_FILE
    recorded = checkpoint_meta(checkpoint).get("config") if checkpoint.exists() else None
    if recorded is None and (folder / "config.json").exists():
        recorded = read_json(folder / "config.json").get("training")
    return recorded


def _load_checkpoint(path: Path, model: VanillaVAE, optimizer, scheduler, generator: torch.Generator,
                     data_facts: dict, config: VAEConfig) -> tuple[int, float, float]:
    device = next(model.parameters()).device
    epoch, tensors, meta = load_training_state(path, optimizer, generator, device)
    changed = [k for k in data_facts if meta.get(k) != data_facts[k]]
    if changed:  # the run stops here: the optimizer and generator it has just set are not used
        raise DyodError(f"--resume: the custom VAE in {path.parent} was training on other data ({', '.join(changed)} "
                        f"differ: {', '.join(f'{meta.get(k)} then, {data_facts[k]} now' for k in changed)}); pass "
                        "--overwrite to train a new one")
    torch.set_rng_state(tensors.pop("rng.cpu"))
    cuda_state = tensors.pop("rng.cuda", None)
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()})
    scheduler.load_state_dict(meta["scheduler"])
    lrs = scheduler.get_last_lr()  # the optimizer's own lr is not saved
    if (scheduler.base_lrs[0], scheduler.gamma) != (config.learning_rate, config.lr_gamma):
        # resumed with another rate (say, a lower one after a non-finite loss): the schedule the new settings give
        scheduler.base_lrs, scheduler.gamma = [config.learning_rate] * len(lrs), config.lr_gamma
        lrs = [config.learning_rate * config.lr_gamma ** scheduler.last_epoch] * len(lrs)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return epoch, meta["loss"], meta["recon"]
