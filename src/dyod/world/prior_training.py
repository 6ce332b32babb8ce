"""The reference prior: a miniature Stable Diffusion pre-trained on the emoji scene corpus, in diffusers layout.

    dyod reference pretrain --out PRIOR [--unet-steps N ...] [--resume]

Stages (each resumable, each written as soon as it is done, each timed in training/timings.json):
  1. tokenizer/    CLIP BPE vocab + merges trained on the UNet corpus' captions (HF tokenizers' BPE trainer)
  2. vae/          AutoencoderKL, 64 px -> 16 x 16 x 4 latents (x4), L1 + MSE + tiny KL, on an endless stream of freshly
                   rendered scenes of every emoji in the atlas (it must draw what the UNet is never told about);
                   scaling_factor = 1/std(latents), as SD's 0.18215
  3. text_encoder/ + unet/   on the cached latents of the UNet corpus (the concept set named, the other emoji seen
                   as "icon", every sprite size): the text encoder first pre-trained alone with CLIP's contrastive loss
                   against a small image tower (``text_encoder_steps``; 0: trained with the UNet instead), then frozen
                   (as SD's UNet learned with CLIP's) while the UNet learns: ε-prediction, Min-SNR-γ weighting, 10 %
                   caption dropout (for classifier-free guidance with the empty prompt), EMA weights
  4. scheduler/    DDIM config of the training schedule; model_index.json via StableDiffusionPipeline.save_pretrained
  5. vae/ again    with ``decoder_steps``: the decoder alone refined (L1 + MSE [+ PatchGAN]; optionally first grown by
                   identity-initialised resnets or widened, the function kept) on scenes at every sprite size, the
                   encoder frozen, so the latent space the UNet learned stays; the decoder's weights stored in float16

The concept set is every ``concept_stride``-th emoji of the atlas in code-point order: Unicode allocates each group
(faces, people, animals, food, travel, activities, objects, symbols) in contiguous runs, so the stride takes an even
share of every group, whatever the bundled datasets hold. ``training/probes.json`` records, every ``probe_every``
steps, the held-out reconstruction error, the autoencoder floor on the bundled datasets and the text following on a
small probe (the model card's curves).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..checkpoint import CheckpointOnInterrupt, load_training_state, save_training_state
from ..config import PretrainConfig, to_dict, widening_problem, write_json
from ..errors import DyodError
from ..sampling import q_sample
from ..testing import bytes_to_unicode
from .atlas import EmojiAtlas
from .concepts import (HELDOUT_SEED, atlas_corpus, concept_corpus, concept_set, heldout_corpora, render_scenes,
                       to_unit, unet_corpus)
from .scenes import SceneGenerator

logger = logging.getLogger(__name__)

def corpus(config: PretrainConfig) -> SceneGenerator:
    return concept_corpus(config)


# -- 1. tokenizer ---------------------------------------------------------------------------------------------------
CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokenization


def learn_bpe_merges(captions: list[str], num_merges: int) -> list[tuple[str, str]]:
    """BPE merges over the captions' words as CLIP splits them (bytes as unicode symbols, ``</w>`` ending a word):
    repeatedly the most frequent adjacent pair, ties broken by the pair's own order, so the same captions always give
    the same tokenizer (HF tokenizers' trainer breaks ties by hash order, which changes from process to process)."""
    import collections
    import unicodedata

    import regex

    byte_symbol = bytes_to_unicode()
    pattern = regex.compile(CLIP_WORDS)
    counts = collections.Counter(
        word for caption in captions
        for word in pattern.findall(" ".join(unicodedata.normalize("NFC", caption).lower().split())))
    words = []
    for word, n in sorted(counts.items()):
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        words.append([symbols[:-1] + [symbols[-1] + "</w>"], n])
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter = collections.Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break  # every word is one symbol
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for entry in words:
            symbols, i, merged = entry[0], 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            entry[0] = merged
    return merges


def train_tokenizer(captions: list[str], folder: Path, vocab_size: int, max_length: int) -> None:
    """A CLIP BPE tokenizer trained on the captions, laid out as CLIP's own: vocab.json holds every byte symbol, alone
    and word-final, then one entry per merge, then the start and end tokens (``vocab_size`` in all, at most)."""
    from transformers import CLIPTokenizer

    alphabet = list(bytes_to_unicode().values())
    merges = learn_bpe_merges(captions, max(0, vocab_size - 2 * len(alphabet) - 2))
    symbols = alphabet + [s + "</w>" for s in alphabet] + ["".join(m) for m in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols + ["<|startoftext|>", "<|endoftext|>"]))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    clip = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    clip.save_pretrained(folder)


# -- helpers ----------------------------------------------------------------------------------------------------------
def render_corpus(config: PretrainConfig, progress: bool) -> tuple[torch.Tensor, list[str]]:
    return render_scenes(unet_corpus(config), range(config.corpus_size), progress, "rendering corpus")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total``."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))


