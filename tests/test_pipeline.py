"""DYOD sampling on a fitted run, against diffusers' own pipelines on the same latents and noise."""

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

import dyod
from dyod import SampleConfig
from dyod.data import pil_to_tensor
from dyod.errors import DyodError
from dyod.pipeline import DyodPipeline

CONFIG = SampleConfig(num_inference_steps=20, guidance_scale=7.5, batch_size=8)


@pytest.fixture(scope="module")
def pipe(fitted_run):
    return DyodPipeline.from_run(fitted_run, device="cpu")


def diffusers_pipeline(cls, model, run):
    p = cls.from_pretrained(model, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)  # the paper's sampler
    p.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    p.set_progress_bar_config(disable=True)
    return p


def prompt_embeds(pipe, img2img, n):
    """The [uncond; cond] text condition both sides use. diffusers encodes the prompts at batch n and dyod at batch 1:
    CPU matrix products round differently at different batch sizes, and 14 guided steps of a random tiny UNet
    amplify a 1-ulp difference to 1e-3. The same embeddings on both sides isolate the sampler."""
    ours = pipe.denoiser(CONFIG)
    diffusers_cond = img2img.encode_prompt("a photo of <dyod>", "cpu", 1, False)[0]
    torch.testing.assert_close(ours.cond, diffusers_cond, rtol=1e-5, atol=1e-5)  # S* loads into diffusers the same
    return {"prompt_embeds": ours.cond.expand(n, -1, -1), "negative_prompt_embeds": ours.uncond.expand(n, -1, -1)}


def test_t0_path_matches_diffusers_img2img(pipe, tiny_model, fitted_run):
    img2img = diffusers_pipeline(StableDiffusionImg2ImgPipeline, tiny_model, fitted_run)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    # 0.7·20 = 14 exactly, so img2img's truncation and dyod's rounding agree here.
    expected = img2img(
        **prompt_embeds(pipe, img2img, 2), image=init, strength=0.7, num_inference_steps=20, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(9), output_type="latent",
    ).images
    noise = randn_tensor(init.shape, generator=torch.Generator().manual_seed(9))
    ours = pipe.denoise_from(init, noise, 0.7, CONFIG)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert pipe.last_unet_calls == 14


def test_t0_one_equals_text_to_image(pipe, tiny_model, fitted_run):
    txt2img = diffusers_pipeline(StableDiffusionPipeline, tiny_model, fitted_run)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = txt2img(**prompt_embeds(pipe, txt2img, 2), latents=noise.clone(), num_inference_steps=20,
                       guidance_scale=7.5, output_type="latent").images
    ours = pipe.denoise_from(None, noise, 1.0, CONFIG)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert pipe.last_unet_calls == 20


def test_a_grayscale_run_gives_grayscale_images(fitted_run, tmp_path):
    """A run fitted with --grayscale: every output (samples, transforms, the VAE alone) is its colour output read as
    the dataset was read (PIL's L, kept as 3 channels); a colour run's outputs are left as they are."""
    import json
    import shutil

    run = tmp_path / "gray"
    shutil.copytree(fitted_run, run)
    info = json.loads((run / "run.json").read_text())
    info["data_config"]["grayscale"] = True
    (run / "run.json").write_text(json.dumps(info))
    colour, gray = DyodPipeline.from_run(fitted_run, device="cpu"), DyodPipeline.from_run(run, device="cpu")
    assert not colour.grayscale and gray.grayscale
    config = SampleConfig(t0=0.6, num_inference_steps=10)
    made = {"sample": lambda p: p.sample(2, config, progress=False), "VAE alone": lambda p: p.vae_samples([0, 1]),
            "transform": lambda p: p.transform(colour.vae_samples([5]), config, progress=False)}
    for what, make in made.items():
        expected = [np.asarray(im.convert("L").convert("RGB")) for im in make(colour)]
        got = [np.asarray(im) for im in make(gray)]
        assert all(np.array_equal(g, e) for g, e in zip(got, expected)), what
    assert any(np.ptp(np.asarray(im).astype(int), axis=2).max() > 0 for im in colour.sample(2, config, progress=False))


def test_sample_is_batch_size_invariant_and_seeded(pipe):
    one = pipe.sample(3, SampleConfig(t0=0.6, num_inference_steps=10, batch_size=1), seed=4, progress=False)
    three = pipe.sample(3, SampleConfig(t0=0.6, num_inference_steps=10, batch_size=3), seed=4, progress=False)
    shifted = pipe.sample(2, SampleConfig(t0=0.6, num_inference_steps=10, batch_size=2), seed=5, progress=False)
    for a, b in zip(one, three):
        assert (pil_to_tensor([a]) - pil_to_tensor([b])).abs().max() <= 2 / 127.5  # at most 1 level of rounding
    for a, b in zip(one[1:], shifted):  # seed 5 is seed 5, wherever it sits in the batch
        assert (pil_to_tensor([a]) - pil_to_tensor([b])).abs().max() <= 2 / 127.5
    assert (pil_to_tensor([one[0]]) - pil_to_tensor([one[1]])).abs().max() > 0.05  # different seeds differ


