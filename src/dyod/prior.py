"""The frozen text-to-image prior p_phi(x | c): any diffusers-format Stable Diffusion, by folder or hub id.

Components are loaded one by one with ``from_pretrained`` (the layout of stable-diffusion-v1-5 and 2.x:
``tokenizer/``, ``text_encoder/``, ``unet/``, ``vae/``, ``scheduler/``), so epsilon- and v-prediction models and
their scheduler configs work unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch

from .errors import DyodError, first_line

logger = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
BUNDLED_PRIOR = "emoji-prior"  # --model name of the reference prior shipped inside the package


def bundled_prior_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("dyod.world") / "assets" / "prior"))


def resolve_model(model: str) -> str:
    """``emoji-prior`` names the bundled reference prior; anything else is a folder or a hub id."""
    if model == BUNDLED_PRIOR:
        path = bundled_prior_path()
        if not (path / "model_index.json").exists():
            raise DyodError(f"the bundled reference prior is missing from {path}; reinstall dyod or run "
                            "`dyod reference pretrain --out PRIOR` and pass --model PRIOR")
        return str(path)
    return model


@dataclasses.dataclass
class Prior:
    """The frozen parts of a Stable Diffusion model, and what dyod needs to know about them."""

    model: str
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Pixel resolution the UNet was trained at (512 for SD 1.5, 768 for SD 2.x-v, 64 for the reference prior)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for the training timesteps (Eq. 4), exactly as diffusers' schedulers compute it."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod.clone()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Prior":
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    def describe(self) -> dict:
        return {
            "model": self.model,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "latent_channels": self.latent_channels,
            "embedding_dim": self.embedding_dim,
            "vocab_size": len(self.tokenizer),
        }


def _model_not_found(model: str, reason: str) -> DyodError:
    return DyodError(
        f"could not load the diffusers model {model!r}: {reason}\n"
        "  --model takes a local folder in diffusers layout (model_index.json with tokenizer/, text_encoder/, "
        "unet/, vae/, scheduler/), e.g. a stable-diffusion-v1-5 snapshot, or a hub id such as "
        "'stable-diffusion-v1-5/stable-diffusion-v1-5' while online (offline, a hub id works only if it is already "
        "in the Hugging Face cache; download it elsewhere with `hf download MODEL_ID --local-dir FOLDER` and pass the "
        "folder)."
    )


def is_hub_id(model: str) -> bool:
    """A hub id is "org/name"; anything else path-like is a folder that must exist."""
    return not (model == BUNDLED_PRIOR or Path(model).exists() or model.startswith((".", "/", "~"))
                or model.count("/") > 1 or "\\" in model)


def hub_cache_note(model: str) -> str | None:
    """For a hub id, whether this machine's Hugging Face cache holds it (``dyod info``); None for anything else."""
    if not is_hub_id(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return "a hub id, in this machine's Hugging Face cache"
    return "a hub id, not in this machine's Hugging Face cache: the sampling commands download it (online)"


_HUB_UNREACHABLE: dict[str, str] = {}  # hub id -> why the Hub could not be reached, for the error message


def _hub_unreachable_reason(repo_id: str) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "is switched off (HF_HUB_OFFLINE)"
    return f"could not be reached ({_HUB_UNREACHABLE.get(repo_id, 'no answer')})"


def hub_options(repo_id: str) -> dict:
    """``from_pretrained`` options for a hub id: none when the Hub answers; ``local_files_only`` when it is switched
    off or cannot be reached. Asking once spares what huggingface_hub does otherwise without a network: retries of
    every file, each waiting for a time-out, before it falls back to its cache, and a model that is not cached refused
    only after them as "does not appear to have a file named config.json"."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return {"local_files_only": True}
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return {}  # its files say what access they need
    except RevisionNotFoundError as e:
        raise _model_not_found(repo_id, f"{type(e).__name__}: {first_line(e)}") from e
    except RepositoryNotFoundError as e:
        raise _model_not_found(repo_id, "the Hugging Face Hub has no model of that id (a private or gated model needs "
                                        f"`hf auth login` first), and there is no folder {repo_id} here") from e
    except HfHubHTTPError as e:  # an answer, but an error (a mirror that serves files alone): the files may come
        logger.debug("the Hugging Face Hub answered about %s with %s; loading as usual", repo_id, first_line(e))
        return {}
    except Exception as e:  # noqa: BLE001 - no network, a refusing proxy, a time-out: the cache decides
        reason = f"{type(e).__name__}: {first_line(e) or type(e).__name__}"
        _HUB_UNREACHABLE[repo_id] = reason
        logger.warning("the Hugging Face Hub could not be reached (%s); loading %s from the cache", reason, repo_id)
        return {"local_files_only": True}
    return {}


def weights_variant(folder: Path) -> str | None:
    """The variant of a component folder's weights when it holds only variant files, as a download of a model's fp16
    variant does (``diffusion_pytorch_model.fp16.safetensors``): "fp16"; None when the plain files are there."""
    names = [p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors")]
    if not names or any("." not in n for n in names):
        return None
    variants = {n.rsplit(".", 1)[1] for n in names}
    return variants.pop() if len(variants) == 1 else None


def check_text_to_image(model: str, unet_config: dict, vae_config: dict, text_width: int) -> None:
    """dyod runs text-to-image models shaped like SD 1.x and 2.x: a UNet that sees the VAE's latents alone and is
    conditioned on one CLIP text encoder through cross-attention. Other diffusers models load with the same classes
    and fail later, deep in a forward pass: refuse them here, from their configs, before any weights load."""
    why = None
    extra = unet_config.get("addition_embed_type") or unet_config.get("class_embed_type")
    latent_channels = vae_config.get("latent_channels", 4)
    in_channels = unet_config.get("in_channels", 4)
    cross = unet_config.get("cross_attention_dim")
    if extra:
        why = (f"its UNet takes conditioning besides the text's hidden states ({extra!r}: e.g. SDXL's pooled text "
               "embedding and image-size ids, or an upscaler's noise level)")
    elif in_channels != latent_channels:
        why = (f"its UNet takes {in_channels} input channels where its VAE gives {latent_channels} (an inpainting, "
               "depth or instruct-pix2pix model conditions on extra channels)")
    elif isinstance(cross, int) and cross != text_width:
        why = f"its UNet attends to {cross}-wide text states, its text_encoder/ gives {text_width}"
    if why:
        raise DyodError(f"{model} is not a text-to-image model dyod can run: {why}. dyod needs one shaped like "
                        "Stable Diffusion 1.x or 2.x (e.g. stable-diffusion-v1-5, stable-diffusion-2-1-base): a "
                        "UNet on the VAE's latents, conditioned on one CLIP text encoder by cross-attention")


def model_reference(model: str | os.PathLike) -> str:
    """How a run records its model: a local folder as its absolute path (a relative one would name another folder, or
    none, from wherever a later command runs), the bundled prior and a hub id as given."""
    name = str(model)
    if name != BUNDLED_PRIOR and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def same_model(recorded: str, model: str) -> bool:
    """Whether ``model`` names the model a run records: the same name, or the same local folder (a run from before
    folders were recorded absolute names them relative to where it was made)."""
    if recorded == model:
        return True
    a, b = Path(recorded), Path(model)
    return BUNDLED_PRIOR not in (recorded, model) and a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


@contextlib.contextmanager
def _no_weight_loading_bar(local: bool):
    """transformers 5 draws a "Loading weights" bar for every model it loads, a line between dyod's own bars for a
    load that takes a second; dyod logs what it loaded instead. Only from a local folder: transformers' switch also
    turns off huggingface_hub's bars, and a hub id's first load is a download worth watching."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    if local and enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and enabled:
            transformers_logging.enable_progress_bar()


def load_prior(model: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Prior:
    """Load the frozen prior from a local diffusers folder or a hub id, with a clear error when it is missing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    name = str(model)
    model = resolve_model(name)
    local = Path(model)
    looks_local = not is_hub_id(model)
    if looks_local:
        if not local.exists():
            raise _model_not_found(model, f"the folder {local} does not exist")
        if not local.is_dir():
            if local.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):  # one file, as many share SD
                raise _model_not_found(model, f"{local} is a single-file checkpoint, not a diffusers folder; convert it "
                                              "once with diffusers (`StableDiffusionPipeline.from_single_file(FILE)"
                                              ".save_pretrained(FOLDER)`, online: it fetches the model's configs) and "
                                              "pass the folder")
            raise _model_not_found(model, f"{local} is not a folder")
        missing = [c for c in COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise _model_not_found(model, f"the folder lacks {', '.join(c + '/' for c in missing)}")
        pickled = [c for c in ("text_encoder", "unet", "vae")
                   if not any((local / c).glob("*.safetensors")) and any((local / c).glob("*.bin"))]
        if pickled:
            raise _model_not_found(model, f"{', '.join(c + '/' for c in pickled)} hold only pickled weights (.bin), "
                                          "which dyod does not load (a pickle can run code); convert the model to "
                                          "safetensors where you trust it: "
                                          "`StableDiffusionPipeline.from_pretrained(FOLDER).save_pretrained(NEW)`")
    hub = {} if looks_local else hub_options(model)
    try:
        from diffusers import DDIMScheduler

        def variant(component: str) -> dict:
            found = weights_variant(local / component) if looks_local else None
            if found:
                logger.info("%s: loading the %r variant of the weights (the folder holds no others)", component, found)
            return {"variant": found, **hub} if found else hub

        check_text_to_image(name, dict(UNet2DConditionModel.load_config(model, subfolder="unet", **hub)),
                            dict(AutoencoderKL.load_config(model, subfolder="vae", **hub)),
                            CLIPTextConfig.from_pretrained(model, subfolder="text_encoder", **hub).hidden_size)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **hub)
        with _no_weight_loading_bar(looks_local):
            text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype,
                                                         use_safetensors=True, **variant("text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, use_safetensors=True,
                                                    **variant("unet"))
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, use_safetensors=True,
                                            **variant("vae"))
        scheduler_config = dict(DDIMScheduler.load_config(model, subfolder="scheduler", **hub))
    except DyodError:
        raise
    except Exception as e:  # hub/OS/validation errors differ across huggingface_hub versions
        reason = f"{type(e).__name__}: {first_line(e) or type(e).__name__}"
        if hub.get("local_files_only"):
            reason = (f"the Hugging Face Hub {_hub_unreachable_reason(model)} and the model is not (wholly) in the "
                      f"Hugging Face cache (from the cache: {reason}); there is no folder {model} here either")
        raise _model_not_found(model, reason) from e
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
        module.eval()
    prior = Prior(name, tokenizer, text_encoder, unet, vae, scheduler_config).to(device)
    logger.info("loaded prior %s: %s", model, prior.describe())
    return prior