def _save_state(path: Path, modules: dict, optimizer, step: int, generator: torch.Generator, extra: dict | None = None):
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_training_state(path, tensors, optimizer, generator, step, extra)


def _load_state(path: Path, modules: dict, optimizer, generator: torch.Generator) -> tuple[int, dict]:
    step, tensors, meta = load_training_state(path, optimizer, generator)
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    return step, meta


class Probes:
    """training/probes.json: a list of {stage, step, seconds, ...measurements}, kept across --resume."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = json.loads(path.read_text()) if path.exists() else []

    def add(self, stage: str, step: int, seconds: float, **values) -> None:
        self.records = [r for r in self.records if not (r["stage"] == stage and r["step"] >= step)]
        self.records.append({"stage": stage, "step": step, "seconds": round(seconds, 1), **values})
        write_json(self.path, self.records)
        logger.info("probe %s step %d: %s", stage, step, values)


# -- 2. VAE -------------------------------------------------------------------------------------------------------------
def build_autoencoder(config: PretrainConfig):
    from diffusers import AutoencoderKL

    n_blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=config.resolution,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=config.vae_norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n_blocks, up_block_types=("UpDecoderBlock2D",) * n_blocks,
    )


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE: L1 keeps edges sharper than MSE alone, MSE weighs the large colour errors."""
    return F.l1_loss(recon, x) + F.mse_loss(recon, x)


def kl_per_pixel_value(posterior, x: torch.Tensor) -> torch.Tensor:
    """The KL summed over each latent, per value of its image: Latent Diffusion weighs the KL summed over the latent
    against the reconstruction summed over the image, so against the mean reconstruction loss a KL weight then means
    what it means for SD's autoencoder (1e-6), whatever the image size."""
    return posterior.kl().mean() / x[0].numel()


@torch.no_grad()
def reconstruct(vae, images_uint8: torch.Tensor, device, batch_size: int = 16) -> torch.Tensor:
    """Images through the autoencoder (posterior mean), in [-1, 1] on the CPU (small batches: on a CPU, large ones'
    activations fall out of the cache and run several times slower)."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = to_unit(images_uint8[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def heldout_sets(config: PretrainConfig, n: int = 256) -> dict[str, torch.Tensor]:
    return {name: render_scenes(gen, range(n))[0] for name, gen in heldout_corpora(config).items()}


class FloorProbe:
    """The autoencoder floor during training: each bundled dataset's first ``n`` images through the autoencoder, KID ×
    100 against those images with the bundled emoji features, as the model card measures it over more images. Measured
    only: nothing trains on it or is chosen by it."""

    def __init__(self, n: int):
        from .datasets import DATASETS, dataset_images
        from .features import EmojiFeatures

        self.features = EmojiFeatures.bundled()
        self.images = {name: dataset_images(name, n) for name in DATASETS}
        self.reference = {name: self.features(to_unit(x)) for name, x in self.images.items()}

    def __call__(self, vae, device) -> dict:
        from ..evaluation import kid

        return {f"floor_{name}": round(kid(self.features(reconstruct(vae, x, device)), self.reference[name],
                                           num_subsets=1).mean_x100, 2)
                for name, x in self.images.items()}


def autoencoder_probe(vae, heldout: dict[str, torch.Tensor], device, floor: FloorProbe | None = None) -> dict:
    vae.eval()
    values = {f"mse_{name}": round(float(F.mse_loss(reconstruct(vae, x, device), to_unit(x))), 5)
              for name, x in heldout.items()}
    if floor is not None:
        values.update(floor(vae, device))
    vae.train()
    return values


def probe_sets(config: PretrainConfig) -> tuple[dict[str, torch.Tensor] | None, FloorProbe | None]:
    """What the autoencoder stages measure every ``probe_every`` steps: held-out scenes, and the floor's datasets."""
    if not config.probe_every:
        return None, None
    return heldout_sets(config), FloorProbe(config.probe_floor_images) if config.probe_floor_images else None