def test_samples_come_a_batch_at_a_time_as_sample_makes_them(pipe):
    config = SampleConfig(t0=0.6, num_inference_steps=10, batch_size=2)
    batches = list(pipe.iter_samples(5, config, seed=4, progress=False))
    assert [len(b) for b in batches] == [2, 2, 1]
    whole = pipe.sample(5, config, seed=4, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(whole, [i for b in batches for i in b]))
    with pytest.raises(ValueError, match="t0 must be a fraction"):  # before any work: the config refuses it
        next(pipe.iter_samples(5, SampleConfig(t0=1.5), progress=False))


def test_transformed_inputs_come_a_batch_at_a_time_as_transform_makes_them(pipe, shapes):
    from dyod.data import load_image_folder

    inputs = load_image_folder(shapes, max_images=5).images
    config = SampleConfig(t0=0.5, num_inference_steps=10, batch_size=2)
    batches = list(pipe.iter_transform(inputs, config, seed=3, progress=False))
    assert [len(b) for b in batches] == [2, 2, 1]
    whole = pipe.transform(inputs, config, seed=3, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(whole, [i for b in batches for i in b]))
    with pytest.raises(DyodError, match="no input images"):  # at the call, before any work
        pipe.iter_transform([], config)


def test_fixed_noise_gives_identical_outputs(pipe):
    config = SampleConfig(t0=0.5, num_inference_steps=10)
    z = pipe.z([7, 7])
    noise = pipe.noise([11, 11])
    a, b = pipe.generate(z, noise, config)
    assert a.tobytes() == b.tobytes()
    c, d = pipe.generate(z, pipe.noise([11, 12]), config)
    assert c.tobytes() != d.tobytes()  # ε is the remaining randomness
    # interpolation endpoints with fixed ε are the plain samples of the two seeds' z under that ε (within one level
    # of 255: the frames run as a batch of 3, and on some CPUs (AVX2 alone) its kernels round otherwise than a batch
    # of 2's)
    frames = pipe.interpolate(7, 8, steps=3, config=config, fix_noise=True, noise_seed=11, progress=False)
    assert np.abs(np.asarray(frames[0], dtype=np.int16) - np.asarray(a, dtype=np.int16)).max() <= 1
    assert np.abs(np.asarray(frames[-1], dtype=np.int16) - np.asarray(a, dtype=np.int16)).max() > 1  # it can fail


def test_outputs_come_at_the_dataset_resolution_or_the_models_if_the_dataset_is_larger(pipe, fitted_run):
    """Lanczos down to the dataset's resolution (Eq. 10's last step); a dataset larger than the model (here 32 px
    against 16) gets the model's: upsampling adds pixels, not detail."""
    from dyod.data import lanczos_resize_tensor, tensor_to_pil

    assert dyod.Run.open(fitted_run).data_resolution == 32 and pipe.prior.resolution == 16
    config = SampleConfig(t0=0.5, num_inference_steps=4)
    assert pipe.output_resolution == 16 and pipe.sample(1, config, progress=False)[0].size == (16, 16)
    small = DyodPipeline(pipe.prior, pipe.token, pipe.num_vectors, pipe.custom_vae, output_resolution=8)
    z, noise = small.z([3]), small.noise([3])
    decoded = small.decode(small.denoise_from(small.encode(lanczos_resize_tensor(small.vae_images(z), 16).clamp(-1, 1)),
                                              noise, 0.5, config))
    made = small.generate(z, noise, config)
    assert made[0].size == (8, 8) and made[0].tobytes() == tensor_to_pil(lanczos_resize_tensor(decoded, 8))[0].tobytes()


def test_images_latents_are_their_posterior_means_and_start_interpolations_and_traversals(pipe, shapes):
    """`latents_of` reads an image as the VAE's training read its data and returns E_q[z | x]; given as the ends of an
    interpolation or the start of a traversal, a seed's own z gives exactly what the seed gives."""
    from dyod.data import pil_to_tensor, resize_lanczos

    image = Image.open(sorted(shapes.glob("*.png"))[0])
    vae = pipe.custom_vae
    with torch.no_grad():
        expected = vae.encode(pil_to_tensor([resize_lanczos(image.convert("RGB"), vae.resolution)]))[0]
    torch.testing.assert_close(pipe.latents_of([image]), expected, rtol=0, atol=0)
    assert pipe.latents_of([image.resize((97, 61))]).shape == (1, vae.latent_dim)  # cropped and resized as data are
    config = SampleConfig(t0=0.5, num_inference_steps=10)
    z = pipe.z([1, 2])
    by_seeds = pipe.interpolate(1, 2, steps=3, config=config, progress=False)
    by_ends = pipe.interpolate(1, 2, steps=3, config=config, progress=False, ends=(z[0], z[1]))
    assert [im.tobytes() for im in by_seeds] == [im.tobytes() for im in by_ends]
    by_seed = pipe.traverse(1, [0, 3], [-1.0, 1.0], config, progress=False)
    by_z = pipe.traverse(1, [0, 3], [-1.0, 1.0], config, progress=False, z=z[0])
    assert [im.tobytes() for im in by_seed] == [im.tobytes() for im in by_z]
    from_image = pipe.traverse(1, [0, 3], [-1.0, 1.0], config, progress=False, z=pipe.latents_of([image]))
    assert [im.tobytes() for im in from_image] != [im.tobytes() for im in by_seed]


