"""The bundled reference prior and its pre-training command."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from dyod.errors import DyodError
from dyod.prior import bundled_prior_path, load_prior


def test_bundled_prior_loads_like_any_model_and_generates_deterministically():
    prior = load_prior("emoji-prior")
    assert prior.resolution == 64 and prior.vae_scale_factor == 4 and prior.prediction_type == "epsilon"
    assert prior.model == "emoji-prior"
    pipe = StableDiffusionPipeline.from_pretrained(bundled_prior_path(), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red apple in the center on a white background"
    a = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    ids = pipe.tokenizer("a red apple and a tangerine on a white background").input_ids
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]  # the datasets' words are in the trained vocabulary
    card = (bundled_prior_path() / "MODEL_CARD.md").read_text()
    assert "## Measured properties" in card and "top-1 / top-5" in card and "autoencoder floor" in card


@pytest.mark.slow
def test_pretrain_smoke_writes_a_diffusers_folder(tmp_path):
    from dyod.world.prior_training import PretrainConfig, pretrain

    config = PretrainConfig(corpus_size=64, vae_steps=2, vae_batch_size=4, unet_steps=3, unet_batch_size=4,
                            vocab_size=600, text_width=32, text_layers=1, vae_channels=(32, 32, 32),
                            unet_channels=(32, 32, 32), checkpoint_every=2, decoder_steps=2, text_encoder_steps=2,
                            text_encoder_batch_size=8)
    out = pretrain(tmp_path / "prior", config, progress=False, device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.scaling_factor > 0
    assert json.loads((out / "training" / "timings.json").read_text())["device"] == "cpu"
    with pytest.raises(DyodError, match="not empty; pass --resume"):
        pretrain(tmp_path / "prior", config, progress=False, device="cpu")
    assert pretrain(tmp_path / "prior", config, resume=True, progress=False, device="cpu") == out
    # from the command line, --resume takes the settings the pre-training started with for the flags not given (it
    # took the defaults: a 30,000-scene corpus and other widths than the checkpoint's)
    from dyod.cli import main

    assert main(["reference", "pretrain", "--out", str(out), "--resume", "--unet-steps", "4", "--device", "cpu"]) == 0
    recorded = json.loads((out / "training" / "pretrain_config.json").read_text())
    assert recorded == {**json.loads(json.dumps(dataclasses.asdict(config))), "unet_steps": 4}


TINY = dict(corpus_size=64, vae_steps=4, vae_batch_size=4, unet_steps=5, unet_batch_size=4, vocab_size=600,
            text_width=32, text_layers=1, vae_channels=(32, 32, 32), unet_channels=(32, 32, 32), probe_every=0,
            decoder_steps=0, text_encoder_steps=0)


def _interrupt_on_call(monkeypatch, module, name, call):
    """SIGINT while ``module.name`` runs for the ``call``-th time (the step in progress then finishes)."""
    import os
    import signal

    original, calls = getattr(module, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)


def _stopped_at_step(monkeypatch, module, name: str, call: int, out, config, state: str, resume: bool = False) -> str:
    """Pre-train into ``out`` with SIGINT during the ``call``-th call of ``module.name``; the step ``state`` holds."""
    from safetensors import safe_open

    from dyod.world.prior_training import pretrain

    with monkeypatch.context() as m:
        _interrupt_on_call(m, module, name, call)
        with pytest.raises(KeyboardInterrupt):
            pretrain(out, config, resume=resume, progress=False, device="cpu")
    with safe_open(str(out / "training" / state), "pt") as f:
        return f.metadata()["step"]


def _assert_same_weights(a_folder, b_folder, components) -> None:
    from safetensors.torch import load_file

    for component in components:
        file = "model" if component == "text_encoder" else "diffusion_pytorch_model"
        a = load_file(str(a_folder / component / f"{file}.safetensors"))
        b = load_file(str(b_folder / component / f"{file}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component


@pytest.mark.slow
def test_pretraining_stopped_in_each_stage_and_resumed_gives_the_uninterrupted_prior(tmp_path, monkeypatch,
                                                                                   ctrl_c_raises):
    """Ctrl-C in the autoencoder's stage, then in the UNet's: the step in progress finishes and its state is written
    (EMA weights and all), and --resume ends with the very weights of a run never stopped."""
    from dyod.world import prior_training
    from dyod.world.prior_training import PretrainConfig, pretrain

    config = PretrainConfig(**TINY, checkpoint_every=100, ema_decay=0.9)
    whole = pretrain(tmp_path / "whole", config, progress=False, device="cpu")
    stopped = tmp_path / "stopped"
    # render_scenes: call 1 renders the corpus, call k + 1 the autoencoder's step k
    assert _stopped_at_step(monkeypatch, prior_training, "render_scenes", 3, stopped, config,
                            "vae_state.safetensors") == "2"
    assert not (stopped / "vae").exists()
    # clip_grad_norm_: the UNet loop's alone (no contrastive stage in TINY)
    assert _stopped_at_step(monkeypatch, torch.nn.utils, "clip_grad_norm_", 3, stopped, config,
                            "unet_state.safetensors", resume=True) == "3"
    resumed = pretrain(stopped, config, resume=True, progress=False, device="cpu")
    _assert_same_weights(whole, resumed, ("vae", "unet", "text_encoder"))
    assert len(json.loads((resumed / "training" / "unet_losses.json").read_text())) == 5
    assert len(json.loads((resumed / "training" / "vae_losses.json").read_text())) == 4


@pytest.mark.slow
def test_the_saved_weights_are_the_exponential_average_of_the_trained_ones(tmp_path):
    """With EMA the UNet saved is not the last step's: pre-training without it (decay 0) differs, and the decay's
    warm-up is diffusers' EMAModel's."""
    from safetensors.torch import load_file

    from dyod.world.prior_training import PretrainConfig, ema_of, pretrain

    plain = pretrain(tmp_path / "plain", PretrainConfig(**TINY, ema_decay=0.0), progress=False, device="cpu")
    averaged = pretrain(tmp_path / "ema", PretrainConfig(**TINY, ema_decay=0.999), progress=False, device="cpu")
    a = load_file(str(plain / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(averaged / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ema_of([p], 0.999)
    for n in range(1, 4):  # EMAModel: the first step copies, then decay (1 + n) / (10 + n)
        with torch.no_grad():
            p.add_(1.0)
        before = ema.shadow_params[0].clone()
        ema.step([p])
        decay = 0.0 if n == 1 else min(0.999, n / (9 + n))
        assert torch.allclose(ema.shadow_params[0], decay * before + (1 - decay) * p.detach())


def test_min_snr_weights_are_diffusers_training_recipe():
    """Min-SNR-γ as diffusers' train_text_to_image computes it for ε-prediction: min(SNR, γ) / SNR."""
    from diffusers import DDIMScheduler
    from diffusers.training_utils import compute_snr

    from dyod.world.prior_training import ddim_config, min_snr_weights

    scheduler = DDIMScheduler(**ddim_config())
    t = torch.arange(0, 1000, 7)
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    got = min_snr_weights(scheduler.alphas_cumprod, t, 5.0)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert got[0] < 0.01 and got[-1] == 1.0  # the easy, nearly clean steps count less; the noisy ones fully
    assert torch.equal(min_snr_weights(scheduler.alphas_cumprod, t, 0.0), torch.ones(len(t)))