def train_autoencoder(config: PretrainConfig, folder: Path, device, progress: bool, resume: bool, probes: Probes):
    vae = build_autoencoder(config).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    stream = atlas_corpus(config)
    heldout, floor = probe_sets(config)
    state_path, start, losses, before = folder.parent / "training" / "vae_state.safetensors", 0, [], 0.0
    if resume and state_path.exists():
        start, extra = _load_state(state_path, {"vae": vae}, optimizer, generator)
        losses, before = extra.get("losses", []), extra.get("vae_s", 0.0)
    started = time.time()
    vae.train()
    bar = tqdm(range(start, config.vae_steps), initial=start, total=config.vae_steps, disable=not progress, desc="prior VAE")
    with CheckpointOnInterrupt() as interrupt:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = config.vae_learning_rate * warmup_cosine(step, config.vae_steps, 100)
            batch = range(step * config.vae_batch_size, (step + 1) * config.vae_batch_size)
            x = to_unit(render_scenes(stream, batch)[0]).to(device).contiguous(memory_format=torch.channels_last)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            recon = vae.decode(z).sample
            rec = reconstruction_loss(recon, x)
            loss = rec + config.vae_kl_weight * kl_per_pixel_value(posterior, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(rec.item())
            if step % 20 == 0:
                bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
            done = step + 1
            if heldout is not None and (done % config.probe_every == 0 or done == config.vae_steps):
                probes.add("vae", done, before + time.time() - started,
                           **autoencoder_probe(vae, heldout, device, floor))
            stopping = interrupt.stopping(done, config.vae_steps)
            if done % config.checkpoint_every == 0 or stopping:
                _save_state(state_path, {"vae": vae}, optimizer, done, generator,
                            {"losses": losses, "vae_s": before + time.time() - started})
            if stopping:
                interrupt.stop(bar, done, config.vae_steps, "the prior's autoencoder", "step", state_path)
    vae.eval()
    # SD's recipe: scale latents to unit variance (SD 1.5 uses 0.18215)
    sample = render_scenes(concept_corpus(config), range(1024))[0]
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit(sample[i:i + 128]).to(device)).latent_dist.mean
                             for i in range(0, len(sample), 128)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae = vae.to(memory_format=torch.contiguous_format)
    vae.save_pretrained(folder)
    return vae.cpu(), losses, before + time.time() - started


# -- 2b. decoder refinement --------------------------------------------------------------------------------------------
class PatchDiscriminator(torch.nn.Module):
    """Latent Diffusion's (taming-transformers') NLayerDiscriminator with 3 layers: real/fake logits per patch."""

    def __init__(self, channels: int = 64):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * channels), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 4 * channels, 4, 1, 1, bias=False), nn.BatchNorm2d(4 * channels), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * channels, 1, 4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adaptive_adversarial_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Latent Diffusion's balance: ||∇ rec|| / ||∇ gan|| at the decoder's last layer, so neither term drowns the other."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def deepen_autoencoder(vae, extra_layers: int, seed: int = 0):
    """The same autoencoder with ``extra_layers`` more resnets on every level, the same function to the last bit.

    AutoencoderKL ties the decoder's depth to the encoder's (``layers_per_block``), so both grow. Each new resnet is
    appended to its block with its last convolution zero, so it starts as the identity (the residual ``x + 0``), as
    zero-initialised residual branches do (Goyal et al. 2017; ControlNet's zero convolutions): the encoder's stay so
    (frozen), the decoder's learn. The new layers' other weights are drawn from ``seed``."""
    from diffusers import AutoencoderKL

    if extra_layers <= 0:
        return vae
    old_layers = vae.config.layers_per_block
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        deeper = AutoencoderKL.from_config({**vae.config, "layers_per_block": old_layers + extra_layers})
    unexpected = deeper.load_state_dict(vae.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"not an AutoencoderKL of the same widths: {unexpected[:3]}")
    new_resnets = ([r for block in deeper.encoder.down_blocks for r in block.resnets[old_layers:]]
                   + [r for block in deeper.decoder.up_blocks for r in block.resnets[old_layers + 1:]])
    for resnet in new_resnets:
        torch.nn.init.zeros_(resnet.conv2.weight)
        torch.nn.init.zeros_(resnet.conv2.bias)
    return deeper.to(vae.device)


