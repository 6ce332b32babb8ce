"""Stage 1: textual inversion over the whole dataset (Eq. 7)."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import dyod
import dyod.run_info
from dyod.data import load_image_folder, pil_to_tensor, resize_lanczos
from dyod.embeddings import load_into, load_learned_embeds, placeholder_tokens
from dyod.errors import DyodError
from dyod.inversion import inversion_loss
from dyod.prior import load_prior


def fixed_batch_loss(model, data_dir, token, vectors, seed=0, n_draws=6):
    """Eq. 7 on a fixed set of (image, t, ε) draws, with S* set to ``vectors``."""
    prior = load_prior(model)
    load_into(prior.tokenizer, prior.text_encoder, token, vectors)
    images = load_image_folder(data_dir).images
    x = pil_to_tensor([resize_lanczos(im, prior.resolution) for im in images])
    with torch.no_grad():
        latents = prior.vae.encode(x).latent_dist.mean * prior.scaling_factor
        prompt = "a photo of " + " ".join(placeholder_tokens(token, vectors.shape[0]))
        ids = prior.tokenizer([prompt] * len(x), padding="max_length", max_length=prior.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(n_draws):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(1000, (len(x),), generator=g)
            losses.append(inversion_loss(prior, latents, noise, t, ids, prior.alphas_cumprod()).item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, shapes):
    out = tmp_path_factory.mktemp("inv") / "run"
    config = dyod.InversionConfig(steps=60, batch_size=4, learning_rate=0.05, checkpoint_every=20, seed=1)
    dyod.invert(shapes, tiny_model, out, config, progress=False, device="cpu")
    return out, config


def test_only_the_new_rows_change_and_the_loss_falls(trained, tiny_model, shapes):
    out, config = trained
    token, learned = load_learned_embeds(out / "learned_embeds.safetensors")
    assert token == "<dyod>" and learned.shape == (1, 32)

    # Every other row of a text encoder carrying S* is bit-identical to the original model's.
    original = load_prior(tiny_model)
    reference = original.text_encoder.get_input_embeddings().weight.clone()
    load_into(original.tokenizer, original.text_encoder, token, learned)
    weight = original.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[: len(reference)], reference)
    assert torch.equal(weight[len(reference):], learned)

    # The initializer's embedding is where S* started; the fixed-draw loss must fall from there.
    init_prior = load_prior(tiny_model)
    init_ids = init_prior.tokenizer(config.initializer, add_special_tokens=False).input_ids
    init = init_prior.text_encoder.get_input_embeddings().weight[init_ids].mean(0, keepdim=True).detach()
    assert not torch.allclose(init, learned)
    before = fixed_batch_loss(tiny_model, shapes, token, init)
    after = fixed_batch_loss(tiny_model, shapes, token, learned)
    assert after < before, (before, after)

    log = [json.loads(line) for line in (out / "inversion" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))


def test_saved_embedding_loads_in_diffusers(trained, tiny_model):
    out, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<dyod>")
    learned = load_file(str(out / "learned_embeds.safetensors"))["<dyod>"]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], learned[0])
    images = pipe("a photo of <dyod>", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_multi_vector_token_loads_in_diffusers(tmp_path, tiny_model, shapes):
    dyod.invert(shapes, tiny_model, tmp_path / "run", dyod.InversionConfig(steps=2, batch_size=2, num_vectors=3,
                placeholder_token="<shapes>"), progress=False, device="cpu")
    state = load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))
    assert list(state) == ["<shapes>"] and state["<shapes>"].shape == (3, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(tmp_path / "run" / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<shapes>", "<shapes>_1", "<shapes>_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], state["<shapes>"])
    # dyod's sampler reads S* written out in a prompt as diffusers' pipeline does: all three vectors, as {} gives
    dyod_pipe = dyod.DyodPipeline.from_run(tmp_path / "run", device="cpu")
    assert dyod_pipe.prompt("a photo of <shapes>") == dyod_pipe.prompt("a photo of {}") == \
        pipe.maybe_convert_prompt("a photo of <shapes>", pipe.tokenizer) == "a photo of <shapes> <shapes>_1 <shapes>_2"
    assert dyod_pipe.prompt("a photo of apple") == "a photo of apple"


def test_a_token_inside_other_words_is_read_as_s_star_there_so_it_is_refused_or_warned(fitted_run, caplog):
    """Why a placeholder that a context text holds is refused: the CLIP tokenizer matches an added token anywhere in
    a text, inside words too, so "photo" makes "a photo of {}" hold S* twice (shown with the real tokenizer). At
    sampling, a prompt or negative prompt that holds the run's token is warned of, once."""
    from transformers import CLIPTokenizer

    from dyod.prior import bundled_prior_path

    tokenizer = CLIPTokenizer.from_pretrained(bundled_prior_path(), subfolder="tokenizer")
    tokenizer.add_tokens(["photo"])
    assert tokenizer.tokenize("a photo of photo").count("photo") == 2
    with pytest.raises(ValueError, match="occurs in the context text 'a photo of {}' outside {}"):
        dyod.InversionConfig(placeholder_token="photo")
    with pytest.raises(ValueError, match="occurs in the context text 'a <x> picture of {}'"):
        dyod.InversionConfig(placeholder_token="<x>", templates=("a photo of {}", "a <x> picture of {}"))
    dyod.InversionConfig(placeholder_token="<x>", templates=("a photo of <x>",))  # S* written out: meant
    with pytest.raises(ValueError, match="cannot hold {}, which marks where S\\* goes"):
        dyod.InversionConfig(placeholder_token="<{}>")

    pipe = dyod.DyodPipeline.from_run(fitted_run, device="cpu")
    config = dyod.SampleConfig(t0=1.0, num_inference_steps=1, prompt="a <dyod>-like photo of {}",
                               negative_prompt="<dyod>")
    with caplog.at_level("WARNING", logger="dyod.pipeline"):
        for _ in range(2):  # two batches: warned once
            pipe.denoiser(config)
    warnings = [r.getMessage() for r in caplog.records if r.name == "dyod.pipeline"]
    assert warnings == ["the prompt 'a <dyod>-like photo of {}' holds the learned token '<dyod>' besides its {}: the "
                        "model reads S* there too",
                        "the negative prompt '<dyod>' holds the learned token '<dyod>': the model reads S* there "
                        "(guidance then steers away from the dataset)"]


