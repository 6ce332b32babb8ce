"""Stage 1, the dataset prompt: textual inversion over the whole dataset (Eq. 7).

    v* = argmin_v  E_{x_0 ~ dataset, ε ~ N(0, I), t ~ U{0, N-1}} || target - f_phi(x_t, t, c(v)) ||²

with c(v) a context text ("a photo of {}") holding the pseudo-word S*, f_phi the frozen UNet and target ε (or v
for v-prediction models). Only the new embedding rows train, on latents the frozen VAE made once
(``latent_cache``). S* learned elsewhere takes this stage's place through ``prompt_import``."""

from __future__ import annotations

import dataclasses
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
from .config import CHECKPOINTING_LADDER, DataConfig, InversionConfig, SampleConfig, to_dict, write_json
from .data import (
    RUN_FILE,
    ImageFolder,
    dataset_files,
    files_fingerprint,
    iter_images,
    nothing_readable,
)
from .embeddings import (
    add_placeholder_tokens,
    expand_prompt,
    initializer_embedding,
    install_placeholder,
    save_learned_embeds,
    uninstall_placeholder,
)
from .errors import DyodError
from .images import make_grid, save_png
from .performance import (
    check_compile_device,
    check_mixed_precision,
    enable_checkpointing,
    new_accelerator,
    optimize_for_training,
    parse_checkpointing,
    resolve_mixed_precision,
    to_device_async,
    training_on_cpu,
)
from .prior import Prior, load_prior, model_reference
from .latent_cache import LatentCache
from .prompt_import import holds_import_of, import_dataset_prompt  # noqa: F401 (the library's names for them)
from .run import Run, check_run_to_resume
from .sampling import q_sample

logger = logging.getLogger(__name__)

# --resume at other values of these changes what is learned from there on (it warns); the generator's state comes
# from the checkpoint, so the seed does not, nor does the initializer word after step 0
INVERSION_RESULT_FIELDS = ("templates", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                           "sample_latents")
PREVIEW_STEPS = 25  # DDIM steps of the sample grids written while S* trains


def recorded_inversion_config(run: str | os.PathLike) -> dict | None:
    """The settings the dataset prompt of ``run`` was training with, from its checkpoint; None where it has none. A
    damaged checkpoint of a finished stage is not needed: the settings then come from the run's record of it."""
    checkpoint = Path(run) / "inversion" / CHECKPOINT_FILE
    if not checkpoint.exists():
        return None
    try:
        return checkpoint_meta(checkpoint).get("config")
    except DyodError:
        finished = Run.open(run).info.get("stages", {}).get("inversion", {}) if (Path(run) / RUN_FILE).exists() else {}
        if finished.get("config") and (Path(run) / "learned_embeds.safetensors").exists():
            return finished["config"]
        raise