def test_interpolation_and_traversal_shapes(pipe, fitted_run):
    frames = pipe.interpolate(1, 2, steps=4, config=SampleConfig(t0=0.5, num_inference_steps=10), progress=False)
    assert len(frames) == 4 and all(f.size == (pipe.output_resolution,) * 2 for f in frames)
    values = pipe.traverse(0, 3, [-2.0, 0.0, 2.0], SampleConfig(t0=0.5, num_inference_steps=10), progress=False)
    assert len(values) == 3 and values[0].tobytes() != values[2].tobytes()
    with pytest.raises(DyodError, match=r"^dim must be in \[0, "):
        pipe.traverse(0, 99, [0.0], SampleConfig(num_inference_steps=10), progress=False)



def test_manipulating_z_at_t0_one_warns_that_z_is_unused(pipe, caplog):
    config = SampleConfig(t0=1.0, num_inference_steps=2)
    frames = pipe.interpolate(1, 2, steps=2, config=config, progress=False)
    assert frames[0].tobytes() == frames[1].tobytes()  # what the warning says
    pipe.traverse(0, 3, [-2.0, 2.0], config, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("leaves the VAE latent z unused" in w for w in warnings)
    caplog.clear()
    pipe.interpolate(1, 2, steps=2, config=SampleConfig(t0=0.5, num_inference_steps=2), progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_transforming_at_t0_one_warns_that_the_inputs_are_unused(pipe, shapes, caplog):
    from PIL import Image

    inputs = [Image.open(p).convert("RGB") for p in sorted(shapes.glob("*.png"))[:2]]
    config = SampleConfig(t0=1.0, num_inference_steps=2)
    one, other = pipe.transform(inputs[:1], config, seed=5), pipe.transform(inputs[1:], config, seed=5)
    assert one[0].tobytes() == other[0].tobytes()  # what the warning says: the input makes no difference
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("leaves the input images unused" in w for w in warnings)
    caplog.clear()
    pipe.transform(inputs[:1], SampleConfig(t0=0.5, num_inference_steps=2))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_image_initialization_stays_near_the_input_at_small_t0(pipe, shapes, fitted_run):
    from dyod.data import load_image, resize_lanczos

    images = [load_image(p) for p in sorted(shapes.iterdir())[:3]]
    out = pipe.transform(images, SampleConfig(t0=0.5, num_inference_steps=10), progress=False)
    assert len(out) == 3 and all(im.size == (pipe.output_resolution,) * 2 for im in out)
    # Eq. 11 in latent space: starting at t' = 1 of 50 steps changes the input latents far less than t' = T.
    latents = pipe.encode(pil_to_tensor([resize_lanczos(im, pipe.prior.resolution) for im in images]))
    noise = pipe.noise([0, 1, 2])
    near = pipe.denoise_from(latents, noise, 0.02, SampleConfig())
    far = pipe.denoise_from(latents, noise, 1.0, SampleConfig())
    assert pipe.last_unet_calls == 50
    assert (near - latents).abs().mean() < 0.25 * (far - latents).abs().mean()


def test_round_trip_is_the_prior_autoencoder_on_the_images_in_any_batch(pipe, shapes):
    """``round_trip``: the dataset's images through the prior's autoencoder alone (the floor of every t0), a batch at
    a time, the same as one batch, and the same as encode -> decode by hand."""
    from dyod.data import load_image_folder, resize_lanczos

    images = load_image_folder(shapes, max_images=5).images
    whole = pipe.round_trip(images)
    x = pil_to_tensor([resize_lanczos(im, pipe.prior.resolution) for im in images])
    by_hand = pipe.to_images(pipe.decode(pipe.encode(x)))
    assert len(whole) == 5 and whole[0].size == (min(images[0].size[0], pipe.prior.resolution),) * 2
    for a, b, c in zip(whole, pipe.round_trip(images, batch_size=2), by_hand):
        a, b, c = (np.asarray(im, dtype=int) for im in (a, b, c))
        assert np.abs(a - b).max() <= 1 and np.array_equal(a, c)


def test_v_prediction_model_runs_end_to_end(tmp_path, tiny_v_model, shapes):
    dyod.invert(shapes, tiny_v_model, tmp_path / "run", dyod.InversionConfig(steps=2, batch_size=2), progress=False, device="cpu")
    dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4), progress=False, device="cpu")
    p = DyodPipeline.from_run(tmp_path / "run", device="cpu")
    assert p.prior.prediction_type == "v_prediction"
    images = p.sample(2, SampleConfig(t0=0.7, num_inference_steps=10), progress=False)
    assert len(images) == 2 and all(torch.isfinite(pil_to_tensor([im])).all() for im in images)