def test_resume_continues_to_the_same_result(tmp_path, tiny_model, shapes):
    config = dyod.InversionConfig(steps=8, batch_size=2, checkpoint_every=4, learning_rate=0.05)
    dyod.invert(shapes, tiny_model, tmp_path / "full", config, progress=False, device="cpu")
    half = dyod.InversionConfig(**{**config.__dict__, "steps": 4})
    dyod.invert(shapes, tiny_model, tmp_path / "split", half, progress=False, device="cpu")
    halfway = load_file(str(tmp_path / "split" / "learned_embeds.safetensors"))["<dyod>"]
    dyod.invert(shapes, tiny_model, tmp_path / "split", config, resume=True, progress=False, device="cpu")
    full = load_file(str(tmp_path / "full" / "learned_embeds.safetensors"))["<dyod>"]
    split = load_file(str(tmp_path / "split" / "learned_embeds.safetensors"))["<dyod>"]
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(split, halfway)  # --resume really trained the remaining steps


def test_resume_from_the_command_line_keeps_the_settings_the_run_started_with(tmp_path, tiny_model, shapes, capsys,
                                                                           caplog):
    """`dyod invert ... --resume` without the flags the run was started with took the defaults (batch 4, learning
    rate 5e-3): the run went on with other settings than it started with and recorded them as if used throughout.
    The flags not given are now the run's own; another number of vectors is refused before the model loads."""
    from dyod.cli import main

    def invert(out, *flags):
        return main(["invert", str(shapes), "--model", str(tiny_model), "--out", str(tmp_path / out), "--device", "cpu",
                     *flags])

    started = ["--batch-size", "2", "--learning-rate", "0.05", "--sample-every", "0"]
    assert invert("full", "--steps", "8", *started) == 0
    assert invert("split", "--steps", "4", *started) == 0
    assert invert("split", "--steps", "8", "--resume") == 0
    full = load_file(str(tmp_path / "full" / "learned_embeds.safetensors"))["<dyod>"]
    split = load_file(str(tmp_path / "split" / "learned_embeds.safetensors"))["<dyod>"]
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)
    recorded = json.loads((tmp_path / "split" / "run.json").read_text())["stages"]["inversion"]["config"]
    assert recorded["batch_size"] == 2 and recorded["learning_rate"] == 0.05 and recorded["sample_every"] == 0
    capsys.readouterr()
    assert invert("split", "--steps", "9", "--resume", "--num-vectors", "2") == 2
    assert "was made with other settings (num_vectors 1 then, 2 now), which shape what it holds" in capsys.readouterr().err
    assert invert("split", "--steps", "9", "--resume", "--batch-size", "1") == 0  # as the advice after running out
    assert "(batch_size 2 then, 1 now)" in caplog.text  # of memory has it, with a warning