def widen_autoencoder(vae, widths, seed: int = 0, split: float = 0.5):
    """The same autoencoder with ``widths`` channels on its levels, each a multiple of the old, the same function up
    to float rounding.

    AutoencoderKL ties the decoder's widths to the encoder's, so both grow. Net2WiderNet (Chen et al. 2016): every
    channel is repeated, the copies side by side so that each GroupNorm group holds whole copies (the same mean and
    variance), and a weight that reads a repeated channel is shared among its copies. The encoder's shares are equal
    (frozen, its latents stay); the decoder's are drawn around equal, ``split`` apart at most, so that the copies learn
    different things from the first step. The mid-block attention's query shrinks by sqrt(r) for an r-fold widening:
    repeated dimensions grow q·k r-fold while its 1/sqrt(d) scale shrinks by sqrt(r) only."""
    from diffusers import AutoencoderKL

    old_widths, widths = list(vae.config.block_out_channels), [int(w) for w in widths]
    if widths == old_widths:
        return vae
    if problem := widening_problem(old_widths, widths):
        raise ValueError(f"widths {problem}")
    wide = AutoencoderKL.from_config({**vae.config, "block_out_channels": widths})
    generator = torch.Generator().manual_seed(seed)
    old, state = vae.state_dict(), {}
    for name, target in wide.state_dict().items():
        weight = old[name].detach().float().cpu()
        for dim in range(min(2, weight.ndim)):
            copies = target.shape[dim] // weight.shape[dim]
            if copies == 1:
                continue
            weight = weight.repeat_interleave(copies, dim=dim)
            if dim == 1:  # reads repeated channels: their copies share the weight
                shares = torch.ones(weight.shape[0], weight.shape[1] // copies, copies)
                if split and name.startswith(("decoder.", "post_quant_conv.")):
                    shares += split * (torch.rand(shares.shape, generator=generator) - 0.5)
                shares = (shares / shares.sum(-1, keepdim=True)).reshape(weight.shape[:2])
                weight = weight * shares.view(*shares.shape, *[1] * (weight.ndim - 2))
        state[name] = weight
    for key in [k for k in state if ".mid_block.attentions.0.to_q." in k]:
        state[key] = state[key] / math.sqrt(widths[-1] // old_widths[-1])
    wide.load_state_dict(state)
    return wide.to(vae.device)


def save_autoencoder(vae, folder: Path) -> None:
    """Save with the decoder's weights in float16 and the encoder's in float32: the encoder's latents, which the UNet
    learned, stay bit for bit, and the file stays small; diffusers loads both into a float32 model."""
    vae = vae.to(memory_format=torch.contiguous_format)
    vae.decoder.half(), vae.post_quant_conv.half()
    vae.save_pretrained(folder)
    vae.decoder.float(), vae.post_quant_conv.float()


def refine_decoder(config: PretrainConfig, folder: Path, device, progress: bool, resume: bool, probes: Probes):
    """The autoencoder's decoder alone trained on (L1 + MSE + an adaptively weighted hinge PatchGAN term) on fresh
    scenes of every emoji at every size in ``decoder_sizes``, its encoder frozen: the latents, hence the UNet, stay as
    they are. The decoder first grows by ``decoder_extra_layers`` resnets per level and widens to ``decoder_widths``
    channels. Returns (vae, losses, seconds)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    grown = 1 + config.decoder_extra_layers  # stage 2's autoencoder has one resnet per encoder level
    vae = deepen_autoencoder(vae, grown - vae.config.layers_per_block, seed=config.seed + 3)
    if config.decoder_widths:  # checked against --vae-channels when the config was made, not against a resumed one
        if problem := widening_problem(vae.config.block_out_channels, config.decoder_widths):
            raise DyodError(f"--decoder-widths {problem}: {folder} holds an autoencoder already widened; resume with "
                            "the widths it was refined with")
        vae = widen_autoencoder(vae, config.decoder_widths, seed=config.seed + 4)
    vae = vae.to(device, memory_format=torch.channels_last)
    vae.requires_grad_(False)
    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trained:
        p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):  # its initial weights the same whether or not stages 1-4 ran before
        torch.manual_seed(config.seed + 2)
        disc = PatchDiscriminator().to(device)
    opt_g = torch.optim.Adam(trained, lr=config.decoder_learning_rate, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.decoder_learning_rate, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(config.seed + 2)
    stream = atlas_corpus(config, seed=config.corpus_seed + 2, size_range=tuple(config.decoder_sizes) or None)
    heldout, floor = probe_sets(config)
    state_path, start, losses, before = folder.parent / "training" / "decoder_state.safetensors", 0, [], 0.0
    if resume and state_path.exists():
        try:
            start, tensors, meta = load_training_state(state_path, opt_g, generator)
            vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        except (RuntimeError, ValueError) as error:
            raise DyodError(f"{state_path} holds a decoder of another depth or width than --decoder-extra-layers "
                            f"{config.decoder_extra_layers} and --decoder-widths make: "
                            "resume with the values it was started with, or delete that file to start the decoder "
                            "refinement anew") from error
        disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        state_d = opt_d.state_dict()
        for key in [k for k in tensors if k.startswith("optim_d.")]:
            _, i, name = key.split(".", 2)
            state_d["state"].setdefault(int(i), {})[name] = tensors[key]
        opt_d.load_state_dict(state_d)
        losses, before = meta.get("losses", []), meta.get("decoder_s", 0.0)
    started = time.time()
    vae.decoder.train(), disc.train()
    last_layer = vae.decoder.conv_out.weight
    bar = tqdm(range(start, config.decoder_steps), initial=start, total=config.decoder_steps, disable=not progress,
               desc="prior decoder")
    with CheckpointOnInterrupt() as interrupt:
        for step in bar:
            for optimizer in (opt_g, opt_d):  # annealed: at a constant rate the decoder's weights keep wandering
                for group in optimizer.param_groups:
                    group["lr"] = config.decoder_learning_rate * warmup_cosine(step, config.decoder_steps, 100)
            batch = range(step * config.vae_batch_size, (step + 1) * config.vae_batch_size)
            x = to_unit(render_scenes(stream, batch)[0]).to(device).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
                z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            recon = vae.decode(z).sample
            rec = reconstruction_loss(recon, x)
            loss = rec
            if config.adversarial_weight:
                gan = -disc(recon).mean()  # hinge generator loss
                loss = rec + config.adversarial_weight * adaptive_adversarial_weight(rec, gan, last_layer) * gan
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            if config.adversarial_weight:
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            losses.append(rec.item())
            if step % 20 == 0:
                bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
            done = step + 1
            if heldout is not None and (done % config.probe_every == 0 or done == config.decoder_steps):
                vae.decoder.eval()
                probes.add("decoder", done, before + time.time() - started,
                           **autoencoder_probe(vae, heldout, device, floor))
                vae.decoder.train()
            stopping = interrupt.stopping(done, config.decoder_steps)
            if done % config.checkpoint_every == 0 or done == config.decoder_steps or stopping:
                tensors = {**{f"vae.{k}": v for k, v in vae.state_dict().items()},
                           **{f"disc.{k}": v for k, v in disc.state_dict().items()},
                           **{f"optim_d.{i}.{k}": torch.as_tensor(v) for i, st in opt_d.state_dict()["state"].items()
                              for k, v in st.items()}}
                save_training_state(state_path, tensors, opt_g, generator, done,
                                    {"losses": losses, "decoder_s": before + time.time() - started})
            if stopping:
                interrupt.stop(bar, done, config.decoder_steps, "the prior's decoder refinement", "step", state_path)
    vae.eval()
    save_autoencoder(vae, folder)
    return vae.cpu(), losses, before + time.time() - started


@torch.no_grad()
def encode_corpus(vae, images: torch.Tensor, device, progress: bool,
                  batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every image (small batches, as in ``reconstruct``)."""
    vae = vae.to(device).eval()
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encoding corpus"):
        x = to_unit(images[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


# -- 3a. text encoder, contrastive (optional) ----------------------------------------------------------------------------
class LatentImageTower(torch.nn.Module):
    """CLIP's image tower in miniature, over the corpus latents: strided convolutions, then a linear map of the whole
    4 × 4 grid (captions say where each emoji is, so the map keeps the layout rather than pooling it away)."""

    def __init__(self, latent_channels: int = 4, width: int = 64, dim: int = 128):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, dim),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class ContrastiveHeads(torch.nn.Module):
    """What the contrastive stage trains beside the text encoder and then drops: the image tower, CLIP's text
    projection (no bias) and its learned temperature (initialised to 1/0.07, as CLIP's)."""

    def __init__(self, text_width: int, dim: int = 128):
        super().__init__()
        self.image_tower = LatentImageTower(dim=dim)
        self.text_projection = torch.nn.Linear(text_width, dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def similarity(self, text_pooled: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Caption × image logits: the cosine similarity times the temperature (capped at 100, as CLIP's)."""
        text = F.normalize(self.text_projection(text_pooled), dim=-1)
        image = F.normalize(self.image_tower(latents), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * text @ image.T


def clip_loss(similarity: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: each caption's own image among the batch's, and each image's own caption
    (transformers' private helper for it has changed names between releases)."""
    labels = torch.arange(len(similarity), device=similarity.device)
    return (F.cross_entropy(similarity, labels) + F.cross_entropy(similarity.T, labels)) / 2


def trim_padding(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The token ids cut after the batch's last end-of-text token: under CLIP's causal mask no position attends to a
    later one, so every earlier output, the pooled one too, is the same, at a fraction of the cost."""
    ends = (ids == eos_token_id).int().argmax(dim=-1)
    return ids[:, :int(ends.max()) + 1]


def retrieval_accuracy(heads: ContrastiveHeads, text_encoder, ids: torch.Tensor, latents: torch.Tensor) -> float:
    """How often a held-out caption's own latent is the most similar of the batch's (chance: 1 / batch)."""
    with torch.no_grad():
        pooled = text_encoder(trim_padding(ids, text_encoder.config.eos_token_id)).pooler_output
        matches = heads.similarity(pooled, latents).argmax(dim=-1) == torch.arange(len(ids), device=latents.device)
        return float(matches.float().mean())


def pretrain_text_encoder(config: PretrainConfig, out: Path, tokenizer, latents: tuple[torch.Tensor, torch.Tensor],
                          token_ids: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor], device, progress: bool,
                          resume: bool, probes: Probes):
    """CLIP's contrastive loss (Radford et al. 2021) between the corpus captions and their latents, so that the text
    encoder tells the concepts apart before the UNet's first step (the UNet then learns with it frozen, as SD's with
    CLIP's). ``latents``: the posterior mean and std (a sample is drawn each step); ``held``: held-out ids and latents
    for the retrieval probe. Returns (text_encoder, losses, seconds)."""
    means, stds = latents
    with torch.random.fork_rng(devices=[]):  # the same initial weights whichever stages this invocation ran before
        torch.manual_seed(config.seed + 4)
        text_encoder = build_text_encoder(config, tokenizer).to(device).train()
        heads = ContrastiveHeads(config.text_width).to(device).train()
    params = list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.text_encoder_learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed + 4)
    modules = {"text_encoder": text_encoder, "heads": heads}
    state_path, start, losses, before = out / "training" / "text_encoder_state.safetensors", 0, [], 0.0
    if resume and state_path.exists():
        start, extra = _load_state(state_path, modules, optimizer, generator)
        losses, before = extra.get("losses", []), extra.get("text_encoder_s", 0.0)
    eos = tokenizer.eos_token_id
    started = time.time()
    steps = config.text_encoder_steps
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="prior text encoder")
    with CheckpointOnInterrupt() as interrupt:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = config.text_encoder_learning_rate * warmup_cosine(step, steps, 100)
            idx = torch.randperm(len(means), generator=generator)[:config.text_encoder_batch_size]
            z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)
            ids = trim_padding(token_ids[idx], eos).to(device)
            loss = clip_loss(heads.similarity(text_encoder(ids).pooler_output, z.to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            done = step + 1
            if config.probe_every and (done % config.probe_every == 0 or done == steps):
                text_encoder.eval(), heads.eval()
                accuracy = retrieval_accuracy(heads, text_encoder, held[0].to(device), held[1].to(device))
                text_encoder.train(), heads.train()
                probes.add("text_encoder", done, before + time.time() - started,
                           loss=round(float(np.mean(losses[-100:])), 4), heldout_retrieval_top1=round(accuracy, 4))
            stopping = interrupt.stopping(done, steps)
            if done % config.checkpoint_every == 0 or done == steps or stopping:
                _save_state(state_path, modules, optimizer, done, generator,
                            {"losses": losses, "text_encoder_s": before + time.time() - started})
            if stopping:
                interrupt.stop(bar, done, steps, "the prior's text encoder", "step", state_path)
    return text_encoder.eval(), losses, before + time.time() - started


# -- 3. UNet + text encoder ---------------------------------------------------------------------------------------------
def build_text_encoder(config: PretrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(config: PretrainConfig):
    from diffusers import UNet2DConditionModel

    ch, first = config.unet_channels, config.unet_attention_from
    # cross-attention from level ``first`` down; the deepest level's attention is the mid block's
    down = tuple("CrossAttnDownBlock2D" if first <= i < len(ch) - 1 else "DownBlock2D" for i in range(len(ch)))
    return UNet2DConditionModel(
        sample_size=config.resolution // 2 ** (len(config.vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=ch, layers_per_block=1, cross_attention_dim=config.text_width, attention_head_dim=8,
        down_block_types=down, up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        norm_num_groups=32,
    )


def ddim_config(prediction_type: str = "epsilon") -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                timestep_spacing="leading")


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights of the ε-MSE per sample: min(SNR(t), γ) / SNR(t) (Hang et al. 2023; 1 where γ is 0)."""
    if not gamma:
        return torch.ones_like(t, dtype=torch.float32)
    ab = alphas_cumprod[t]
    snr = ab / (1 - ab)
    return snr.clamp(max=gamma) / snr


def ema_of(params: list[torch.nn.Parameter], decay: float):
    """diffusers' EMAModel of the parameters (its warm-up (1 + n) / (10 + n), capped at ``decay``): the weights saved."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, foreach=True)


def unet_probe(unet, text_encoder, tokenizer, vae, scaling, probe_emoji, probe_batch, alphas_cumprod, device) -> dict:
    """Text following on a small probe (20 DDIM steps), and whether the UNet uses the text at all: the ε-MSE of a
    fixed held-out batch with its true captions against the same captions shuffled."""
    from .prior_card import sample_single_emoji, top_k_hits

    unet.eval(), text_encoder.eval()
    with torch.no_grad():
        images = sample_single_emoji(unet, text_encoder, tokenizer, vae, scaling, probe_emoji, steps=20, device=device)
        top1, top5 = top_k_hits(images, probe_emoji)
        latents, ids, noise, t = (v.to(device) for v in probe_batch)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = q_sample(latents, noise, ab)
        mse = {}
        for name, order in (("true", torch.arange(len(ids))), ("shuffled", torch.roll(torch.arange(len(ids)), 1))):
            pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids[order.to(device)])[0]).sample
            mse[name] = float(F.mse_loss(pred, noise))
    unet.train(), text_encoder.train()
    return {"probe_top1": round(float(top1.mean()), 4), "probe_top5": round(float(top5.mean()), 4),
            "mse_true_captions": round(mse["true"], 5), "mse_shuffled_captions": round(mse["shuffled"], 5)}


@torch.no_grad()
def encode_captions(text_encoder, token_ids: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
    """The text encoder's last hidden states of every caption (what the UNet attends to), on the CPU."""
    text_encoder.eval()
    return torch.cat([text_encoder(token_ids[i:i + batch_size].to(device))[0].cpu()
                      for i in range(0, len(token_ids), batch_size)])


def train_unet(config: PretrainConfig, out: Path, tokenizer, vae, means, stds, token_ids, empty_ids, device,
               progress: bool, resume: bool, probes: Probes, frozen_text_encoder=None):
    """Stage 3: the UNet, and the text encoder with it unless ``frozen_text_encoder`` (stage 3a's) is given."""
    from diffusers import DDIMScheduler

    work = out / "training"
    frozen = frozen_text_encoder is not None
    with torch.random.fork_rng(devices=[]):  # the same initial weights whichever stages this invocation ran before
        torch.manual_seed(config.seed + 1)
        text_encoder = frozen_text_encoder.requires_grad_(False) if frozen else build_text_encoder(config, tokenizer)
        unet = build_unet(config)
    unet.to(device, memory_format=torch.channels_last).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(params, lr=config.unet_learning_rate, weight_decay=0.01)
    ema = ema_of(params, config.ema_decay) if config.ema_decay else None
    generator = torch.Generator().manual_seed(config.seed + 1)
    state_path, start, losses, before = work / "unet_state.safetensors", 0, [], 0.0
    if resume and state_path.exists():
        modules = {"unet": unet, "text_encoder": text_encoder}
        step, tensors, meta = load_training_state(state_path, optimizer, generator)
        for name, m in modules.items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        if ema is not None:
            for i, shadow in enumerate(ema.shadow_params):
                shadow.copy_(tensors[f"ema.{i}"])
            ema.optimization_step = meta["ema_step"]
        start, losses, before = step, meta.get("losses", []), meta.get("unet_s", 0.0)
    alphas_cumprod = DDIMScheduler(**ddim_config()).alphas_cumprod.to(device)
    scaling = vae.config.scaling_factor
    vae = vae.to(device).eval()
    # the probe: 24 concepts and a fixed held-out batch (scenes of a seed the UNet never trains on)
    rng = np.random.default_rng(config.seed)
    probe_emoji = [int(k) for k in rng.choice(concept_set(EmojiAtlas.bundled(), config.concept_stride), 24, replace=False)]
    held_images, held_captions = render_scenes(concept_corpus(config, seed=HELDOUT_SEED), range(128))
    held_mean, held_std = encode_corpus(vae, held_images, device, False)
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    held_latents = (held_mean + held_std * torch.randn(held_mean.shape, generator=g)) * scaling
    probe_batch = (held_latents, tokenizer(held_captions, padding="max_length", max_length=config.max_length,
                                           truncation=True, return_tensors="pt").input_ids,
                   torch.randn(held_latents.shape, generator=g), torch.randint(100, 900, (128,), generator=g))

    def state_tensors():
        tensors = {f"{name}.{k}": v for name, m in (("unet", unet), ("text_encoder", text_encoder))
                   for k, v in m.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{i}": shadow for i, shadow in enumerate(ema.shadow_params)})
        return tensors

    def probe(step: int) -> None:
        if ema is not None:  # the probe measures the weights that will be saved
            ema.store(params)
            ema.copy_to(params)
        values = unet_probe(unet, text_encoder, tokenizer, vae, scaling, probe_emoji, probe_batch, alphas_cumprod,
                            device)
        if ema is not None:
            ema.restore(params)
        probes.add("unet", step, before + time.time() - started, loss=round(float(np.mean(losses[-200:])), 5), **values)

    started = time.time()  # caching the captions' hidden states counts: every invocation of the stage pays it
    cached_hidden = cached_empty = None
    if frozen:  # every caption's hidden states computed once, as the latents are
        cached_hidden = encode_captions(text_encoder, token_ids, device)
        cached_empty = encode_captions(text_encoder, empty_ids, device)[0]
    bar = tqdm(range(start, config.unet_steps), initial=start, total=config.unet_steps, disable=not progress, desc="prior UNet")
    with CheckpointOnInterrupt() as interrupt:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = config.unet_learning_rate * warmup_cosine(step, config.unet_steps, 500)
            idx = torch.randint(len(means), (config.unet_batch_size,), generator=generator)
            latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scaling
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(1000, (len(idx),), generator=generator)
            drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
            if cached_hidden is not None:
                hidden = cached_hidden[idx].clone()
                hidden[drop] = cached_empty
            else:
                ids = token_ids[idx].clone()
                ids[drop] = empty_ids[0]
                hidden = text_encoder(ids.to(device))[0]
            latents, noise, t, hidden = latents.to(device), noise.to(device), t.to(device), hidden.to(device)
            ab = alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = q_sample(latents, noise, ab).contiguous(memory_format=torch.channels_last)  # Eq. 4
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
            per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # Eq. 5
            loss = (min_snr_weights(alphas_cumprod, t, config.min_snr_gamma) * per_sample).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if ema is not None:
                ema.step(params)
            losses.append(float(per_sample.detach().mean()))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
            done = step + 1
            if config.probe_every and done % config.probe_every == 0 and done < config.unet_steps:
                probe(done)
            stopping = interrupt.stopping(done, config.unet_steps)
            if done % config.checkpoint_every == 0 or done == config.unet_steps or stopping:
                save_training_state(state_path, state_tensors(), optimizer, generator, done,
                                    {"losses": losses, "unet_s": before + time.time() - started,
                                     "ema_step": ema.optimization_step if ema is not None else 0})
            if stopping:
                interrupt.stop(bar, done, config.unet_steps, "the prior's UNet", "step", state_path)
    elapsed = before + time.time() - started
    if ema is not None:
        ema.copy_to(params)
    if config.probe_every:
        probe(config.unet_steps)
    return unet.to(memory_format=torch.contiguous_format), text_encoder, losses, elapsed


def unet_stage_finished(out: Path, config: PretrainConfig) -> bool:
    """Stages 1-4 are written (the pipeline saved after the UNet's last step), so a --resume need not re-encode the
    corpus nor load the UNet's training state (which is not committed with the bundled prior)."""
    losses = out / "training" / "unet_losses.json"
    return ((out / "model_index.json").exists() and (out / "unet" / "config.json").exists() and losses.exists()
            and len(json.loads(losses.read_text())) >= config.unet_steps)


def train_tokenizer_autoencoder_and_unet(out: Path, config: PretrainConfig, resume: bool, progress: bool, device,
                                         timings: dict, probes: Probes) -> None:
    """Stages 1-4, each skipped where --resume finds it done; the pipeline is saved at the end."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    work = out / "training"
    started = time.time()
    images, captions = render_corpus(config, progress)
    timings["render_s"] = round(time.time() - started, 1)

    if not (out / "tokenizer" / "vocab.json").exists():
        train_tokenizer(captions, out / "tokenizer", config.vocab_size, config.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    lengths = [len(ids) for ids in tokenizer(captions[:2000]).input_ids]
    if max(lengths) > config.max_length:
        logger.warning("%d of 2000 captions exceed %d tokens and are truncated",
                       sum(n > config.max_length for n in lengths), config.max_length)

    if not (out / "vae" / "config.json").exists():
        vae, vae_losses, seconds = train_autoencoder(config, out / "vae", device, progress, resume, probes)
        timings["vae_s"] = round(seconds, 1)
        write_json(work / "vae_losses.json", vae_losses)
        write_json(work / "timings.json", timings)  # kept across a --resume of the UNet stage
    vae = AutoencoderKL.from_pretrained(out / "vae").to(memory_format=torch.channels_last)
    t = time.time()
    means, stds = encode_corpus(vae, images, device, progress)
    timings["encode_s"] = round(time.time() - t, 1)
    token_ids = tokenizer(captions, padding="max_length", max_length=config.max_length, truncation=True,
                          return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=config.max_length, return_tensors="pt").input_ids

    frozen_text_encoder = None
    if config.text_encoder_steps:
        held_images, held_captions = render_scenes(unet_corpus(config, seed=HELDOUT_SEED), range(256))
        held = (tokenizer(held_captions, padding="max_length", max_length=config.max_length, truncation=True,
                          return_tensors="pt").input_ids, encode_corpus(vae, held_images, device, False)[0])
        frozen_text_encoder, te_losses, seconds = pretrain_text_encoder(
            config, out, tokenizer, (means, stds), token_ids, held, device, progress, resume, probes)
        timings["text_encoder_s"] = round(seconds, 1)
        write_json(work / "text_encoder_losses.json", te_losses)
    unet, text_encoder, losses, seconds = train_unet(config, out, tokenizer, vae, means, stds, token_ids, empty_ids,
                                                     device, progress, resume, probes, frozen_text_encoder)
    timings["unet_s"] = round(seconds, 1)
    write_json(work / "unet_losses.json", losses)

    pipe = StableDiffusionPipeline(
        vae=vae.cpu().to(memory_format=torch.contiguous_format), text_encoder=text_encoder.cpu().eval(),
        tokenizer=tokenizer, unet=unet.cpu().eval(), scheduler=DDIMScheduler(**ddim_config()), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    write_json(work / "timings.json", timings)


def pretrain(out: str | os.PathLike, config: PretrainConfig = PretrainConfig(), resume: bool = False,
             progress: bool = True, device: str | None = None) -> Path:
    """Train the reference prior into ``out`` (a diffusers folder), stage by stage; return ``out``."""
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if out.exists() and any(out.iterdir()) and not resume:
        raise DyodError(f"{out} is not empty; pass --resume to continue a pre-training there, or choose another --out")
    work = out / "training"
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "pretrain_config.json", to_dict(config))
    timings: dict = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}
    timings.update(device=device, threads=torch.get_num_threads())
    probes = Probes(work / "probes.json")
    torch.manual_seed(config.seed)

    if unet_stage_finished(out, config):  # a --resume for stage 5: the corpus, its latents and the UNet are done
        logger.info("%s holds a finished UNet (%d steps): going on to the decoder refinement", out, config.unet_steps)
    else:
        train_tokenizer_autoencoder_and_unet(out, config, resume, progress, device, timings, probes)
    if config.decoder_steps:  # after the UNet: the encoder is frozen, so the latents the UNet learned stay
        _, decoder_losses, seconds = refine_decoder(config, out / "vae", device, progress, resume, probes)
        timings["decoder_s"] = round(seconds, 1)
        write_json(work / "decoder_losses.json", decoder_losses)
        write_json(work / "timings.json", timings)
    return out