def test_the_concept_set_takes_an_even_share_of_every_group_and_the_autoencoder_sees_all_emoji():
    from dyod.config import PretrainConfig
    from dyod.world.atlas import EmojiAtlas
    from dyod.world.concepts import atlas_corpus, concept_corpus, concept_set, heldout_corpora, unet_corpus

    atlas = EmojiAtlas.bundled()
    concepts = concept_set(atlas, 4)
    assert len(concepts) >= 300
    codepoints = [int(e["codepoint"][2:], 16) for e in atlas.entries]
    assert codepoints == sorted(codepoints)  # the rule's premise: code-point order, groups in contiguous runs
    groups = {"faces": (0x1F600, 0x1F64F), "people and body": (0x1F466, 0x1F487), "animals": (0x1F400, 0x1F43F),
              "food": (0x1F32D, 0x1F37F), "travel": (0x1F680, 0x1F6FF), "activities": (0x1F3A0, 0x1F3CF),
              "objects": (0x1F4A0, 0x1F4FF), "symbols": (0x2600, 0x27BF)}
    chosen = set(concepts)
    for name, (low, high) in groups.items():
        members = [i for i, c in enumerate(codepoints) if low <= c <= high]
        share = sum(i in chosen for i in members) / len(members)
        assert len(members) >= 20 and 0.2 <= share <= 0.3, (name, len(members), share)
    config = PretrainConfig()
    drawn = lambda gen: {p.emoji for i in range(400) for p in gen.scene(i).placements}  # noqa: E731
    assert drawn(concept_corpus(config)) <= chosen
    heldout = heldout_corpora(config)
    assert drawn(heldout["in_set"]) <= chosen and not drawn(heldout["out_of_set"]) & chosen
    everything = drawn(atlas_corpus(config))
    assert len(everything - chosen) > 2 * len(everything & chosen)  # all emoji, mostly outside the concept set
    # the UNet sees emoji of every kind, a share ``unnamed_share`` of its sprites from outside the concept set, but its
    # captions name the concept set alone
    scenes = list(map(unet_corpus(config).scene, range(400)))
    placements = [p for scene in scenes for p in scene.placements]
    outside = [p.emoji not in chosen for p in placements]
    assert abs(sum(outside) / len(placements) - config.unnamed_share) < 0.05
    assert len({p.emoji for p, out in zip(placements, outside) if out}) > 100
    for scene in scenes:
        assert f" {scene.caption} ".count(" icon ") == sum(p.emoji not in chosen for p in scene.placements)