def diffusion_loss_target(latents, noise, alphas_cumprod_t, prediction_type: str) -> torch.Tensor:
    """What the UNet regresses: ε for epsilon models, v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x_0 for v-prediction."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod_t.sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod_t).sqrt().view(-1, 1, 1, 1)
        return a * noise - s * latents
    raise DyodError(f"textual inversion needs an epsilon or v_prediction model, got {prediction_type!r}")


def inversion_loss(prior: Prior, latents, noise, timesteps, input_ids, alphas_cumprod) -> torch.Tensor:
    """Eq. 7 for one batch: the diffusion loss with the text condition c(v)."""
    ab = alphas_cumprod.to(latents.device)[timesteps].float()  # a no-op when already on the device (PromptTrainer)
    noisy = q_sample(latents, noise, ab.view(-1, 1, 1, 1))  # Eq. 4
    hidden = prior.text_encoder(input_ids)[0]  # under autocast when training in mixed precision
    dtype = prior.unet.dtype
    # The frozen UNet runs in its own precision (half when training mixed): autocast would redo its casts at every
    # op and run its norms in fp32, for more memory and time and no benefit to the gradient reaching S*.
    with torch.autocast(latents.device.type, enabled=False):
        pred = prior.unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype)).sample
    target = diffusion_loss_target(latents, noise, ab, prior.prediction_type)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def draw_batch(cache: LatentCache, template_ids: torch.Tensor, batch_size: int, num_train_timesteps: int,
               generator: torch.Generator, sample_latents: bool, scaling_factor: float):
    """One random batch (images, templates, t, ε), all drawn from ``generator`` so a run can resume exactly."""
    index = torch.randint(len(cache), (batch_size,), generator=generator)
    mean, std = cache.batch(index)
    latents = mean + std * torch.randn(mean.shape, generator=generator) if sample_latents else mean
    latents = latents * scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(num_train_timesteps, (batch_size,), generator=generator)
    input_ids = template_ids[torch.randint(len(template_ids), (batch_size,), generator=generator)]
    return latents, noise, timesteps, input_ids


def _out_of_memory_advice(config: InversionConfig, checkpoint: Path | None, checkpointing: str | None = None) -> str:
    """What to do when the accelerator runs out of memory (``checkpointing``: the setting the steps ran with)."""
    checkpointing = checkpointing or config.gradient_checkpointing
    ways = []
    if checkpointing in ("none", "feed-forward", "1"):
        ways.append("--gradient-checkpointing 2 (recompute the two finest UNet levels: about 55 % less memory per "
                    "image at SD-1.5 scale, a third more arithmetic) or all")
    elif checkpointing not in ("all", "auto"):
        ways.append("--gradient-checkpointing all")
    if config.batch_size > 1:
        ways.append(f"--batch-size {max(1, config.batch_size // 2)} --gradient-accumulation-steps "
                    f"{2 * config.gradient_accumulation_steps} (the same images per update)")
    exists = checkpoint is not None and checkpoint.exists()
    then = "then --resume" if exists else "then run again"
    kept = f"the last checkpoint in {checkpoint} is intact" if exists else "no checkpoint was written yet"
    return (f"the accelerator ran out of memory in the dataset-prompt step (batch {config.batch_size}, gradient "
            f"checkpointing {checkpointing}); {kept}. Use less memory with "
            f"{' or '.join(ways) or 'a smaller model'}, {then}")


SYNC_EVERY = 25  # steps between reads of the loss (each read waits for the GPU to finish what it was given)


class PromptTrainer:
    """The dataset-prompt optimization of Eq. 7 set up on the accelerator: S* installed in the text encoder, the frozen
    UNet in the training precision (``optimize_for_training``), AdamW on the new rows, a CPU generator that draws
    every batch (so a run resumes exactly and does not depend on the device).

    ``step()`` runs one optimizer step (with gradient accumulation) and returns its loss as a tensor on the device,
    without waiting for the GPU: nothing in it reads a value back, and the batch is copied without synchronizing,
    so the host prepares the next step while the GPU runs this one. The caller checks the losses every few steps.
    Under fp16 mixed precision (GPUs without bf16) AdamW is the fused kernel, to which the gradient scaler hands its
    overflow flag on the device: with the usual AdamW the scaler reads that flag back at every step, to decide on
    the host whether to skip it."""

    def __init__(self, prior: Prior, cache: LatentCache, config: InversionConfig, accelerator):
        self.prior, self.cache, self.config, self.accelerator = prior, cache, config, accelerator
        device = accelerator.device
        token, k = config.placeholder_token, config.num_vectors
        init = initializer_embedding(prior.tokenizer, prior.text_encoder, config.initializer)
        ids = add_placeholder_tokens(prior.tokenizer, prior.text_encoder, token, k)
        self.embedding = install_placeholder(prior.text_encoder, ids[0], init[None].repeat(k, 1))
        prompts = [expand_prompt(t, token, k) for t in config.templates]
        self.template_ids = prior.tokenizer(
            prompts, padding="max_length", max_length=prior.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        # The frozen UNet in the training precision. The text encoder runs under autocast: its new rows train in fp32,
        # its frozen linear layers are stored in the autocast precision they compute in, norms and embeddings stay fp32.
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        prior.unet.to(device, weight_dtype)
        auto = config.gradient_checkpointing == "auto"
        self.checkpointing = "none" if auto else config.gradient_checkpointing  # what the steps run with
        optimize_for_training(prior, gradient_checkpointing=self.checkpointing, compile_mode=config.compile_unet,
                              autocast_dtype=weight_dtype)
        prior.text_encoder.to(device)
        self.optimizer = torch.optim.AdamW([self.embedding.learned], lr=config.learning_rate,
                                           weight_decay=config.weight_decay, fused=accelerator.scaler is not None)
        self.generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
        self.text_encoder, self.optimizer = accelerator.prepare(prior.text_encoder, self.optimizer)
        self.text_encoder.train()
        self.alphas_cumprod = prior.alphas_cumprod().to(device)  # once: a copy per step would wait for the GPU
        if auto:
            self.checkpointing = self._least_checkpointing_that_fits()

    def _least_checkpointing_that_fits(self) -> str:
        """``--gradient-checkpointing auto``: try a step's forward and backward on a probe batch without checkpointing,
        then with the feed-forwards recomputed, the finest 1, 2 levels (and the feed-forwards elsewhere), then every
        block, and keep the first that does not run out of memory. The probe draws from its own generator and leaves
        no gradient, so training is what it would be with that setting given explicitly."""
        if self.accelerator.num_processes > 1:  # one process running out alone would leave the others waiting
            logger.info("gradient checkpointing auto: none (several processes; pass a level to choose)")
            return "none"
        unet = getattr(self.prior.unet, "_orig_mod", self.prior.unet)  # the flags live on the (compiled) UNet's modules
        generator = torch.Generator().manual_seed(self.config.seed + 1_000_003)
        for setting in CHECKPOINTING_LADDER:
            enable_checkpointing(unet, *parse_checkpointing(setting))
            try:
                self._probe(generator)
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.info("gradient checkpointing %s: batch %d runs out of memory", setting, self.config.batch_size)
                continue
            logger.info("gradient checkpointing auto: %s (the least with which batch %d fits)", setting,
                        self.config.batch_size)
            return setting
        raise DyodError(_out_of_memory_advice(self.config, None, "all"))

    def _probe(self, generator: torch.Generator) -> None:
        self._loss(generator).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def _loss(self, generator: torch.Generator) -> torch.Tensor:
        """Eq. 7 on a batch drawn from ``generator`` on the CPU and copied to the accelerator without waiting."""
        config, device = self.config, self.accelerator.device
        latents, noise, timesteps, input_ids = draw_batch(
            self.cache, self.template_ids, config.batch_size, len(self.alphas_cumprod), generator,
            config.sample_latents, self.prior.scaling_factor,
        )
        batch = [to_device_async(x, device) for x in (latents, noise, timesteps, input_ids)]
        with self.accelerator.autocast():
            return inversion_loss(self.prior, *batch, self.alphas_cumprod)

    def load(self, path: Path) -> tuple[int, list]:
        """Restore the vectors, AdamW's moments and the generator from a checkpoint; return (step, recent losses)."""
        learned = self.embedding.learned
        step, tensors, meta = load_training_state(path, self.optimizer, self.generator, learned.device)
        if meta.get("num_images", len(self.cache)) != len(self.cache):  # older checkpoints do not say
            raise DyodError(f"--resume: the dataset prompt in {path.parent.parent} was training on "
                            f"{meta['num_images']} images, the data folder now gives {len(self.cache)}; resume with "
                            "that data (the same DATA_DIR, --holdout-fraction, --max-images), or pass --overwrite to "
                            "start over")
        with torch.no_grad():
            learned.copy_(tensors["learned"].to(learned.device))
        return step, meta.get("losses", [])

    def save(self, path: Path, step: int, losses: list) -> None:
        save_training_state(path, {"learned": self.embedding.learned.float()}, self.optimizer, self.generator, step,
                            {"config": to_dict(self.config), "losses": losses[-1000:], "num_images": len(self.cache)})

    @torch.no_grad()
    def preview(self, output_resolution: int | None = None) -> list:
        """What the prior makes of the first template with the current S*: ``config.sample_images`` samples from pure
        noise (t0 = 1, the "prior + S* alone" of the sweeps) at seeds 0.., the same at every step, as ``dyod sample
        --t0 1`` makes them with the S* of that step. One batch through the UNet; the autoencoder visits the
        accelerator and decodes an image at a time (at 512 px a batch would add gigabytes to training's peak). The
        training generator is not touched, so a resumed run trains as an uninterrupted one."""
        from .pipeline import DyodPipeline

        config = self.config
        unet = getattr(self.prior.unet, "_orig_mod", self.prior.unet)  # a compiled UNet would compile this shape too
        view = dataclasses.replace(self.prior, unet=unet, text_encoder=self.accelerator.unwrap_model(self.text_encoder))
        pipe = DyodPipeline(view, config.placeholder_token, config.num_vectors, output_resolution=output_resolution)
        sample_config = SampleConfig(t0=1.0, num_inference_steps=PREVIEW_STEPS, prompt=config.templates[0])
        self.text_encoder.eval()
        self.prior.vae.to(self.accelerator.device)
        try:
            with self.accelerator.autocast():  # the text encoder's frozen linears are stored in the autocast precision
                latents = pipe.denoise_from(None, pipe.noise(list(range(config.sample_images))), 1.0, sample_config)
            return [image for i in range(len(latents)) for image in pipe.to_images(pipe.decode(latents[i:i + 1]))]
        finally:
            self.prior.vae.to("cpu")
            self.text_encoder.train()

    def step(self) -> torch.Tensor:
        config, accelerator = self.config, self.accelerator
        total = torch.zeros((), device=accelerator.device)
        for _ in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(self.text_encoder):
                loss = self._loss(self.generator)
                accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                total += loss.detach() / config.gradient_accumulation_steps
        return total