def test_sample_grids_show_what_the_prompt_gives_at_each_step(trained):
    """RUN/inversion/samples/step-*.png: the prior's samples for the first template with S* as it was at that step (the
    initializer's at step 0); the last grid is what `dyod sample --t0 1` makes with the saved S*."""
    import numpy as np
    from PIL import Image

    from dyod.images import make_grid
    from dyod.inversion import PREVIEW_STEPS
    from dyod.pipeline import DyodPipeline

    out, config = trained
    assert sorted(p.name for p in (out / "inversion" / "samples").iterdir()) == ["step-000000.png", "step-000060.png"]
    pipe = DyodPipeline.from_run(out, device="cpu")
    images = pipe.sample(config.sample_images, dyod.SampleConfig(t0=1.0, num_inference_steps=PREVIEW_STEPS,
                                                                 prompt=config.templates[0]), progress=False)
    expected = np.asarray(make_grid(images, config.sample_images), dtype=int)
    last = np.asarray(Image.open(out / "inversion" / "samples" / "step-000060.png"), dtype=int)
    first = np.asarray(Image.open(out / "inversion" / "samples" / "step-000000.png"), dtype=int)
    assert last.shape == expected.shape == (20, 4 * 16 + 5 * 2, 3)  # four 16-px images (the model's: the dataset's
    # 32 px are larger), padded
    assert np.abs(last - expected).max() <= 2  # decoded one at a time there, as a batch here: rounding
    assert np.abs(first - last).max() > 20  # S* changed what the prompt gives


def test_sample_grids_leave_training_as_it_is(tmp_path, tiny_model, shapes):
    config = dyod.InversionConfig(steps=4, batch_size=2, learning_rate=0.05, sample_every=0)
    dyod.invert(shapes, tiny_model, tmp_path / "plain", config, progress=False, device="cpu")
    with_grids = dyod.InversionConfig(**{**config.__dict__, "sample_every": 1, "sample_images": 2})
    dyod.invert(shapes, tiny_model, tmp_path / "grids", with_grids, progress=False, device="cpu")
    assert not (tmp_path / "plain" / "inversion" / "samples").exists()
    assert [p.name for p in sorted((tmp_path / "grids" / "inversion" / "samples").iterdir())] == [
        f"step-00000{i}.png" for i in range(5)]
    plain = load_file(str(tmp_path / "plain" / "learned_embeds.safetensors"))["<dyod>"]
    assert torch.equal(load_file(str(tmp_path / "grids" / "learned_embeds.safetensors"))["<dyod>"], plain)


def test_resume_on_other_data_is_refused(tmp_path, tiny_model, shapes):
    config = dyod.InversionConfig(steps=2, batch_size=2, sample_every=0)
    dyod.invert(shapes, tiny_model, tmp_path / "run", config, progress=False, device="cpu")
    longer = dyod.InversionConfig(**{**config.__dict__, "steps": 4})
    with pytest.raises(DyodError, match="was training on 12 images, the data folder now gives 8; resume with that"):
        dyod.invert(shapes, tiny_model, tmp_path / "run", longer, dyod.DataConfig(max_images=8), resume=True,
                    progress=False, device="cpu")


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(trained, tmp_path, tiny_model, shapes):
    out, _ = trained
    before = (out / "learned_embeds.safetensors").read_bytes()
    with pytest.raises(DyodError, match="--resume .* or --overwrite"):
        dyod.invert(shapes, tiny_model, out, dyod.InversionConfig(steps=1), progress=False, device="cpu")
    assert (out / "learned_embeds.safetensors").read_bytes() == before
    with pytest.raises(DyodError, match="nothing to resume"):
        dyod.invert(shapes, tiny_model, tmp_path / "new", dyod.InversionConfig(steps=1), resume=True, progress=False)


def test_run_made_for_another_model_is_refused(trained, tiny_v_model, shapes):
    out, _ = trained
    with pytest.raises(DyodError, match="was made for model"):
        dyod.invert(shapes, tiny_v_model, out, dyod.InversionConfig(steps=1), overwrite=True, progress=False, device="cpu")