def test_a_folder_of_fp16_variant_weights_loads(tmp_path, tiny_model):
    """A download of a model's fp16 variant holds only `*.fp16.safetensors` files, which from_pretrained finds only
    when told the variant: dyod tells it, and loads the fp16 numbers (in the dtype asked for)."""
    import shutil

    folder = tmp_path / "tiny-fp16"
    shutil.copytree(tiny_model, folder)
    original = load_prior(tiny_model)
    for component in ("text_encoder", "unet", "vae"):
        for f in (folder / component).glob("*.safetensors"):
            f.unlink()
        getattr(original, component).half().save_pretrained(folder / component, variant="fp16")
    assert sorted(p.name for p in (folder / "unet").glob("*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"]
    prior = load_prior(folder)
    assert prior.unet.dtype == torch.float32
    for component in ("text_encoder", "unet", "vae"):
        for (name, a), b in zip(getattr(original, component).state_dict().items(),
                                getattr(prior, component).state_dict().values()):
            assert torch.equal(a.float(), b), (component, name)
    with pytest.raises(DyodError, match="could not load the diffusers model"):  # weights missing: still explained
        for f in (folder / "vae").glob("*.safetensors"):
            f.unlink()
        load_prior(folder)


def test_pickled_model_weights_are_refused_with_the_way_out(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "tiny-bin"
    shutil.copytree(tiny_model, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    load_prior(tiny_model).unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert [p.suffix for p in (folder / "unet").iterdir() if p.suffix != ".json"] == [".bin"]
    with pytest.raises(DyodError, match=r"unet/ hold only pickled weights \(.bin\), which dyod does not load .*"
                                        r"save_pretrained"):
        load_prior(folder)


def test_a_single_file_checkpoint_is_refused_with_the_way_to_convert_it(tmp_path):
    """The one-file SD checkpoints many share (`v1-5-pruned-emaonly.safetensors`): before, "... is not a folder"."""
    for name in ("v1-5-pruned-emaonly.safetensors", "model.ckpt"):
        (tmp_path / name).write_bytes(b"weights")
        with pytest.raises(DyodError, match=rf"{name} is a single-file checkpoint, not a diffusers folder; convert it "
                                            r"once with diffusers \(`StableDiffusionPipeline\.from_single_file"):
            load_prior(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DyodError, match=r"notes\.txt is not a folder"):
        load_prior(tmp_path / "notes.txt")


@pytest.mark.parametrize("change, reason", [
    ({"in_channels": 9}, "takes 9 input channels where its VAE gives 4"),  # an inpainting model
    ({"addition_embed_type": "text_time"}, "takes conditioning besides the text's hidden states ('text_time': e.g. SDXL"),
    ({"cross_attention_dim": 64}, "attends to 64-wide text states, its text_encoder/ gives 32"),
])
def test_models_that_are_not_text_to_image_sd_are_refused_before_their_weights_load(tmp_path, tiny_model, change,
                                                                                     reason):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # would fail to load: never read
    with pytest.raises(DyodError, match=f"is not a text-to-image model dyod can run: its UNet {re.escape(reason)}"):
        load_prior(folder)


def test_loading_a_local_model_draws_no_transformers_bar_and_leaves_the_users_setting(tiny_model, capfd):
    """transformers 5 drew "Loading weights: 100%|…| 68/68" on every dyod command, between dyod's own bars."""
    from transformers import CLIPTextModel
    from transformers.utils import logging as transformers_logging

    initial = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")  # the check can fail: transformers' own load
    assert "Loading weights" in capfd.readouterr().err
    for enabled in (True, False):  # the user's own setting (HF_HUB_DISABLE_PROGRESS_BARS, or the call) is kept
        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
        load_prior(tiny_model)
        assert "Loading weights" not in capfd.readouterr().err
        assert transformers_logging.is_progress_bar_enabled() is enabled
    (transformers_logging.enable_progress_bar if initial else transformers_logging.disable_progress_bar)()


def test_the_model_cards_table_says_which_targets_are_met():
    from dyod.world.prior_card import markdown_rows, property_rows

    props = {
        "autoencoder": {"n": 400, "floor": {"apple-orange": {"kid_x100": 12.0}, "faces": {"kid_x100": 3.0},
                                            "fruit-stack": {"kid_x100": 16.0}},
                        "heldout": {"in_set": {"mse": 0.004, "kid_x100": 2.0}, "out_of_set": {"mse": 0.006, "kid_x100": 9.0}}},
        "text_following": {"n_captions": 200, "concept_set_size": 339, "top1": 0.35, "top5": 0.55},
        "wall_time_min": 140.0, "hardware": "cpu (2 threads)",
    }
    rows = {r[0].split(",")[0].split(" (")[0]: r for r in property_rows(props, [])}
    floor = next(r for k, r in rows.items() if k.startswith("autoencoder floor"))
    assert floor[1] == "12.0 / 3.0 / 16.0" and not floor[3]  # one dataset above 15
    mse = next(r for k, r in rows.items() if k.startswith("held-out scenes"))
    assert "×1.50" in mse[1] and mse[3]
    kid = rows["the same"]
    assert not kid[3] and "×4.50" in kid[1]  # 9.0 is more than twice 2.0
    text = next(r for k, r in rows.items() if k.startswith("text following"))
    assert text[1] == "35% / 55%" and not text[3]  # top-5 short of 60 %
    assert rows["pre-training wall time"][3]
    summary = [{"dataset": "apple-orange", "beats_both": True}, {"dataset": "faces", "beats_both": False}]
    last = property_rows(props, summary)[-1]
    assert last[1] == "1 of 2 (apple-orange)" and not last[3]
    table = markdown_rows(property_rows(props, summary))
    assert table[0] == "| property | measured | target | met |" and len(table) == 2 + 6


@pytest.mark.slow
def test_the_decoder_refinement_keeps_the_latent_space_and_the_unet(tmp_path):
    """Stage 5 trains the autoencoder's decoder alone (with the PatchGAN term): the encoder, hence every latent the UNet
    learned from, and the UNet itself are those of the same pre-training without it, bit for bit."""
    from safetensors.torch import load_file

    from dyod.world.prior_training import PretrainConfig, pretrain

    plain = pretrain(tmp_path / "plain", PretrainConfig(**TINY), progress=False, device="cpu")
    refined = pretrain(tmp_path / "refined", PretrainConfig(**{**TINY, "decoder_steps": 3, "probe_every": 2,
                                                                 "adversarial_weight": 0.5,
                                                                 "decoder_extra_layers": 1}),
                       progress=False, device="cpu")
    a = load_file(str(plain / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(refined / "vae" / "diffusion_pytorch_model.safetensors"))
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert any(not torch.equal(a[k].half(), b[k]) for k in decoder)
    # the decoder grew by one identity-initialised resnet a level, stored in float16; the
    # encoder's grown resnets stay identities, so every latent is the plain prior's, bit for bit
    assert {b[k].dtype for k in b if k.startswith(("decoder.", "post_quant_conv."))} == {torch.float16}
    assert {b[k].dtype for k in b if k.startswith(("encoder.", "quant_conv."))} == {torch.float32}
    grown = [k for k in b if k.startswith("encoder.") and k not in a]
    assert grown and all(not b[k].any() for k in grown if ".conv2." in k)
    vae_plain, vae_refined = (AutoencoderKL.from_pretrained(p / "vae").eval() for p in (plain, refined))
    assert (vae_plain.config.layers_per_block, vae_refined.config.layers_per_block) == (1, 2)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae_plain.encode(x).latent_dist.mean, vae_refined.encode(x).latent_dist.mean)
    u, v = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (plain, refined))
    assert all(torch.equal(u[k], v[k]) for k in u)
    probes = json.loads((refined / "training" / "probes.json").read_text())
    assert [p["step"] for p in probes if p["stage"] == "decoder"] == [2, 3]
    floors = {"floor_apple-orange", "floor_faces", "floor_fruit-stack"}
    assert all(floors <= p.keys() and all(np.isfinite(p[k]) for k in floors)
               for p in probes if p["stage"] in ("vae", "decoder"))
    assert "decoder_s" in json.loads((refined / "training" / "timings.json").read_text())


def test_the_training_curves_plot_the_floor_where_it_was_probed(tmp_path):
    """A prior whose stages probed the floor gets a fifth panel for it; one made before (the bundled prior) keeps four."""
    from PIL import Image

    from dyod.world.prior_card import plot_training

    widths = {}
    for name, floor in (("before", {}), ("probed", {"floor_faces": 7.0, "floor_apple-orange": -0.1})):
        (tmp_path / name / "training").mkdir(parents=True)
        probes = [{"stage": stage, "step": step, "seconds": 60.0 * step, "mse_in_set": 0.02, "mse_out_of_set": 0.02,
                   **floor} for stage in ("vae", "decoder") for step in (1, 2)]
        (tmp_path / name / "training" / "probes.json").write_text(json.dumps(probes))
        widths[name] = Image.open(plot_training(tmp_path / name)).size[0]
    assert widths["probed"] == pytest.approx(widths["before"] * 5 / 4, rel=0.02)


@pytest.mark.slow
def test_the_floor_probe_measures_the_floor_as_the_model_card_does():
    """Stages 2 and 5 probe the autoencoder floor with the images and the KID of benchmarks/prior_properties.py: over
    the same n images, the same figure (the card's KID subsets are then every image, in another order)."""
    from dyod.world.datasets import DATASETS
    from dyod.world.prior_card import autoencoder_properties
    from dyod.world.prior_training import FloorProbe

    model = bundled_prior_path()
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    probed = FloorProbe(12)(vae, "cpu")
    card = autoencoder_properties(model, n=12)["floor"]
    assert probed.keys() == {f"floor_{name}" for name in DATASETS}
    for name in DATASETS:
        assert probed[f"floor_{name}"] == pytest.approx(card[name]["kid_x100"], abs=0.006)
    assert max(probed.values()) > 1.0  # the bundled prior's floor is not zero: the probe can tell


@pytest.mark.slow
def test_a_resume_with_decoder_steps_refines_a_finished_prior_without_its_unet_training_state(tmp_path, monkeypatch):
    """The bundled prior is committed without its training states: `--resume --decoder-steps N` on a copy of it goes
    straight to stage 5 (no corpus encoding, no UNet step) and refines exactly as the same run in one go."""
    from safetensors.torch import load_file

    from dyod.world import prior_training
    from dyod.world.prior_training import PretrainConfig, pretrain

    refine = {**TINY, "decoder_steps": 3}
    in_one_go = pretrain(tmp_path / "one-go", PretrainConfig(**refine), progress=False, device="cpu")
    finished = pretrain(tmp_path / "finished", PretrainConfig(**TINY), progress=False, device="cpu")
    (finished / "training" / "unet_state.safetensors").unlink()
    monkeypatch.setattr(prior_training, "encode_corpus", lambda *a, **k: pytest.fail("the corpus was encoded again"))
    monkeypatch.setattr(prior_training, "train_unet", lambda *a, **k: pytest.fail("the UNet stage ran again"))
    pretrain(finished, PretrainConfig(**refine), resume=True, progress=False, device="cpu")
    for part in ("vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(in_one_go / part)), load_file(str(finished / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_deepening_the_autoencoder_keeps_its_function_bit_for_bit():
    """AutoencoderKL ties the decoder's depth to the encoder's; the grown resnets start as identities, so the deeper
    autoencoder encodes and decodes exactly as before, and the decoder's new layers then learn (their gradient is not
    zero)."""
    from dyod.world.prior_training import deepen_autoencoder

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    deeper = deepen_autoencoder(vae, 2, seed=1).eval()
    assert [len(b.resnets) for b in deeper.encoder.down_blocks] == [3, 3]
    assert [len(b.resnets) for b in deeper.decoder.up_blocks] == [4, 4]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist
        z2 = deeper.encode(x).latent_dist
        assert torch.equal(z.mean, z2.mean) and torch.equal(z.logvar, z2.logvar)
        assert torch.equal(vae.decode(z.mean).sample, deeper.decode(z.mean).sample)
    deeper.decode(z.mean).sample.square().mean().backward()
    assert deeper.decoder.up_blocks[0].resnets[3].conv2.weight.grad.abs().sum() > 0
    assert deepen_autoencoder(vae, 0) is vae


@pytest.mark.parametrize("groups", [32, 8])
def test_widening_the_autoencoder_keeps_its_function_and_lets_the_copies_learn_apart(groups):
    """Net2WiderNet on AutoencoderKL: twice the channels on every level, 1 × 1 shortcuts and mid-block attention
    included, encode and decode as before up to float rounding, whether a GroupNorm group holds one channel or
    several; the decoder's copies of a channel read the next layer with different shares, so one step's gradient
    already tells them apart (with equal shares it cannot)."""
    from dyod.world.prior_training import widen_autoencoder

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32,
                        norm_num_groups=groups,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    for block in list(vae.encoder.down_blocks) + list(vae.decoder.up_blocks):  # GroupNorm's default affine is trivial
        for resnet in block.resnets:
            for norm in (resnet.norm1, resnet.norm2):
                torch.nn.init.normal_(norm.weight, 1.0, 0.3), torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    wide = widen_autoencoder(vae, (64, 128), seed=1).eval()
    assert list(wide.config.block_out_channels) == [64, 128]
    assert wide.decoder.up_blocks[1].resnets[0].conv_shortcut is not None  # 128 -> 64, as 64 -> 32 was
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z, z2 = vae.encode(x).latent_dist, wide.encode(x).latent_dist
        torch.testing.assert_close(z2.mean, z.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(z2.logvar, z.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(wide.decode(z.mean).sample, vae.decode(z.mean).sample, rtol=0, atol=1e-5)
        assert (wide.decode(z.mean).sample - vae.decode(z.mean).sample).abs().max() < \
            1e-3 * vae.decode(z.mean).sample.abs().max()

    def copy_gradients(model):
        model.zero_grad()
        model.decode(z.mean).sample.square().mean().backward()
        grad = model.decoder.up_blocks[0].resnets[0].conv1.weight.grad  # output channels 2k and 2k + 1 are copies
        return grad[0::2], grad[1::2]

    a, b = copy_gradients(widen_autoencoder(vae, (64, 128), seed=1, split=0.0))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    a, b = copy_gradients(wide)
    assert (a - b).abs().max() > 0.05 * a.abs().max()
    assert widen_autoencoder(vae, (32, 64)) is vae
    three = widen_autoencoder(vae, (96, 64), seed=1).eval()  # the finest level alone, three copies a channel
    with torch.no_grad():
        torch.testing.assert_close(three.encode(x).latent_dist.mean, z.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(three.decode(z.mean).sample, vae.decode(z.mean).sample, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="48 64 must give each of the 2 levels a multiple of its channels 32 64"):
        widen_autoencoder(vae, (48, 64))
    with pytest.raises(ValueError, match="shortcut between levels 0 and 1"):
        widen_autoencoder(vae, (64, 64))


def test_encoding_and_reconstructing_in_small_batches_gives_what_one_batch_gives():
    """The corpus is encoded (and the probes reconstruct) a few images at a time for speed: every image's posterior
    and reconstruction must be the same as with all images in one batch."""
    from dyod.world.prior_training import encode_corpus, reconstruct

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    small, whole = encode_corpus(vae, images, "cpu", False, batch_size=3), encode_corpus(vae, images, "cpu", False, 7)
    for a, b in zip(small, whole):
        assert a.shape == (7, 4, 8, 8)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reconstruct(vae, images, "cpu", batch_size=3), reconstruct(vae, images, "cpu", 7),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_widened_decoder_refinement_keeps_the_latents_the_unet_learned(tmp_path):
    """--decoder-widths 64 64 64 (of 32 32 32): the saved autoencoder is twice as wide on every level, and its encoder
    gives the latents of the same pre-training without the refinement (up to float rounding), so the UNet's stay
    valid."""
    from dyod.world.prior_training import PretrainConfig, pretrain

    plain = pretrain(tmp_path / "plain", PretrainConfig(**TINY), progress=False, device="cpu")
    wide = pretrain(tmp_path / "wide", PretrainConfig(**{**TINY, "decoder_steps": 2, "decoder_widths": (64, 64, 64)}),
                    progress=False, device="cpu")
    vae_plain, vae_wide = (AutoencoderKL.from_pretrained(p / "vae").eval() for p in (plain, wide))
    assert list(vae_wide.config.block_out_channels) == [2 * c for c in vae_plain.config.block_out_channels]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae_wide.encode(x).latent_dist.mean, vae_plain.encode(x).latent_dist.mean,
                                   rtol=0, atol=1e-5)
    assert json.loads((wide / "training" / "pretrain_config.json").read_text())["decoder_widths"] == [64, 64, 64]
    with pytest.raises(DyodError, match="--decoder-widths 96 96 96 must give each of the 3 levels a multiple of its "
                                        "channels 64 64 64: .* already widened; resume with the widths"):
        pretrain(wide, PretrainConfig(**{**TINY, "decoder_steps": 3, "decoder_widths": (96, 96, 96)}), resume=True,
                 progress=False, device="cpu")


@pytest.mark.slow
def test_a_decoder_state_of_another_depth_is_refused_with_the_way_out(tmp_path):
    from dyod.world.prior_training import PretrainConfig, pretrain

    config = {**TINY, "decoder_steps": 2, "decoder_extra_layers": 0}
    out = pretrain(tmp_path / "prior", PretrainConfig(**config), progress=False, device="cpu")
    state = out / "training" / "decoder_state.safetensors"
    assert state.exists()
    with pytest.raises(DyodError, match="another depth or width than --decoder-extra-layers 1 and --decoder-widths "
                                        "make.*delete that file"):
        pretrain(out, PretrainConfig(**{**config, "decoder_steps": 3, "decoder_extra_layers": 1}), resume=True,
                 progress=False, device="cpu")


def test_decoder_widths_are_refused_when_the_config_is_made_not_after_hours_of_training():
    from dyod.world.prior_training import PretrainConfig

    with pytest.raises(ValueError, match="--decoder-widths 64 64 must give each of the 3 levels"):
        PretrainConfig(decoder_widths=(64, 64))
    with pytest.raises(ValueError, match="--decoder-widths 64 64 128 would add or remove a shortcut between levels 0 "
                                         "and 1 of 32 64 128"):
        PretrainConfig(decoder_widths=(64, 64, 128))
    assert PretrainConfig(decoder_widths=(96, 64, 128)).decoder_widths == (96, 64, 128)


def test_the_autoencoders_norm_groups_follow_the_config_and_must_divide_its_channels():
    """--vae-norm-groups sets every GroupNorm of the autoencoder and is recorded in its config (at the bundled 32, the
    32-channel level normalizes each channel alone); channels it does not divide are refused naming both flags."""
    from dyod.world.prior_training import PretrainConfig, build_autoencoder

    for groups in (32, 8):
        vae = build_autoencoder(PretrainConfig(vae_norm_groups=groups))
        norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) > 10 and {m.num_groups for m in norms} == {groups}
        assert vae.config.norm_num_groups == groups
        assert min(m.num_channels // m.num_groups for m in norms) == 32 // groups
    with pytest.raises(ValueError, match=r"--vae-channels must each be a multiple of --vae-norm-groups \(24\), "
                                         "got 32 64 128"):
        PretrainConfig(vae_norm_groups=24)
    with pytest.raises(ValueError, match=r"--vae-channels .* \(16\), got 40"):
        PretrainConfig(vae_channels=(32, 40, 64), vae_norm_groups=16)


@pytest.mark.parametrize("folder", ["bundled", "prior-next"])
def test_a_recorded_pretraining_config_rebuilds_the_autoencoder_it_made(folder):
    """--resume takes the flags not given from training/pretrain_config.json, so the config recorded next to a prior
    (the bundled one, or the next one's finished stages in prior-next/) must name the autoencoder it holds."""
    from dyod.prior import bundled_prior_path
    from dyod.world.prior_card import recorded_pretrain_config
    from dyod.world.prior_training import build_autoencoder

    path = bundled_prior_path() if folder == "bundled" else Path(__file__).parents[1] / folder
    built = build_autoencoder(recorded_pretrain_config(path)).config
    saved = json.loads((path / "vae" / "config.json").read_text())
    for key in ("block_out_channels", "norm_num_groups", "layers_per_block", "latent_channels", "sample_size"):
        assert list(np.atleast_1d(built[key])) == list(np.atleast_1d(saved[key])), key


def test_decoder_and_corpus_sizes_must_be_two_sides_in_the_canvas():
    from dyod.world.prior_training import PretrainConfig

    for flag in ("decoder_sizes", "corpus_sizes"):
        assert getattr(PretrainConfig(**{flag: ()}), flag) == ()
        for bad in ((12,), (30, 20), (0, 10), (12, 80)):
            with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be two sides LOW HIGH"):
                PretrainConfig(**{flag: bad})
    with pytest.raises(ValueError, match=r"--unnamed-share must be in \[0, 1\]"):
        PretrainConfig(unnamed_share=1.5)
    with pytest.raises(ValueError, match="--probe-floor-images must be 0 .* or at least 2"):
        PretrainConfig(probe_floor_images=1)


def _tiny_text_encoder(width: int = 32, vocab: int = 50, eos: int = 49):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=48, eos_token_id=eos, pad_token_id=eos)).eval()


def test_trimming_the_padding_changes_none_of_the_outputs_kept():
    """The contrastive stage cuts each batch after its last end-of-text token: CLIP's causal mask makes every kept
    position's output, and the pooled one, the same as over the padded 16 tokens."""
    from dyod.world.prior_training import trim_padding

    encoder = _tiny_text_encoder()
    ids = torch.full((3, 16), 49)
    ids[:, 0] = 48
    ids[0, 1:4], ids[1, 1:7], ids[2, 1:2] = torch.tensor([5, 6, 7]), torch.arange(10, 16), torch.tensor([3])
    trimmed = trim_padding(ids, 49)
    assert trimmed.shape == (3, 8)  # the longest caption: start, 6 tokens, end
    with torch.no_grad():
        full, cut = encoder(ids), encoder(trimmed)
    torch.testing.assert_close(cut.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut.last_hidden_state, full.last_hidden_state[:, :8], rtol=1e-5, atol=1e-6)


def test_the_autoencoders_kl_is_weighed_against_the_image_as_latent_diffusion_weighs_it():
    """LDM sums the reconstruction over each image and the KL over each latent: against the mean reconstruction the KL
    is then divided by an image's values, so that --vae-kl-weight 1e-6 is SD's weight at every image size."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from dyod.world.prior_training import kl_per_pixel_value, reconstruction_loss

    gen = torch.Generator().manual_seed(0)
    for side in (16, 32):
        x, recon = (torch.rand(3, 3, side, side, generator=gen) * 2 - 1 for _ in range(2))
        mean, logvar = torch.randn(3, 4, side // 4, side // 4, generator=gen), torch.randn(3, 4, side // 4, side // 4,
                                                                                           generator=gen)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)
        ldm = (((recon - x).abs() + (recon - x) ** 2).sum() + 1e-6 * kl.sum()) / len(x)  # contperceptual.py's sums
        ours = reconstruction_loss(recon, x) + 1e-6 * kl_per_pixel_value(posterior, x)
        torch.testing.assert_close(ours * 3 * side * side, ldm)


def test_clip_loss_is_clips_symmetric_cross_entropy():
    import transformers.models.clip.modeling_clip as clip

    from dyod.world.prior_training import clip_loss

    reference = getattr(clip, "clip_loss", None) or clip.image_text_contrastive_loss
    similarity = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(clip_loss(similarity), reference(similarity))
    assert float(clip_loss(torch.eye(6) * 100)) < 1e-6  # each caption's own image, far above the rest


@pytest.mark.slow
def test_the_contrastive_stage_learns_which_latent_a_caption_names(tmp_path):
    """Eight captions, each with its own latent pattern (plus the posterior's noise): after the stage, a caption finds
    its own latent among the eight far above chance (1 / 8), and its loss fell."""
    from dyod.world.prior_training import (ContrastiveHeads, PretrainConfig, Probes, pretrain_text_encoder,
                                           retrieval_accuracy)

    class Tokenizer:
        eos_token_id, bos_token_id, pad_token_id = 49, 48, 49

        def __len__(self):
            return 50

    g = torch.Generator().manual_seed(0)
    ids = torch.full((8, 8), 49)
    ids[:, 0] = 48
    ids[:, 1:4] = torch.randint(0, 48, (8, 3), generator=g)
    patterns = torch.randn(8, 4, 16, 16, generator=g)
    config = PretrainConfig(text_width=32, text_layers=1, max_length=8, text_encoder_steps=60,
                            text_encoder_batch_size=8, text_encoder_learning_rate=3e-3, probe_every=60)
    (tmp_path / "training").mkdir()
    probes = Probes(tmp_path / "training" / "probes.json")
    encoder, losses, _ = pretrain_text_encoder(config, tmp_path, Tokenizer(), (patterns, torch.full_like(patterns, 0.1)),
                                               ids, (ids, patterns), "cpu", False, False, probes)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert probes.records[-1]["stage"] == "text_encoder" and probes.records[-1]["heldout_retrieval_top1"] >= 0.75
    untrained = ContrastiveHeads(32)
    assert retrieval_accuracy(untrained, encoder, ids, patterns) < 1.0  # the probe can fail: fresh heads do not match


@pytest.mark.slow
def test_with_a_contrastive_text_encoder_the_unet_trains_with_it_frozen_and_resumes(tmp_path, monkeypatch,
                                                                                    ctrl_c_raises):
    """--text-encoder-steps: the text encoder saved with the pipeline is the contrastive stage's, untouched by the
    UNet's steps; Ctrl-C in the stage and --resume give the weights of a run never stopped."""
    from safetensors.torch import load_file

    from dyod.world import prior_training
    from dyod.world.prior_training import PretrainConfig, pretrain

    config = PretrainConfig(**{**TINY, "text_encoder_steps": 4, "text_encoder_batch_size": 8})
    whole = pretrain(tmp_path / "whole", config, progress=False, device="cpu")
    saved = load_file(str(whole / "text_encoder" / "model.safetensors"))
    state = load_file(str(whole / "training" / "text_encoder_state.safetensors"))
    assert saved.keys() and all(torch.equal(saved[k], state[f"text_encoder.{k}"]) for k in saved)
    joint = load_file(str(pretrain(tmp_path / "joint", PretrainConfig(**TINY), progress=False, device="cpu")
                          / "text_encoder" / "model.safetensors"))
    assert any(not torch.equal(saved[k], joint[k]) for k in saved)
    assert "text_encoder_s" in json.loads((whole / "training" / "timings.json").read_text())
    assert _stopped_at_step(monkeypatch, prior_training, "clip_loss", 2, tmp_path / "stopped", config,
                            "text_encoder_state.safetensors") == "2"
    resumed = pretrain(tmp_path / "stopped", config, resume=True, progress=False, device="cpu")
    _assert_same_weights(whole, resumed, ("unet", "text_encoder"))
