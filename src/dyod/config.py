"""Frozen dataclass configs. Each is written as JSON next to the output it produced, and the CLI builds its
flags from the fields (help text in ``metadata["help"]``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # of the frozen prior when sampling
# torch.compile's inductor modes, and cuda-graphs: CUDA graphs of the eager kernels (dynamo's "cudagraphs" backend),
# seconds of tracing instead of a minute or more of kernel generation
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cuda-graphs")


# Classifier-free guidance beyond this is refused: useful scales are 1-20 (images saturate by about 30), and at 1000
# the guided noise estimate is 1000 times the conditioned-unconditioned difference, DDIM's x̂_0 reaches about 1e4, past
# what half precision can square in the UNet's normalizations; far beyond, fp32 overflows too and images turn NaN.
MAX_GUIDANCE_SCALE = 1000.0

# Adam moves each weight by about the learning rate a step: past 10 nothing is learned, and near 1e38 the rate itself
# overflows float32 inside the optimizer (a RuntimeError, not a message)
MAX_LEARNING_RATE = 10.0

# --gradient-checkpointing from keeping the most to the least; auto tries them in this order
CHECKPOINTING_LADDER = ("none", "feed-forward", "1", "2", "all")

# Seeds are in [0, SEED_LIMIT): every torch generator takes them, with room for the offsets dyod adds (seed + i per
# sample, per process, per purpose) below torch's 2**64.
SEED_LIMIT = 2**63


def canonical_checkpointing(value: Any) -> str:
    """``--gradient-checkpointing`` in one spelling per meaning: none | feed-forward | all | auto | N. true/false (and
    runs written before the levels existed, which store a bool) still read, as all/none."""
    text = str(value).strip().lower()
    text = {"true": "all", "yes": "all", "on": "all", "false": "none", "no": "none", "off": "none", "0": "none",
            "ff": "feed-forward", "feedforward": "feed-forward"}.get(text, text)
    if not (text in ("none", "feed-forward", "all", "auto") or text.isdigit()):
        raise ValueError(f"--gradient-checkpointing must be none, feed-forward, all, auto or a number of resolution "
                         f"levels (1, 2, ...), got {value!r}")
    return text


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text and optional bounds ``min``/``max``, which the CLI checks as it parses
    the flag and ``check_bounds`` when the config is made (from Python, or from a run's JSON)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def seed_field(help: str) -> Any:
    return field(0, help, min=0, max=SEED_LIMIT - 1)


def check_bounds(config: Any) -> None:
    """Each field's ``min``/``max`` (see ``field``), so that a config made in Python is refused as its flag would be,
    before any work."""
    for f in dataclasses.fields(config):
        low, high, value = f.metadata.get("min"), f.metadata.get("max"), getattr(config, f.name)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{f.name} must be {bounds}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How a folder of images becomes training data."""

    grayscale: bool = field(False, "convert images to grayscale (kept as 3 channels for the model)")
    max_images: int = field(0, "use at most this many images (0: all)", min=0)
    holdout_fraction: float = field(0.0, "fraction of images kept out of training, for choosing t0 (by file-name hash)", min=0.0)

    def __post_init__(self):
        check_bounds(self)
        if not 0.0 <= self.holdout_fraction < 1.0:  # at parse time: before a run folder is made
            raise ValueError(f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """Stage 1, the dataset prompt: textual inversion over the whole dataset (Eq. 7)."""

    placeholder_token: str = field("<dyod>", "the pseudo-word S* added to the tokenizer")
    initializer: str = field("object", "word whose embedding initializes S*")
    num_vectors: int = field(1, "embedding vectors behind S* (tokens <tok>, <tok>_1, ...)", min=1)
    templates: tuple[str, ...] = field(
        (
            "a photo of {}",
            "a rendering of {}",
            "a picture of {}",
            "an image of {}",
            "a good photo of {}",
            "a close-up photo of {}",
        ),
        "context texts; {} is replaced by S*",
    )
    steps: int = field(3000, "optimization steps", min=1)
    batch_size: int = field(4, "images per step (per device)", min=1)
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step", min=1)
    learning_rate: float = field(5e-3, "AdamW learning rate for the new embedding rows", min=0.0, max=MAX_LEARNING_RATE)
    weight_decay: float = field(0.0, "AdamW weight decay on the new rows", min=0.0)
    mixed_precision: str = field(
        "auto", "auto | no | fp16 | bf16, through Accelerate (auto: bf16 on Ampere and newer GPUs, fp16 on older ones, no "
        "on the CPU)",
        choices=("auto", "no", "fp16", "bf16"),
    )
    gradient_checkpointing: str = field(
        "auto", "recompute UNet activations in the backward pass instead of keeping them: none | feed-forward (the "
        "transformer blocks' GEGLU projections: 25 % less memory per image at SD-1.5 scale for 6 % more arithmetic) | "
        "N (the blocks at the N finest resolutions entirely, which hold most of the memory, and the feed-forwards "
        "elsewhere) | all | auto (the least that lets a first step fit in the accelerator's memory: none, then "
        "feed-forward, 1, 2, all): less GPU memory, more compute")
    compile_unet: str = field(
        "none", "torch.compile the frozen UNet: none | default | reduce-overhead (CUDA graphs; a GPU of compute "
        "capability 7.0+; compiles once, a minute or two at SD scale) | cuda-graphs (CUDA graphs of the eager kernels: "
        "no kernel generation, any CUDA GPU)",
        choices=("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "cuda-graphs"),
    )
    checkpoint_every: int = field(500, "write a resumable checkpoint every N steps (0: only at the end)", min=0)
    sample_every: int = field(500, "write a grid of the prior's samples for the first --templates prompt with the current "
                                   "S* (t0 = 1, 25 DDIM steps) at the start, every N steps and at the end (0: never)",
                              min=0)
    sample_images: int = field(4, "images in each such grid (seeds 0..N-1, the same at every step)", min=1)
    sample_latents: bool = field(True, "sample VAE latents from the cached posterior (else use its mean)")
    latent_cache_max_ram_mb: int = field(1024, "above this size the latent cache lives on disk (memmap)", min=0)
    seed: int = seed_field("training seed")

    def __post_init__(self):
        check_bounds(self)
        object.__setattr__(self, "gradient_checkpointing", canonical_checkpointing(self.gradient_checkpointing))
        if not self.placeholder_token.strip() or self.placeholder_token != self.placeholder_token.strip():
            raise ValueError(f"--placeholder-token must be a word without spaces around it, e.g. '<my-dataset>'; "
                             f"got {self.placeholder_token!r}")
        if "{}" in self.placeholder_token:
            raise ValueError(f"--placeholder-token cannot hold {{}}, which marks where S* goes in a text; got "
                             f"{self.placeholder_token!r}")
        if not self.initializer.strip():
            raise ValueError("--initializer must be a word whose embedding starts S*, e.g. 'object'; got ''")
        if not self.templates:
            raise ValueError("--templates needs at least one context text, e.g. 'a photo of {}'")
        lacking = [t for t in self.templates if "{}" not in t and self.placeholder_token not in t]
        if lacking:
            raise ValueError(f"each of --templates must contain {{}} where S* goes; {lacking[0]!r} does not")
        # the tokenizer matches an added token anywhere in a text, inside words too: a token that a context text
        # holds outside {} would be read as S* there as well ("photo" in "a photo of {}": S* twice)
        captured = [t for t in self.templates if "{}" in t and self.placeholder_token in t.replace("{}", "\0")]
        if captured:
            raise ValueError(f"--placeholder-token {self.placeholder_token!r} occurs in the context text "
                             f"{captured[0]!r} outside {{}}, where the tokenizer would read it as S* too (it matches "
                             "the token anywhere, inside words as well); choose a token no text holds, e.g. "
                             "'<my-dataset>'")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Stage 2, the custom generator: the vanilla VAE of PyTorch-VAE (Subramanian, 2020), optionally a beta-VAE."""

    resolution: int = field(0, "training resolution, a power of two >= 16 (0: from the dataset, at most 128)", min=0)
    latent_dim: int = field(128, "size of z", min=1)
    hidden_dims: tuple[int, ...] = field((32, 64, 128, 256, 512), "encoder channels, one stride-2 conv each")
    beta: float = field(1.0, "weight on the KL term (>1: beta-VAE, more disentangled)", min=0.0)
    kld_weight: float = field(0.00025, "weight of the KL term (PyTorch-VAE's vanilla VAE config uses 0.00025)", min=0.0)
    epochs: int = field(100, "passes over the dataset", min=1)
    batch_size: int = field(64, "images per step (per process)", min=1)
    learning_rate: float = field(5e-3, "Adam learning rate", min=0.0, max=MAX_LEARNING_RATE)
    lr_gamma: float = field(0.95, "exponential learning-rate decay per epoch", min=0.0)
    sample_every: int = field(10, "write a sample grid every N epochs", min=1)
    checkpoint_every: int = field(10, "write a resumable checkpoint every N epochs (0: only at the end)", min=0)
    seed: int = seed_field("training seed")

    def __post_init__(self):
        check_bounds(self)
        if self.resolution and (self.resolution < 16 or self.resolution & (self.resolution - 1)):
            raise ValueError(f"--vae-resolution must be 0 (from the dataset) or a power of two >= 16, got "
                             f"{self.resolution}")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"--vae-hidden-dims takes positive channel counts, got {list(self.hidden_dims)}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Stage 3 and 4: start the reverse process at t0 (Eq. 9-11)."""

    t0: float = field(0.7, "start of the reverse process as a fraction of T, in (0, 1]; 1.0 = pure noise")
    num_inference_steps: int = field(50, "T: steps of the DDIM schedule", min=1)
    guidance_scale: float = field(7.5, "classifier-free guidance scale with the learned prompt, in [-1000, 1000] (useful "
                                       "scales are 1-20; far beyond, the guided noise estimate overflows and images "
                                       "turn to NaN)", min=-MAX_GUIDANCE_SCALE, max=MAX_GUIDANCE_SCALE)
    prompt: str = field("a photo of {}", "prompt; {} is replaced by S*")
    negative_prompt: str = field("", "unconditional prompt for guidance")
    batch_size: int = field(8, "images per UNet batch", min=1)

    def __post_init__(self):
        check_bounds(self)
        # refused when made, as the flags are, not at the first batch (a NaN scale made NaN images)
        if not (isinstance(self.t0, (int, float)) and math.isfinite(self.t0) and 0.0 < self.t0 <= 1.0):
            raise ValueError(f"t0 must be a fraction of T in (0, 1], got {self.t0!r}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Sizes and schedule of the reference prior, ``dyod reference pretrain`` (``dyod.world.prior_training``; defaults:
    about two and a half hours on 2 CPU cores, docs/reference-prior.md)."""

    resolution: int = field(64, "side of the corpus images and of the prior's samples, in pixels", min=16)
    concept_stride: int = field(4, "the concept set the UNet is told about: every Nth emoji of the atlas in code-point "
                                   "order (339 of 1,356 at 4, about a quarter of every group)", min=1)
    corpus_size: int = field(60000, "captioned scenes of the UNet corpus rendered for the UNet (latents cached)",
                             min=1)
    corpus_seed: int = seed_field("seed of the scene corpus (scene i of a seed is always the same)")
    unnamed_share: float = field(0.25, "share of the UNet corpus' sprites drawn from the emoji outside the concept set "
                                      "and captioned only as \"icon\", in [0, 1]: the UNet sees every emoji, as "
                                      "SD saw far more than its captions name, and is told about the concept set "
                                      "alone", min=0.0)
    corpus_sizes: tuple[int, ...] = field((12, 56), "sprite sides at 64 px, lowest and highest, drawn uniformly in "
                                                    "the UNet corpus' scenes (the caption names the nearest of small, "
                                                    "medium, large; from Python, an empty tuple: those three sizes)")
    emphasis_weight: float = field(0.0, "share of sprites drawn from the bundled datasets' emoji (fruits, faces), in "
                                        "[0, 1]; 0: none favoured", min=0.0)
    vocab_size: int = field(4096, "size of the BPE vocabulary trained on the captions", min=1)
    max_length: int = field(64, "tokens per caption (longer captions are truncated)", min=2)
    text_width: int = field(128, "width of the CLIP text encoder (a multiple of --text-heads)", min=1)
    text_layers: int = field(4, "transformer layers of the text encoder", min=1)
    text_heads: int = field(4, "attention heads of the text encoder", min=1)
    vae_channels: tuple[int, ...] = field((32, 64, 128), "autoencoder channels per level; each level after the first "
                                                         "halves the resolution")
    vae_norm_groups: int = field(8, "GroupNorm groups of the autoencoder (each of --vae-channels a multiple of it), "
                                    "so that every group holds several channels, as in SD's autoencoder; the bundled "
                                    "prior's: 32, one channel a group at the 32-channel level, as instance norm",
                                 min=1)
    vae_steps: int = field(3600, "autoencoder training steps, each on freshly rendered scenes of every emoji", min=1)
    vae_batch_size: int = field(16, "images per autoencoder step", min=1)
    vae_learning_rate: float = field(1e-3, "peak AdamW learning rate of the autoencoder (warm-up, then cosine decay)",
                                     min=0.0, max=MAX_LEARNING_RATE)
    vae_kl_weight: float = field(1e-6, "weight of the autoencoder's KL term, summed over each latent against the "
                                       "reconstruction summed over each image, as Latent Diffusion weighs them (SD's "
                                       "autoencoder: 1e-6; the bundled prior's: 0.012288)", min=0.0)
    decoder_steps: int = field(8000, "decoder refinement steps after the UNet: the autoencoder's decoder alone trained "
                                     "on (the encoder, hence the latent space and the UNet, unchanged); 0: none",
                               min=0)
    decoder_learning_rate: float = field(3e-4, "peak Adam learning rate of the decoder refinement and its discriminator "
                                               "(warm-up, then cosine decay)",
                                         min=0.0, max=MAX_LEARNING_RATE)
    decoder_extra_layers: int = field(0, "resnets added to every decoder level before the refinement, each starting as "
                                         "the identity (AutoencoderKL ties the depths, so the encoder gets identity "
                                         "ones that keep its latents bit for bit); for a longer refinement (a GPU)",
                                      min=0)
    decoder_widths: tuple[int, ...] = field((), "autoencoder channels per level for the refinement, each a multiple "
                                                 "of --vae-channels', the function kept (Net2WiderNet: each channel "
                                                 "repeated, the weights that read it shared among its copies; "
                                                 "AutoencoderKL ties the widths, so the encoder widens too and keeps "
                                                 "its latents up to float rounding); empty: unchanged; for a longer "
                                                 "refinement (a GPU)")
    decoder_sizes: tuple[int, ...] = field((12, 56), "sprite sides at 64 px, lowest and highest, drawn uniformly in the "
                                                     "decoder refinement's scenes so that it draws emoji at every "
                                                     "scale (from Python, an empty tuple: the corpus' three named sizes)")
    adversarial_weight: float = field(0.0, "weight of a PatchGAN term in the decoder refinement, times Latent "
                                           "Diffusion's adaptive weight; 0: L1 + MSE alone (docs/reference-prior.md: "
                                           "how the term did here)", min=0.0)
    text_encoder_steps: int = field(1200, "contrastive pre-training steps of the text encoder (CLIP's loss against a "
                                       "small image tower on the corpus latents) before the UNet, which then trains "
                                       "with it frozen, as SD's UNet with CLIP's; 0: text encoder trained with the UNet",
                                    min=0)
    text_encoder_batch_size: int = field(256, "caption-latent pairs per contrastive step (each caption's negatives: "
                                              "the batch's other latents)", min=2)
    text_encoder_learning_rate: float = field(1e-3, "peak AdamW learning rate of the contrastive stage (warm-up, then "
                                                    "cosine decay)", min=0.0, max=MAX_LEARNING_RATE)
    unet_channels: tuple[int, ...] = field((64, 128, 128), "UNet channels per resolution level")
    unet_attention_from: int = field(1, "first UNet level with cross-attention (0: all; attention at the finest level "
                                        "costs most)", min=0)
    unet_steps: int = field(7000, "UNet (and, without --text-encoder-steps, text encoder) training steps", min=1)
    unet_batch_size: int = field(64, "images per UNet step", min=1)
    unet_learning_rate: float = field(5e-4, "peak AdamW learning rate of the UNet and text encoder (warm-up, then "
                                            "cosine decay)", min=0.0, max=MAX_LEARNING_RATE)
    min_snr_gamma: float = field(5.0, "Min-SNR-γ loss weighting of the UNet (Hang et al. 2023); 0: plain ε-MSE",
                                 min=0.0)
    ema_decay: float = field(0.999, "decay of the exponential moving average of the UNet and text encoder weights "
                                    "that is saved; 0: no average", min=0.0)
    caption_dropout: float = field(0.1, "share of captions replaced by the empty one, so that classifier-free guidance "
                                        "works, in [0, 1]", min=0.0)
    checkpoint_every: int = field(500, "write a resumable checkpoint of the stage in training every N steps", min=1)
    probe_every: int = field(600, "measure the stage in training every N steps (reconstruction, text following on a "
                                  "small probe), for the model card's curves; 0: only at the end", min=0)
    probe_floor_images: int = field(100, "each bundled dataset's first N images through the autoencoder at every probe of "
                                         "stages 2 and 5: the floor's curve (measured only); 0: no floor probe", min=0)
    seed: int = seed_field("training seed")

    def __post_init__(self):
        check_bounds(self)
        for name in ("unnamed_share", "emphasis_weight", "caption_dropout", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0 or (name == "ema_decay" and self.ema_decay == 1.0):
                bound = "[0, 1)" if name == "ema_decay" else "[0, 1]"
                raise ValueError(f"--{name.replace('_', '-')} must be in {bound}, got {getattr(self, name)}")
        for name in ("corpus_sizes", "decoder_sizes"):
            sides = getattr(self, name)
            if sides and not (len(sides) == 2 and 1 <= sides[0] <= sides[1] <= 64):
                raise ValueError(f"--{name.replace('_', '-')} must be two sides LOW HIGH with 1 <= LOW <= HIGH <= 64, "
                                 f"got {' '.join(map(str, sides))}")
        if indivisible := [c for c in self.vae_channels if c % self.vae_norm_groups]:
            raise ValueError(f"--vae-channels must each be a multiple of --vae-norm-groups ({self.vae_norm_groups}), "
                             f"got {' '.join(map(str, indivisible))}")
        if self.decoder_widths and (problem := widening_problem(self.vae_channels, self.decoder_widths)):
            raise ValueError(f"--decoder-widths {problem}")
        if self.probe_floor_images == 1:
            raise ValueError("--probe-floor-images must be 0 (no floor probe) or at least 2 (KID compares sets), got 1")
        if self.text_width % self.text_heads:
            raise ValueError(f"--text-width ({self.text_width}) must be a multiple of --text-heads ({self.text_heads})")
        if self.unet_attention_from >= len(self.unet_channels):
            raise ValueError(f"--unet-attention-from ({self.unet_attention_from}) must name one of the "
                             f"{len(self.unet_channels)} UNet levels (0 to {len(self.unet_channels) - 1})")


def widening_problem(widths: tuple[int, ...] | list[int], wider: tuple[int, ...] | list[int]) -> str | None:
    """Why an autoencoder of channels ``widths`` cannot be widened to ``wider`` keeping its function, or None."""
    widths, wider = list(widths), list(wider)
    if len(wider) != len(widths) or any(w < 1 or w % o for w, o in zip(wider, widths)):
        return f"{' '.join(map(str, wider))} must give each of the {len(widths)} levels a multiple of its channels " \
               f"{' '.join(map(str, widths))}"
    for i in range(len(widths) - 1):  # a resnet between two levels has a 1 x 1 shortcut exactly when they differ
        if (wider[i] == wider[i + 1]) != (widths[i] == widths[i + 1]):
            return f"{' '.join(map(str, wider))} would add or remove a shortcut between levels {i} and {i + 1} of " \
                   f"{' '.join(map(str, widths))}: keep equal neighbours equal and different ones different"
    return None


def to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue  # written by a newer version; ignore rather than fail
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    from .errors import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text), "record")


def read_json(path: str | os.PathLike) -> dict:
    """One of the JSON objects dyod writes (run.json, config.json, dyod_output.json, ...), or a clear error."""
    from .errors import DyodError

    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DyodError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DyodError(f"{path} is not valid JSON ({e}); the file may be damaged") from None
    if not isinstance(value, dict):  # every file dyod writes holds an object: a list or a number is not one of them
        raise DyodError(f"{path} holds a JSON {type(value).__name__}, not the object dyod writes there; the file may "
                        "be damaged")
    return value
