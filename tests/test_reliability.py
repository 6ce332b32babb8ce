"""Failure and recovery: SIGKILL and --resume, hostile image files (fuzzed), numerical faults."""

import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dyod
from dyod.data import load_image_folder
from dyod.errors import DyodError


def _checkpoint_step(path):
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model, shapes):
    args = ["--model", str(tiny_model), "--steps", "120", "--checkpoint-every", "10", "--batch-size", "2",
            "--learning-rate", "0.02", "--device", "cpu"]
    cmd = [sys.executable, "-m", "dyod", "invert", str(shapes), "--out", str(tmp_path / "killed"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "inversion" / "checkpoint.safetensors"
    target = random.Random(0).choice([30, 40, 50])
    deadline = time.time() + 120
    while _checkpoint_step(checkpoint) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(1).random() * 0.1)  # a random moment, possibly mid-write of the next checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_step(checkpoint)
    assert 0 < killed_at < 120, "the run must be killed mid-way for this test to mean anything"
    assert not (tmp_path / "killed" / "learned_embeds.safetensors").exists()

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    dyod.invert(shapes, tiny_model, tmp_path / "straight", dyod.InversionConfig(steps=120, checkpoint_every=10,
                batch_size=2, learning_rate=0.02), progress=False, device="cpu")
    a = load_file(str(tmp_path / "killed" / "learned_embeds.safetensors"))["<dyod>"]
    b = load_file(str(tmp_path / "straight" / "learned_embeds.safetensors"))["<dyod>"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "inversion" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))  # the log has each step once

    again = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already finished" in again.stderr


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, tiny_model, shapes, monkeypatch):
    import dyod.inversion as inversion

    real = inversion.inversion_loss
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(inversion, "inversion_loss", failing)
    with pytest.raises(DyodError, match="loss became nan at step 5.*checkpoint.*intact.*bf16"):
        dyod.invert(shapes, tiny_model, tmp_path / "run", dyod.InversionConfig(steps=10, checkpoint_every=2,
                    batch_size=2, gradient_checkpointing="none"), progress=False, device="cpu")  # no probe step
    checkpoint = tmp_path / "run" / "inversion" / "checkpoint.safetensors"
    assert _checkpoint_step(checkpoint) == 4
    assert torch.isfinite(load_file(str(checkpoint))["learned"]).all()


def test_out_of_memory_says_how_to_use_less(tmp_path, tiny_model, shapes, monkeypatch):
    import dyod.inversion as inversion

    real = inversion.inversion_loss
    calls = {"n": 0}

    def exhausting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(inversion, "inversion_loss", exhausting)
    with pytest.raises(DyodError) as e:
        dyod.invert(shapes, tiny_model, tmp_path / "run", dyod.InversionConfig(steps=10, checkpoint_every=2,
                    batch_size=4, gradient_checkpointing="none"), progress=False, device="cpu")  # no probe step
    message = str(e.value)
    assert "ran out of memory" in message and "batch 4" in message
    assert "--gradient-checkpointing 2" in message and "--batch-size 2 --gradient-accumulation-steps 2" in message
    assert "checkpoint.safetensors is intact" in message and "--resume" in message
    assert _checkpoint_step(tmp_path / "run" / "inversion" / "checkpoint.safetensors") == 2


def _fails_below_two_checkpointed_levels(monkeypatch):
    """inversion_loss that runs out of memory unless the UNet's two finest levels are checkpointed (a small GPU)."""
    import dyod.inversion as inversion

    real = inversion.inversion_loss

    def loss(prior, *args, **kwargs):
        unet = getattr(prior.unet, "_orig_mod", prior.unet)
        flags = {m.gradient_checkpointing for m in unet.up_blocks[0].modules() if hasattr(m, "gradient_checkpointing")}
        if flags != {True}:  # up_blocks[0] is the tiny UNet's second-finest level
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prior, *args, **kwargs)

    monkeypatch.setattr(inversion, "inversion_loss", loss)