def invert(
    data_dir: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    config: InversionConfig = InversionConfig(),
    data_config: DataConfig = DataConfig(),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Learn S* for the dataset in ``data_dir`` and write ``out/learned_embeds.safetensors``; return its path."""
    if resume:
        check_run_to_resume(out)
    on_cpu = training_on_cpu(device)  # a device training cannot take: before anything else
    files = dataset_files(data_dir, data_config.holdout_fraction)  # an empty folder fails before anything is made
    accelerator = new_accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision, device),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=on_cpu,
    )
    check_mixed_precision(accelerator.mixed_precision, accelerator.device)  # before any work
    check_compile_device(config.compile_unet, accelerator.device, "--compile-unet")
    # Under a multi-process launch (accelerate launch, torchrun) every process runs this function; the run folder is
    # written by the main process alone, the others read it.
    main = accelerator.is_main_process
    with accelerator.main_process_first():
        made_here = None if (Path(out) / RUN_FILE).exists() else Path(out).exists()  # None: the run was there
        run = Run.open_or_create(out)
    folder = run.inversion_path
    checkpoint = folder / CHECKPOINT_FILE
    if not resume and not overwrite and (checkpoint.exists() or run.embeddings_path.exists()):
        raise DyodError(
            f"{run.path} already holds a dataset prompt; pass --resume to continue it or --overwrite to start over"
        )
    finished = run.info.get("stages", {}).get("inversion", {})
    if resume and run.embeddings_path.exists() and (finished.get("steps") or 0) >= config.steps:
        # the stage's output is written: its checkpoint is not needed (a damaged one must not block `fit --resume`
        # of the stage after it)
        logger.info("--resume: the dataset prompt in %s already finished (%d of %d steps)", run.path,
                    finished["steps"], config.steps)
        return run.embeddings_path
    if resume and not checkpoint.exists():
        raise DyodError(f"--resume: {checkpoint} does not exist, so there is nothing to resume")
    if resume:  # before the model loads
        check_resumed_config(recorded_inversion_config(run.path), config, shape=("placeholder_token", "num_vectors"),
                             results=INVERSION_RESULT_FIELDS, where=checkpoint)
    accelerator.wait_for_everyone()  # every process has seen the run as it was before this one changes it
    if overwrite and not resume and main:
        checkpoint.unlink(missing_ok=True)

    try:
        prior = load_prior(model)
    except DyodError:
        if main and made_here is not None:  # a run this command began and nothing else: gone, as if never begun
            run.remove_if_bare(folder_existed=made_here)
        raise
    if main:
        run.bind_model(model_reference(model), prior.describe())

    # Each image is read (straight to the model's resolution), goes through the frozen VAE once, in fp32, and is let
    # go; the VAE then leaves the accelerator. A cache on disk is written by the main process and read by the others.
    data = ImageFolder(Path(data_dir), images=[], paths=[], skipped=[], sizes=[], size=prior.resolution)
    count = min(len(files), data_config.max_images or len(files))
    key = {"files": files_fingerprint(files), "grayscale": data_config.grayscale, "max_images": data_config.max_images}
    prior.vae.to(accelerator.device)
    with accelerator.main_process_first():
        cache = LatentCache.build(iter_images(data, files, data_config.grayscale, data_config.max_images), count, prior,
                                  run.path / "cache", config.latent_cache_max_ram_mb, progress=progress and main,
                                  key=key, describe=lambda: data.stats() if len(data) else {})
    prior.vae.to("cpu")
    if not len(cache):
        raise nothing_readable(Path(data_dir), files, data.skipped)
    if main:
        run.update(data={k: v for k, v in cache.data.items() if k != "skipped"}, data_config=to_dict(data_config))
        write_json(run.path / "data.json", cache.data)
        write_json(folder / "config.json", to_dict(config))

    token, k = config.placeholder_token, config.num_vectors
    trainer = PromptTrainer(prior, cache, config, accelerator)
    start_step, losses = 0, []
    log_file = folder / "log.jsonl"
    if resume:
        start_step, losses = trainer.load(checkpoint)
        if start_step >= config.steps:
            logger.warning("--resume: the dataset prompt in %s already finished (%d of %d steps); nothing to do "
                           "(raise --steps to train further)", run.path, start_step, config.steps)
            if run.embeddings_path.exists():
                return run.embeddings_path
        else:
            logger.info("resuming the dataset prompt at step %d of %d", start_step, config.steps)
        if main:
            truncate_log(log_file, start_step)  # steps logged after the checkpoint will be redone
    elif main:
        log_file.unlink(missing_ok=True)

    output_resolution = run.data_resolution

    def write_preview(step: int) -> None:
        if main and config.sample_every:
            images = trainer.preview(output_resolution)
            save_png(make_grid(images, min(len(images), 8)), folder / "samples" / f"step-{step:06d}.png")

    if start_step == 0:
        write_preview(0)  # the initializer word's images, to compare the later grids with
    started = time.time()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               disable=not progress or not main, desc="dataset prompt")
    pending: list[torch.Tensor] = []  # losses of steps not yet read back: reading one waits for the GPU
    with CheckpointOnInterrupt(enabled=accelerator.num_processes == 1) as interrupt:
        for step in bar:
            try:
                pending.append(trainer.step())
            except torch.OutOfMemoryError:
                raise DyodError(_out_of_memory_advice(config, checkpoint, trainer.checkpointing)) from None
            done = step + 1
            stopping = interrupt.stopping(done, config.steps)
            if config.sample_every and (done % config.sample_every == 0 or done == config.steps) and not stopping:
                write_preview(done)
            save = (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps or stopping
            if not (save or len(pending) == SYNC_EVERY):
                continue
            first = done - len(pending)
            values = torch.stack(pending).tolist()
            pending.clear()
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise DyodError(divergence_advice(f"the loss became {values[bad]} at step {first + bad}", checkpoint,
                                                  "Try --mixed-precision bf16 or no, or a lower --learning-rate"))
            if not torch.isfinite(trainer.embedding.learned).all():
                raise DyodError(divergence_advice(
                    f"the learned embedding became non-finite between steps {first} and {done}", checkpoint,
                    "Try --mixed-precision bf16 or no, or a lower --learning-rate"))
            losses.extend(values)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if main:
                with open(log_file, "a") as f:
                    f.writelines(json.dumps({"step": first + i + 1, "loss": v}) + "\n" for i, v in enumerate(values))
                if save:
                    trainer.save(checkpoint, done, losses)
            if stopping:
                interrupt.stop(bar, done, config.steps, "the dataset prompt", "step", checkpoint)

    text_encoder = trainer.text_encoder
    vectors = accelerator.unwrap_model(text_encoder).get_input_embeddings().learned.detach()
    uninstall_placeholder(accelerator.unwrap_model(text_encoder))
    if main:
        save_learned_embeds(run.embeddings_path, token, vectors)
        run.update(placeholder_token=token, num_vectors=k)
        run.set_stage(
            "inversion",
            {
                "steps": config.steps,
                "final_loss": float(np.mean(losses[-50:])) if losses else None,
                "wall_time_s": round(time.time() - started, 1),
                "device": str(accelerator.device),
                "mixed_precision": accelerator.mixed_precision,
                "gradient_checkpointing": trainer.checkpointing,
                "config": to_dict(config),
            },
        )
    # The next stage (fit's custom VAE) reads what the main process wrote. No end_training(): under a multi-process
    # launch it would tear down the process group the next stage trains in (the command line does, at its end).
    accelerator.wait_for_everyone()
    return run.embeddings_path