def test_token_clash_and_width_mismatch_are_explained(tiny_model, tmp_path):
    prior = load_prior(tiny_model)
    with pytest.raises(DyodError, match="already exists in the tokenizer's vocabulary"):
        load_into(prior.tokenizer, prior.text_encoder, "<|endoftext|>", torch.zeros(1, 32))
    with pytest.raises(DyodError, match="768 wide but this text encoder's is 32 wide"):
        load_into(prior.tokenizer, prior.text_encoder, "<new>", torch.zeros(1, 768))
    pickle = tmp_path / "learned_embeds.bin"
    pickle.write_bytes(b"not really")
    with pytest.raises(DyodError, match="pickle"):
        load_learned_embeds(pickle)
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, str(two))
    with pytest.raises(DyodError, match="exactly one token"):
        load_learned_embeds(two)


def test_large_latent_cache_is_memory_mapped_on_disk(tmp_path, tiny_model, shapes):
    out = tmp_path / "run"
    in_ram = dyod.InversionConfig(steps=3, batch_size=2, seed=3)
    on_disk = dyod.InversionConfig(steps=3, batch_size=2, seed=3, latent_cache_max_ram_mb=0)
    dyod.invert(shapes, tiny_model, tmp_path / "ram", in_ram, progress=False, device="cpu")
    dyod.invert(shapes, tiny_model, out, on_disk, progress=False, device="cpu")
    assert (out / "cache" / "latents_mean.npy").exists() and not (tmp_path / "ram" / "cache").exists()
    a = load_file(str(tmp_path / "ram" / "learned_embeds.safetensors"))["<dyod>"]
    b = load_file(str(out / "learned_embeds.safetensors"))["<dyod>"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fp16-gradient-scaler"])
def test_a_training_step_reads_nothing_back_from_the_device(tiny_model, shapes, monkeypatch, scaled):
    """PromptTrainer.step never turns a tensor into a Python value: on a GPU each such read waits for the queued work
    to finish, and the host could not prepare the next step while the GPU runs this one. Under fp16 (GPUs without
    bf16) a gradient scaler decides whether to skip each step: it must not read its overflow flag back either."""
    from dyod.inversion import LatentCache, PromptTrainer
    from dyod.performance import new_accelerator

    prior = load_prior(tiny_model)
    x = pil_to_tensor([resize_lanczos(im, prior.resolution) for im in load_image_folder(shapes).images[:4]])
    with torch.no_grad():
        posterior = prior.vae.encode(x).latent_dist
    cache = LatentCache(posterior.mean, posterior.std)
    config = dyod.InversionConfig(batch_size=2, gradient_accumulation_steps=2)
    accelerator = new_accelerator(cpu=True, gradient_accumulation_steps=2)
    if scaled:  # what Accelerate sets up for fp16 on a GPU (the scaler's logic is the same in fp32 on the CPU)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = PromptTrainer(prior, cache, config, accelerator)
    losses = [trainer.step()]  # AdamW's state exists from here on
    before = trainer.embedding.learned.detach().clone()
    # AdamW's step counter is a CPU tensor even when training on a GPU (reading it waits for nothing)
    cpu_by_design = {id(state["step"]) for state in trainer.optimizer.state.values()}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if id(self) not in cpu_by_design:
                raise AssertionError(f"Tensor.{name}: a device-to-host read inside the training step")
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    losses += [trainer.step() for _ in range(2)]
    monkeypatch.undo()
    assert all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses)
    assert not torch.equal(trainer.embedding.learned, before)  # the steps did train S*
    assert bool(trainer.optimizer.param_groups[0]["fused"]) is scaled
    if scaled:  # an overflowing gradient still skips the step, decided on the device, and halves the scale
        scale, trained = accelerator.scaler.get_scale(), trainer.embedding.learned.detach().clone()
        steps = [state["step"].clone() for state in trainer.optimizer.state.values()]
        finite_loss = trainer._loss
        monkeypatch.setattr(trainer, "_loss", lambda generator: finite_loss(generator) * float("inf"))
        trainer.step()
        assert accelerator.scaler.get_scale() == scale / 2  # one optimizer step (of two accumulated losses)
        assert torch.equal(trainer.embedding.learned, trained)
        assert all(torch.equal(state["step"], s) for state, s in zip(trainer.optimizer.state.values(), steps))