def test_auto_checkpointing_takes_the_least_that_fits(tmp_path, tiny_model, shapes, monkeypatch):
    config = dyod.InversionConfig(steps=6, batch_size=2, checkpoint_every=0)
    # Where everything fits (the CPU), auto is no checkpointing, and its probe step changes nothing in the training.
    dyod.invert(shapes, tiny_model, tmp_path / "auto", config, progress=False, device="cpu")
    dyod.invert(shapes, tiny_model, tmp_path / "none", dataclasses.replace(config, gradient_checkpointing="none"),
                progress=False, device="cpu")
    stage = json.loads((tmp_path / "auto" / "run.json").read_text())["stages"]["inversion"]
    assert stage["gradient_checkpointing"] == "none" and stage["config"]["gradient_checkpointing"] == "auto"
    a = load_file(str(tmp_path / "auto" / "learned_embeds.safetensors"))["<dyod>"]
    b = load_file(str(tmp_path / "none" / "learned_embeds.safetensors"))["<dyod>"]
    assert torch.equal(a, b)

    # Where only the two finest levels checkpointed fit, auto finds them and trains as the explicit setting does.
    dyod.invert(shapes, tiny_model, tmp_path / "two", dataclasses.replace(config, gradient_checkpointing="2"),
                progress=False, device="cpu")
    _fails_below_two_checkpointed_levels(monkeypatch)
    dyod.invert(shapes, tiny_model, tmp_path / "small-gpu", config, progress=False, device="cpu")
    stage = json.loads((tmp_path / "small-gpu" / "run.json").read_text())["stages"]["inversion"]
    assert stage["gradient_checkpointing"] == "2"
    c = load_file(str(tmp_path / "small-gpu" / "learned_embeds.safetensors"))["<dyod>"]
    d = load_file(str(tmp_path / "two" / "learned_embeds.safetensors"))["<dyod>"]
    torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-6)


def test_auto_checkpointing_tries_the_feed_forwards_before_whole_blocks(tmp_path, tiny_model, shapes, monkeypatch):
    import dyod.inversion as inversion
    from dyod.frozen_layers import RecomputedFeedForward

    real, tried = inversion.inversion_loss, []

    def loss(prior, *args, **kwargs):  # fits once the feed-forwards recompute their projection
        unet = getattr(prior.unet, "_orig_mod", prior.unet)
        recomputing = any(type(m) is RecomputedFeedForward for m in unet.modules())
        tried.append(recomputing)
        if not recomputing:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(prior, *args, **kwargs)

    monkeypatch.setattr(inversion, "inversion_loss", loss)
    dyod.invert(shapes, tiny_model, tmp_path / "run", dyod.InversionConfig(steps=2, batch_size=2, checkpoint_every=0),
                progress=False, device="cpu")
    stage = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["inversion"]
    assert stage["gradient_checkpointing"] == "feed-forward" and tried[:2] == [False, True]