def test_a_gradient_scaler_with_fused_adamw_trains_what_plain_adamw_trains(tiny_model, shapes):
    """Under fp16 the gradient scaler multiplies the loss and the fused AdamW divides the gradient back inside its
    kernel: the same S*, step by step, as the unscaled step (fp32 on the CPU, so only the scaling differs). AdamW's
    step hardly depends on the gradient's size, but for its eps: a large eps makes it depend, so that a gradient left
    scaled (1024 times too large) would show."""
    from dyod.inversion import LatentCache, PromptTrainer
    from dyod.performance import new_accelerator

    learned = []
    for scaled in (False, True, "left scaled"):
        prior = load_prior(tiny_model)
        x = pil_to_tensor([resize_lanczos(im, prior.resolution) for im in load_image_folder(shapes).images[:4]])
        with torch.no_grad():
            posterior = prior.vae.encode(x).latent_dist
        accelerator = new_accelerator(cpu=True)
        if scaled is True:
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer = PromptTrainer(prior, LatentCache(posterior.mean, posterior.std),
                                dyod.InversionConfig(batch_size=2, learning_rate=0.05), accelerator)
        trainer.optimizer.param_groups[0]["eps"] = 1e-3
        if scaled == "left scaled":  # what a scaler whose factor never came off would give
            loss = trainer._loss
            trainer._loss = lambda generator: loss(generator) * 2.0**10
        initial = trainer.embedding.learned.detach().clone()
        for _ in range(3):
            trainer.step()
        learned.append(trainer.embedding.learned.detach().clone())
    plain, fused_scaled, left_scaled = learned
    assert not torch.equal(plain, initial)  # it trained
    torch.testing.assert_close(fused_scaled, plain, rtol=1e-5, atol=1e-6)
    assert (left_scaled - plain).abs().max() > 100 * (fused_scaled - plain).abs().max() + 1e-5


def test_fp16_mixed_precision_on_the_cpu_is_refused_before_any_work(tmp_path, tiny_model, shapes):
    out = tmp_path / "run"
    with pytest.raises(dyod.DyodError, match="--mixed-precision fp16 needs a CUDA GPU.*--mixed-precision bf16"):
        dyod.invert(shapes, tiny_model, out, dyod.InversionConfig(steps=2, mixed_precision="fp16"), progress=False,
                    device="cpu")
    assert not out.exists()