def test_auto_checkpointing_that_never_fits_says_what_to_do(tmp_path, tiny_model, shapes, monkeypatch):
    import dyod.inversion as inversion

    def never(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(inversion, "inversion_loss", never)
    with pytest.raises(DyodError, match="ran out of memory.*batch 4, gradient checkpointing all.*--batch-size 2"):
        dyod.invert(shapes, tiny_model, tmp_path / "run", dyod.InversionConfig(steps=4, batch_size=4), progress=False,
                    device="cpu")


def _png_bytes(mode="RGB", size=(12, 9)):
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_odd_images_are_used_or_skipped_with_a_reason(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.new("RGB", (1, 1), (0, 0, 255)).save(tmp_path / "tiny.png")
    Image.new("RGB", (300, 20), (0, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (200, 200), (9, 9, 9)).save(tmp_path / "bomb.png")
    Image.new("RGB", (120, 120), (9, 9, 9)).save(tmp_path / "large.png")
    # 200 x 200 is now a decompression bomb (over twice the limit: Pillow refuses it); 120 x 120 is over the limit
    # alone, where Pillow only warns, as it does for a 108-MP photo: read (and without the warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = load_image_folder(tmp_path, size=lambda resolution: 16)
    loaded = {p.name: im for p, im in zip(folder.paths, folder.images)}
    assert set(loaded) == {"anim.gif", "tiny.png", "wide.png", "large.png"}
    folder = load_image_folder(tmp_path)
    loaded = {p.name: im for p, im in zip(folder.paths, folder.images)}
    assert np.asarray(loaded["anim.gif"])[0, 0].tolist() == [255, 0, 0]  # the first frame
    assert [s.path.endswith("bomb.png") and "DecompressionBomb" in s.reason for s in folder.skipped] == [True]
    from dyod.data import resize_lanczos

    assert resize_lanczos(loaded["wide.png"], 16).size == (16, 16)
    assert resize_lanczos(loaded["tiny.png"], 16).size == (16, 16)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       suffix=st.sampled_from([".png", ".jpg", ".gif", ".webp"]))
def test_fuzzed_files_never_stop_the_loader(tmp_path_factory, data, flips, suffix):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "good.png").write_bytes(_png_bytes())
    base = bytearray(_png_bytes() if suffix == ".png" else data)
    for pos, value in flips:
        if base:
            base[pos % len(base)] = value
    (folder / f"fuzzed{suffix}").write_bytes(bytes(base) + data[:50])
    result = load_image_folder(folder)
    names = [p.name for p in result.paths] + [s.path.rsplit("/", 1)[-1] for s in result.skipped]
    assert sorted(names) == sorted(["good.png", f"fuzzed{suffix}"])
    assert all(im.mode == "RGB" and im.width > 0 for im in result.images)
    assert all(s.reason for s in result.skipped)


def test_half_precision_sampling_on_a_v_prediction_model_stays_finite(tmp_path, tiny_v_model, shapes):
    from dyod import SampleConfig
    from dyod.data import pil_to_tensor
    from dyod.pipeline import DyodPipeline

    dyod.invert(shapes, tiny_v_model, tmp_path / "run", dyod.InversionConfig(steps=2, batch_size=2), progress=False,
                device="cpu")
    dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4), progress=False,
                   device="cpu")
    pipe = DyodPipeline.from_run(tmp_path / "run", device="cpu", dtype=torch.float16)
    assert pipe.prior.unet.dtype == torch.float16
    from dyod.data import resize_lanczos

    inputs = [resize_lanczos(im, pipe.prior.resolution) for im in load_image_folder(shapes, max_images=2).images]
    for t0 in (0.6, 1.0):
        init = pipe.encode(pil_to_tensor(inputs)) if t0 < 1 else None
        latents = pipe.denoise_from(init, pipe.noise([0, 1]), t0, SampleConfig(num_inference_steps=3))
        assert latents.dtype == torch.float32 and torch.isfinite(latents).all()  # the DDIM arithmetic stays in fp32
    images = pipe.sample(1, SampleConfig(t0=0.6, num_inference_steps=3), progress=False)
    assert all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for im in images)