def test_bf16_mixed_precision_trains_with_the_frozen_parts_in_bf16(tmp_path, tiny_model, shapes):
    """--mixed-precision bf16 (what auto picks on recent GPUs) end to end on the CPU: the frozen UNet and the text
    encoder's frozen linear layers in bf16, S* in fp32, and the loss still falls."""
    out = tmp_path / "run"
    config = dyod.InversionConfig(steps=40, batch_size=4, learning_rate=0.05, mixed_precision="bf16", seed=1)
    dyod.invert(shapes, tiny_model, out, config, progress=False, device="cpu")
    stage = json.loads((out / "run.json").read_text())["stages"]["inversion"]
    assert stage["mixed_precision"] == "bf16"
    token, learned = load_learned_embeds(out / "learned_embeds.safetensors")
    assert learned.dtype == torch.float32 and torch.isfinite(learned).all()
    losses = [json.loads(line)["loss"] for line in (out / "inversion" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and all(map(math.isfinite, losses))
    init = load_prior(tiny_model)
    start = init.text_encoder.get_input_embeddings().weight[init.tokenizer("object", add_special_tokens=False).input_ids]
    assert fixed_batch_loss(tiny_model, shapes, token, learned) < fixed_batch_loss(tiny_model, shapes, token,
                                                                                    start.detach().float())


def test_the_latent_cache_of_images_read_at_the_model_size_is_that_of_the_full_images(tmp_path, tiny_model):
    """invert reads each image straight to the model's resolution (a folder of photos is never held at full size):
    the cached posteriors are those of the full-size images, bit for bit."""
    import numpy as np
    from PIL import Image

    from dyod.inversion import LatentCache

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i, (w, h) in enumerate([(90, 60), (37, 51), (16, 16), (8, 12)]):  # larger, smaller and at the model's 16
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    prior = load_prior(tiny_model)
    caches = [LatentCache.build(load_image_folder(tmp_path / "photos", size=size).images, 4, prior, tmp_path / "cache",
                                max_ram_mb=1024, progress=False) for size in (None, prior.resolution)]
    assert torch.equal(caches[0].mean, caches[1].mean) and torch.equal(caches[0].std, caches[1].std)


def test_the_dataset_is_encoded_as_it_is_read(tmp_path, tiny_model, shapes):
    """invert never holds the dataset: the latent cache takes the images as they are read, a batch at a time (30,000
    images at 512 px would be 22 GiB), and sizes itself to the images that came (unreadable files are skipped)."""
    from dyod.inversion import LatentCache

    produced = 0

    def images():
        nonlocal produced
        for image in load_image_folder(shapes).images:
            produced += 1
            yield image

    prior = load_prior(tiny_model)
    read_when_encoding, encode = [], prior.vae.encode
    prior.vae.encode = lambda x: read_when_encoding.append(produced) or encode(x)
    cache = LatentCache.build(images(), 20, prior, tmp_path / "cache", max_ram_mb=1024, batch_size=5, progress=False,
                              describe=lambda: {"n": produced})
    assert read_when_encoding == [5, 10, 12] and len(cache) == 12 and cache.data == {"n": 12}


def test_an_on_disk_latent_cache_is_reused_only_for_the_same_files(tmp_path, tiny_model, shapes, caplog):
    """A run folder's cache on disk is reused by --resume without reading an image (the data record comes back with
    it), and never for other images, even as many of them."""
    import shutil

    from PIL import Image, ImageOps

    other = tmp_path / "other"
    shutil.copytree(shapes, other)
    for path in other.glob("*.png"):
        ImageOps.mirror(Image.open(path)).save(path)
    config = dyod.InversionConfig(steps=2, batch_size=2, latent_cache_max_ram_mb=0, sample_every=0)
    run = tmp_path / "run"
    dyod.invert(shapes, tiny_model, run, config, progress=False, device="cpu")
    dyod.invert(other, tiny_model, run, config, overwrite=True, progress=False, device="cpu")
    dyod.invert(other, tiny_model, tmp_path / "fresh", config, progress=False, device="cpu")
    assert torch.equal(load_file(str(run / "learned_embeds.safetensors"))["<dyod>"],
                       load_file(str(tmp_path / "fresh" / "learned_embeds.safetensors"))["<dyod>"])
    caplog.clear()
    longer = dyod.InversionConfig(**{**config.__dict__, "steps": 3})
    dyod.invert(other, tiny_model, run, longer, resume=True, progress=False, device="cpu")
    assert "reusing the latent cache" in caplog.text
    data = json.loads((run / "data.json").read_text())
    assert data["root"] == str(other.resolve()) and data["num_images"] == 12 and data["resolution"] == 32
    for damaged in ("{ cut short", "[]"):  # the cache's record damaged: the cache is made again, not a traceback
        (run / "cache" / "latents.json").write_text(damaged)
        caplog.clear()
        dyod.invert(other, tiny_model, run, longer, overwrite=True, progress=False, device="cpu")
        assert "reusing the latent cache" not in caplog.text
        assert json.loads((run / "cache" / "latents.json").read_text())["num_images"] == 12


def test_a_textual_inversion_learned_elsewhere_becomes_the_runs_dataset_prompt(tmp_path, tiny_model, shapes, fitted_run):
    """A user with S* already learned for the model (diffusers' textual-inversion example, the web UI) skips stage 1:
    imported, the run samples exactly what the run that learned it samples, and records where S* came from."""
    from dyod.inversion import import_dataset_prompt

    _, vectors = load_learned_embeds(fitted_run / "learned_embeds.safetensors")
    diffusers_file, webui_file = tmp_path / "learned_embeds.safetensors", tmp_path / "shapes-webui.safetensors"
    save_file({"<shapes>": vectors.clone()}, str(diffusers_file))
    save_file({"emb_params": vectors.clone()}, str(webui_file))  # the web UI names no token
    with pytest.raises(DyodError, match="names no token; give the word .*--placeholder-token"):
        import_dataset_prompt(shapes, tiny_model, tmp_path / "nameless", webui_file)
    assert not (tmp_path / "nameless").exists()

    config = dyod.SampleConfig(t0=1.0, num_inference_steps=4, batch_size=2)
    learned = dyod.DyodPipeline.from_run(fitted_run, device="cpu").sample(2, config, seed=3)
    for name, source, token in (("diffusers", diffusers_file, None), ("webui", webui_file, "<webui>")):
        out = tmp_path / name
        path = import_dataset_prompt(shapes, tiny_model, out, source, token=token)
        token_saved, saved = load_learned_embeds(path)
        assert token_saved == (token or "<shapes>") and torch.equal(saved, vectors)
        info = json.loads((out / "run.json").read_text())
        assert info["placeholder_token"] == token_saved and info["num_vectors"] == 1
        assert info["stages"]["inversion"]["imported_from"] == str(source.resolve())
        fitted_info = json.loads((fitted_run / "run.json").read_text())
        assert info["data"] == fitted_info["data"] and info["model"] == fitted_info["model"]
        imported = dyod.DyodPipeline.from_run(out, device="cpu").sample(2, config, seed=3)
        assert len(imported) == len(learned) == 2
        assert all((a.tobytes() == b.tobytes()) for a, b in zip(imported, learned)), name
        assert f"imported from {source.resolve()}" in dyod.run_info.describe_run(out)


def test_an_embedding_that_cannot_serve_is_refused_naming_the_file_and_leaving_the_run_as_it_was(
        tmp_path, tiny_model, shapes, fitted_run):
    from dyod.inversion import import_dataset_prompt

    cases = {"wide.safetensors": ({"<w>": torch.zeros(1, 768)}, "wide.safetensors: the embedding for '<w>' is 768 wide "
                                  "but this text encoder's is 32 wide"),
             "xl.safetensors": ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "Stable Diffusion XL"),
             "word.safetensors": ({"<|endoftext|>": torch.zeros(1, 32)}, "already exists in the tokenizer's vocabulary"),
             "nan.safetensors": ({"<n>": torch.full((1, 32), float("nan"))}, "non-finite"),
             "many.safetensors": ({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, "found \\['a', 'b'\\]")}
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / name))
        with pytest.raises(DyodError, match=message):
            import_dataset_prompt(shapes, tiny_model, tmp_path / "run", tmp_path / name)
        assert not (tmp_path / "run").exists(), name  # a run this command began, and nothing else: gone
    with pytest.raises(DyodError, match="pickle"):
        import_dataset_prompt(shapes, tiny_model, tmp_path / "run", tmp_path / "learned_embeds.bin")
    # a run that holds a prompt keeps it unless told
    before = (fitted_run / "learned_embeds.safetensors").read_bytes()
    save_file({"<other>": torch.zeros(1, 32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DyodError, match="already holds a dataset prompt; pass --overwrite"):
        import_dataset_prompt(shapes, tiny_model, fitted_run, tmp_path / "other.safetensors")
    assert (fitted_run / "learned_embeds.safetensors").read_bytes() == before


def test_fit_with_an_embedding_imports_s_star_and_trains_the_custom_vae(tmp_path, tiny_model, shapes, fitted_run,
                                                                        capsys):
    from dyod.cli import main

    source = fitted_run / "learned_embeds.safetensors"
    out = tmp_path / "run"
    argv = ["fit", str(shapes), "--model", str(tiny_model), "--out", str(out), "--embedding", str(source),
            "--vae-epochs", "1", "--vae-latent-dim", "4", "--device", "cpu"]
    assert main([*argv, "--steps", "3", "--learning-rate", "1"]) == 2  # training flags would do nothing: refused
    assert ("--learning-rate, --steps: S* is imported from --embedding" in capsys.readouterr().err
            and not out.exists())
    invert = ["invert", *argv[1:8], "--resume"]  # invert's --resume continues a training, which there is not
    assert main(invert) == 2 and "give one of them" in capsys.readouterr().err and not out.exists()
    assert main(argv) == 0
    assert (out / "vae" / "model.safetensors").exists() and not (out / "inversion").exists()
    assert torch.equal(load_learned_embeds(out / "learned_embeds.safetensors")[1], load_learned_embeds(source)[1])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    described = capsys.readouterr().out
    assert f"dataset prompt S*: <dyod> (1 vector), imported from {source.resolve()}" in described
    assert "custom VAE: " in described and "not trained" not in described
    # resuming keeps the import of the same file; another file is refused, the run as it was
    assert main([*argv, "--resume"]) == 0
    save_file({"<other>": torch.zeros(1, 32)}, str(tmp_path / "other.safetensors"))
    other = [str(tmp_path / "other.safetensors") if arg == str(source) else arg for arg in argv]
    assert main([*other, "--resume"]) == 2
    assert "already holds a dataset prompt" in capsys.readouterr().err