def test_ctrl_c_writes_a_checkpoint_where_training_stopped_and_resume_loses_nothing(tmp_path, tiny_model, shapes,
                                                                                    monkeypatch, ctrl_c_raises):
    """Ctrl-C (SIGINT) in a training loop without periodic checkpoints: before, every step since the start was lost
    (`--checkpoint-every` 500 by default); now the step in progress finishes, a checkpoint is written there, and
    --resume ends where an uninterrupted run ends, logging each step once. A second Ctrl-C stops at once."""
    import dyod.inversion as inversion
    import dyod.vae_training as vae_training

    def interrupt_at(module, name, calls_at, times=1):
        real, calls = getattr(module, name), {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls_at:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)  # as the terminal delivers Ctrl-C, mid-step
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, interrupted)
        return real

    config = dyod.InversionConfig(steps=12, batch_size=2, checkpoint_every=0, learning_rate=0.05, sample_every=0,
                                  gradient_checkpointing="none")  # no probe step: one loss per step
    real = interrupt_at(inversion, "inversion_loss", 7)
    with pytest.raises(KeyboardInterrupt):
        dyod.invert(shapes, tiny_model, tmp_path / "stopped", config, progress=False, device="cpu")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    checkpoint = tmp_path / "stopped" / "inversion" / "checkpoint.safetensors"
    assert _checkpoint_step(checkpoint) == 7 and not (tmp_path / "stopped" / "learned_embeds.safetensors").exists()
    monkeypatch.setattr(inversion, "inversion_loss", real)
    dyod.invert(shapes, tiny_model, tmp_path / "stopped", config, resume=True, progress=False, device="cpu")
    dyod.invert(shapes, tiny_model, tmp_path / "straight", config, progress=False, device="cpu")
    torch.testing.assert_close(load_file(str(tmp_path / "stopped" / "learned_embeds.safetensors"))["<dyod>"],
                               load_file(str(tmp_path / "straight" / "learned_embeds.safetensors"))["<dyod>"],
                               rtol=1e-5, atol=1e-6)
    log = (tmp_path / "stopped" / "inversion" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 13))

    interrupt_at(inversion, "inversion_loss", 3, times=2)  # Ctrl-C twice: at once, no checkpoint of a half step
    with pytest.raises(KeyboardInterrupt):
        dyod.invert(shapes, tiny_model, tmp_path / "twice", config, progress=False, device="cpu")
    assert not (tmp_path / "twice" / "inversion" / "checkpoint.safetensors").exists()
    monkeypatch.setattr(inversion, "inversion_loss", real)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored (nohup, a background job): training goes on to its end
    interrupt_at(inversion, "inversion_loss", 3)
    dyod.invert(shapes, tiny_model, tmp_path / "ignored", config, progress=False, device="cpu")
    assert (tmp_path / "ignored" / "learned_embeds.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(inversion, "inversion_loss", real)

    vae_config = dyod.VAEConfig(epochs=4, batch_size=4, latent_dim=4, checkpoint_every=0)
    real = interrupt_at(vae_training, "vae_loss", 5)  # three steps an epoch: in the second epoch
    with pytest.raises(KeyboardInterrupt):
        dyod.train_vae(shapes, tmp_path / "vae-stopped", vae_config, progress=False, device="cpu")
    vae_checkpoint = tmp_path / "vae-stopped" / "vae" / "checkpoint.safetensors"
    assert _checkpoint_step(vae_checkpoint) == 2 and not (tmp_path / "vae-stopped" / "vae" / "model.safetensors").exists()
    monkeypatch.setattr(vae_training, "vae_loss", real)
    dyod.train_vae(shapes, tmp_path / "vae-stopped", vae_config, progress=False, device="cpu", resume=True)
    dyod.train_vae(shapes, tmp_path / "vae-straight", vae_config, progress=False, device="cpu")
    whole = load_file(str(tmp_path / "vae-straight" / "vae" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "vae-stopped" / "vae" / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_damaged_json_records_are_named_not_tracebacks(fitted_run, tiny_model, shapes, tmp_path, capsys):
    """A run's JSON files edited by hand or cut short: each is named with what to do (before: an AttributeError for
    a run.json holding a list, a KeyError for a VAE config without its architecture); a damaged latent-cache record
    is only a cache, made again (test_inversion)."""
    import shutil

    from dyod.cli import main

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    good_run, good_vae = (run / "run.json").read_text(), (run / "vae" / "config.json").read_text()
    cases = [("run.json", "[]", "run.json holds a JSON list, not the object dyod writes there; the file may be damaged"),
             ("run.json", "{ cut", "run.json is not valid JSON"),
             ("vae/config.json", "[1]", "config.json holds a JSON list"),
             ("vae/config.json", "{}", 'config.json records no "model" (the VAE\'s architecture); the file may be '
                                       "damaged: train the VAE again with `dyod train-vae --overwrite`")]
    for name, text, expected in cases:
        (run / "run.json").write_text(good_run)
        (run / "vae" / "config.json").write_text(good_vae)
        (run / name).write_text(text)
        assert main(["sample", str(run), "-n", "1", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (run / "run.json").write_text(good_run)
    (run / "vae" / "config.json").write_text(good_vae)

    # safetensors files cut short (before: SafetensorError tracebacks)
    damaged = "cannot be read (Error while deserializing header"
    weights = run / "vae" / "model.safetensors"
    good_weights = weights.read_bytes()
    weights.write_bytes(good_weights[:300])
    assert main(["sample", str(run), "-n", "1", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert f"the custom VAE's weights {weights} {damaged}" in capsys.readouterr().err
    weights.write_bytes(good_weights)
    # a finished prompt does not need its checkpoint (test_a_damaged_checkpoint_of_a_finished_stage_...); training it
    # further does
    for stage, folder in ((["invert", "--model", str(tiny_model), "--steps", "10"], "inversion"), (["train-vae"], "vae")):
        checkpoint = run / folder / "checkpoint.safetensors"
        checkpoint.write_bytes(checkpoint.read_bytes()[:300])
        assert main([stage[0], str(shapes), *stage[1:], "--out", str(run), "--resume", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"the checkpoint {checkpoint} {damaged}" in err and err.rstrip().endswith(
            "start the stage again with --overwrite")


def test_a_damaged_feature_cache_entry_is_computed_again(shapes, tmp_path, monkeypatch, caplog):
    from dyod.evaluation import folder_features
    from dyod.world.features import EmojiFeatures

    monkeypatch.setenv("DYOD_CACHE", str(tmp_path / "cache"))
    extractor = EmojiFeatures.bundled()
    first, info = folder_features(shapes, extractor)
    assert not info["cached"]
    (entry,) = (tmp_path / "cache" / "features").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    again, info = folder_features(shapes, extractor)
    assert not info["cached"] and torch.equal(first, again) and "computing them again" in caplog.text
    assert folder_features(shapes, extractor)[1]["cached"]  # written whole again


def test_ctrl_c_on_the_command_line_says_how_to_go_on(tmp_path, tiny_model, shapes, monkeypatch, capsys,
                                                       ctrl_c_raises):
    import dyod.inversion as inversion
    from dyod.cli import main

    real, calls = inversion.inversion_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(inversion, "inversion_loss", interrupted)
    out = tmp_path / "run"
    assert main(["invert", str(shapes), "--model", str(tiny_model), "--out", str(out), "--steps", "6",
                 "--batch-size", "2", "--gradient-checkpointing", "none", "--sample-every", "0",
                 "--device", "cpu"]) == 130
    assert (f"interrupted; completed checkpoints and outputs are kept: the same command with --resume continues "
            f"(`dyod info {out}` shows where each stage stopped)") in capsys.readouterr().err
    assert _checkpoint_step(out / "inversion" / "checkpoint.safetensors") == 2


def test_non_finite_values_never_become_images(tmp_path, fitted_run, capsys, monkeypatch):
    """A run whose S* or custom VAE holds NaN is refused naming the file (before, exit 0 and all-black PNGs); a guidance
    scale far outside any use is refused as the flag is read (1e30 made black PNGs; -inf was taken for a flag); and
    whatever else makes the model's output non-finite stops the command without writing a black image."""
    import shutil

    from safetensors.torch import save_file

    from dyod.cli import main
    from dyod.embeddings import load_learned_embeds

    sample = ["--t0", "0.5", "-n", "2", "--num-inference-steps", "4", "--device", "cpu"]
    nan_prompt = tmp_path / "nan-prompt"
    shutil.copytree(fitted_run, nan_prompt)
    token, vectors = load_learned_embeds(fitted_run / "learned_embeds.safetensors")
    save_file({token: vectors * float("nan")}, str(nan_prompt / "learned_embeds.safetensors"))
    assert main(["sample", str(nan_prompt), *sample, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{nan_prompt / 'learned_embeds.safetensors'} holds non-finite values" in err and "--overwrite" in err
    assert not list((tmp_path / "a").glob("*.png")) if (tmp_path / "a").exists() else True

    nan_vae = tmp_path / "nan-vae"
    shutil.copytree(fitted_run, nan_vae)
    weights = load_file(str(nan_vae / "vae" / "model.safetensors"))
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = weights[first] * float("inf")
    save_file(weights, str(nan_vae / "vae" / "model.safetensors"))
    assert main(["sample", str(nan_vae), *sample, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{nan_vae / 'vae' / 'model.safetensors'} holds non-finite values" in err and "train-vae" in err

    for value, message in (("1e30", "--guidance-scale must be <= 1000.0"), ("-inf", "takes a finite number")):
        with pytest.raises(SystemExit) as refused:  # as the flag is read
            main(["sample", str(fitted_run), *sample, "--guidance-scale", value, "--out", str(tmp_path / "c")])
        assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

    monkeypatch.setattr(dyod.DyodPipeline, "decode", lambda self, latents: torch.full((len(latents), 3, 32, 32),
                                                                                      float("nan")))
    assert main(["sample", str(fitted_run), *sample, "--out", str(tmp_path / "d")]) == 2
    assert "non-finite values" in capsys.readouterr().err
    assert not list((tmp_path / "d").glob("*.png"))


def test_damaged_run_records_are_named_not_tracebacks(tmp_path, fitted_run, capsys):
    """run.json with a field of the wrong type made `dyod info` end in a TypeError traceback; a run folder whose
    run.json was deleted was described as a folder of images, with `dyod fit` on it suggested."""
    import shutil

    from dyod.cli import main

    edited = tmp_path / "edited"
    shutil.copytree(fitted_run, edited)
    record = json.loads((edited / "run.json").read_text())
    (edited / "run.json").write_text(json.dumps({**record, "model": 5}))
    for command in (["info", str(edited)], ["sample", str(edited), "-n", "1", "--out", str(tmp_path / "o")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{edited / 'run.json'} records model as 5 (int)" in err and "restore it from a copy" in err
    (edited / "run.json").write_text(json.dumps({**record, "stages": {"inversion": [1, 2]}}))
    assert main(["info", str(edited)]) == 2 and "records stages.inversion as [1, 2]" in capsys.readouterr().err

    lost = tmp_path / "lost"
    shutil.copytree(fitted_run, lost)
    (lost / "run.json").unlink()
    assert main(["info", str(lost)]) == 2
    err = capsys.readouterr().err
    assert "holds a run's files (learned_embeds.safetensors, vae/model.safetensors" in err
    assert "not its run.json" in err and "holds images" not in err


def test_divergence_names_only_checkpoints_that_exist_and_the_advice_works(tmp_path, tiny_model, shapes, fitted_run,
                                                                          monkeypatch, capsys):
    """A loss that turned NaN before the first checkpoint said "the last checkpoint ... is intact ... --resume", with no
    checkpoint to resume; after `train-vae --overwrite` failed, --resume went back to the earlier VAE's checkpoint."""
    import shutil

    from dyod import inversion, vae_training
    from dyod.cli import main

    real_loss, calls = inversion.inversion_loss, []

    def nan_from_step_three(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    invert = ["invert", str(shapes), "--model", str(tiny_model), "--out", str(tmp_path / "run"), "--steps", "6",
              "--batch-size", "2", "--sample-every", "0", "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setattr(inversion, "inversion_loss", nan_from_step_three)
        assert main([*invert, "--checkpoint-every", "100"]) == 2
    err = capsys.readouterr().err
    assert "before any checkpoint was written" in err and "--resume" not in err and "intact" not in err
    assert main([*invert, "--checkpoint-every", "100"]) == 0  # what it advises: the same command again
    capsys.readouterr()

    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(inversion, "inversion_loss", nan_from_step_three)
        assert main([*invert, "--checkpoint-every", "1", "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    checkpoint = tmp_path / "run2" / "inversion" / "checkpoint.safetensors"
    assert f"the last checkpoint in {checkpoint} is intact" in err and "with --resume" in err
    assert main([*invert, "--checkpoint-every", "1", "--out", str(tmp_path / "run2"), "--resume"]) == 0

    run = tmp_path / "vae-run"
    shutil.copytree(fitted_run, run)
    assert (run / "vae" / "checkpoint.safetensors").exists()
    real_vae_loss = vae_training.vae_loss
    train = ["train-vae", str(shapes), "--out", str(run), "--vae-epochs", "2", "--vae-batch-size", "4",
             "--vae-latent-dim", "8", "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setattr(vae_training, "vae_loss", lambda *a: tuple(v * float("nan") for v in real_vae_loss(*a)))
        assert main([*train, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "before any checkpoint was written" in err and "with --overwrite (the folder holds the earlier VAE)" in err
    assert not (run / "vae" / "checkpoint.safetensors").exists()  # the earlier VAE's: --resume cannot go back to it
    assert (run / "vae" / "model.safetensors").exists()  # the earlier VAE itself stays usable
    assert main([*train, "--overwrite"]) == 0


def test_one_writer_at_a_time_and_a_killed_holders_lock_is_taken_over(tmp_path, fitted_run, capsys, monkeypatch):
    """Two `dyod sample --out X` at once both wrote, and the record listed only the last one's images; two `fit
    --resume` on one run both trained. The second is now refused at once, naming the holder; a lock whose process was
    killed is taken by the next command."""
    from dyod.cli import main
    from dyod.locking import folder_lock

    monkeypatch.setenv("DYOD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "samples"
    sample = ["sample", str(fitted_run), "--t0", "0.5", "-n", "2", "--num-inference-steps", "4", "--device", "cpu",
              "--out", str(out)]
    with folder_lock(out, "output folder", command="dyod sample (the first)"):
        assert main(sample) == 2
        err = capsys.readouterr().err
        assert f"output folder {out} is in use by another dyod process (pid {os.getpid()}" in err
        assert "`dyod sample (the first)`" in err and not out.exists()
        with folder_lock(fitted_run, "run folder"):  # the run is only read by sampling: not held
            pass
    assert main(sample) == 0 and len(list(out.glob("seed-*.png"))) == 2
    capsys.readouterr()

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dyod.locking import folder_lock\n"
                               f"with folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "DYOD_CACHE": str(tmp_path / "cache")})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*sample, "--overwrite"]) == 2
        assert f"(pid {holder.pid} on" in capsys.readouterr().err
        holder.kill()
        holder.wait()
        assert main([*sample, "--overwrite"]) == 0  # the killed process's lock went with it
    finally:
        holder.kill()


def test_a_damaged_checkpoint_of_a_finished_stage_does_not_block_the_next(tmp_path, tiny_model, shapes, capsys):
    """The dataset prompt finished, its checkpoint then damaged: `fit --resume` of the stopped custom VAE refused on
    that checkpoint (and the --overwrite it advised would redo both stages), and `dyod info` garbled the line."""
    from dyod.cli import main

    run = tmp_path / "run"
    fit = ["fit", str(shapes), "--model", str(tiny_model), "--out", str(run), "--steps", "3", "--batch-size", "2",
           "--sample-every", "0", "--vae-epochs", "4", "--vae-batch-size", "4", "--vae-latent-dim", "8",
           "--vae-checkpoint-every", "2", "--device", "cpu"]
    import dyod.vae_training as vae_training

    real, epochs = vae_training.vae_loss, []

    def interrupt_in_epoch_three(*args):
        epochs.append(1)
        if len(epochs) == 2 * 3:  # 12 images, batch 4: three updates an epoch; the first update of epoch three
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        vae_training.vae_loss = interrupt_in_epoch_three
        assert main(fit) == 130
    finally:
        vae_training.vae_loss = real
        signal.signal(signal.SIGINT, previous)
    checkpoint = run / "inversion" / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # cut short
    prompt = (run / "learned_embeds.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "dataset prompt S*:" in out and "damaged" not in out.split("dataset prompt S*:")[1].split("\n")[0]
    assert main(["fit", str(shapes), "--model", str(tiny_model), "--out", str(run), "--resume", "--device", "cpu"]) == 0
    assert (run / "learned_embeds.safetensors").read_bytes() == prompt  # the finished stage was kept as it was
    assert json.loads((run / "run.json").read_text())["stages"]["vae"]["config"]["epochs"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only: skipped where mounting is not allowed), unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_named_and_the_records_agree_with_the_files(small_disk, tiny_model, shapes, fitted_run, capsys):
    """Before: `fit` on a full disk ended in a SafetensorError traceback (exit 1), a VAE finished as the disk filled had
    no record in run.json, and `sample` said "[Errno 28]" without the path and left an empty seed-....png.tmp."""
    from dyod.cli import main
    from dyod.run import Run

    run = small_disk / "run"
    fit = ["fit", str(shapes), "--model", str(tiny_model), "--out", str(run), "--steps", "20", "--checkpoint-every",
           "10", "--sample-every", "0", "--batch-size", "2", "--vae-epochs", "4", "--vae-checkpoint-every", "2",
           "--vae-batch-size", "4", "--device", "cpu"]
    code = main(fit)
    err = capsys.readouterr().err
    if code == 0:  # it fitted on 3 MiB: fill the disk and try the last step again
        pytest.skip("the run fitted within the small disk")
    assert code == 2 and "Traceback" not in err and "disk is full" in err and str(small_disk) in err
    assert "free some space" in err
    info = Run.open(run).info if (run / "run.json").exists() else {"stages": {}}
    assert ("vae" in info["stages"]) == (run / "vae" / "model.safetensors").exists()
    assert ("inversion" in info["stages"]) == (run / "learned_embeds.safetensors").exists()
    assert not list(small_disk.rglob("*.tmp"))

    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill what is left
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    out = small_disk / "samples"
    assert main(["sample", str(fitted_run), "--t0", "0.5", "-n", "2", "--num-inference-steps", "4", "--device", "cpu",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and str(out) in err and "Traceback" not in err
    assert not list(small_disk.rglob("*.tmp"))
