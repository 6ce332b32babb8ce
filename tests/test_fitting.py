"""``dyod.fit``: both training stages and the choice of t0, as ``dyod fit`` runs them, from Python."""

import json

import pytest

import dyod
from dyod.errors import DyodError


def test_every_public_name_resolves():
    for name in dyod.__all__:  # `from dyod import *` reads them all
        assert getattr(dyod, name) is not None, name
    assert callable(dyod.fit) and dyod.fit.__module__ == "dyod.fitting"


def test_fit_runs_both_stages_and_chooses_t0(tmp_path, shapes, tiny_model):
    stages = dict(inversion_config=dyod.InversionConfig(steps=2, batch_size=2, checkpoint_every=0, sample_every=0),
                  vae_config=dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4), progress=False, device="cpu")
    with pytest.raises(DyodError, match="give --holdout-fraction above 0"):  # before any training
        dyod.fit(shapes, tiny_model, tmp_path / "run", choose_t0=True, **stages)
    assert not (tmp_path / "run").exists()
    run = dyod.fit(shapes, tiny_model, tmp_path / "run", data_config=dyod.DataConfig(holdout_fraction=0.3),
                   choose_t0=True, choose_t0_samples=2, **stages)
    info = json.loads((run / "run.json").read_text())
    assert set(info["stages"]) == {"inversion", "vae"}
    assert info["chosen_t0"]["n"] == 2 and 0 < info["chosen_t0"]["t0"] < 1
    assert (run / "learned_embeds.safetensors").exists() and (run / "vae" / "model.safetensors").exists()
    assert (run / "t0_sweep" / "sweep.md").exists()


def test_fit_with_an_imported_s_star_chooses_t0_and_warns_that_s_star_may_have_seen_the_held_out_images(
        tmp_path, shapes, tiny_model, fitted_run, caplog):
    source = fitted_run / "learned_embeds.safetensors"
    run = dyod.fit(shapes, tiny_model, tmp_path / "run", vae_config=dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4),
                   data_config=dyod.DataConfig(holdout_fraction=0.3), choose_t0=True, choose_t0_samples=2,
                   progress=False, device="cpu", embedding=source)
    info = json.loads((run / "run.json").read_text())
    assert info["stages"]["inversion"]["imported_from"] == str(source.resolve()) and 0 < info["chosen_t0"]["t0"] < 1
    # the run's data record counts what the stages train on: the held-out images are not in it
    assert info["data"]["num_images"] < json.loads((fitted_run / "run.json").read_text())["data"]["num_images"]
    assert any("perhaps on them too" in r.message and r.levelname == "WARNING" for r in caplog.records)


REPLACED = {'"my_images"': None, '"/models/stable-diffusion-v1-5"': None, "steps=3000": "steps=2", "epochs=100": "epochs=1",
            "choose_t0=True": "choose_t0=True, choose_t0_samples=2", "pipe.sample(16": "pipe.sample(2"}


def test_the_readmes_python_example_runs(tmp_path, shapes, tiny_model, monkeypatch):
    """The README's ten-line Python example, run as written with the tiny model, the test images and small step counts
    in place of the example's (each replaced text must still be in the README)."""
    import re
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    for old, new in {**REPLACED, '"my_images"': repr(str(shapes)), '"/models/stable-diffusion-v1-5"': repr(str(tiny_model))
                     }.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace = {"my_sketches": [Image.open(p) for p in sorted(shapes.glob("*.png"))[:2]]}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["images"]) == 2 and len(namespace["edits"]) == 2 and len(namespace["frames"]) == 8
    assert len(namespace["rows"]) == 6
    assert json.loads((tmp_path / "runs" / "shoes" / "run.json").read_text())["chosen_t0"]["n"] == 2


def test_the_python_api_guide_runs(tmp_path, shapes, tiny_model, monkeypatch):
    """docs/python-api.md's block, run as written with the tiny model, the test images and small step counts in place
    of the example's (each replaced text must still be in the guide)."""
    import re
    from pathlib import Path

    import torch
    from diffusers import UNet2DConditionModel
    from PIL import Image

    readme = (Path(__file__).parents[1] / "docs" / "python-api.md").read_text()
    code = re.search(r"# Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    for old, new in {'"my_images"': repr(str(shapes)), '"/models/stable-diffusion-v1-5"': repr(str(tiny_model)),
                     "steps=3000": "steps=2", "epochs=100": "epochs=1",
                     "choose_t0=True": "choose_t0=True, choose_t0_samples=2", 'compile="reduce-overhead"': 'compile="none"',
                     "pipe.sample(16": "pipe.sample(2", "50_000": "3"}.items():
        assert old in code, old
        code = code.replace(old, new)
    unet = UNet2DConditionModel.load_config(tiny_model, subfolder="unet")
    latent = (1, unet["in_channels"], unet["sample_size"], unet["sample_size"])
    namespace = {"my_pil_images": [Image.open(p) for p in sorted(shapes.glob("*.png"))[:2]],
                 "init_latents": torch.randn(latent), "noise": torch.randn(latent)}
    monkeypatch.chdir(tmp_path)  # the example's runs/ folder
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["images"]) == 2 and len(namespace["edits"]) == 2 and len(namespace["frames"]) == 8
    assert len(namespace["column"]) == 3 and len(namespace["rows"]) == 9 and len(namespace["between"]) == 4
    assert namespace["latents"].shape == latent
    assert json.loads((tmp_path / "runs" / "shoes-fit" / "run.json").read_text())["chosen_t0"]["n"] == 2
    imported = json.loads((tmp_path / "runs" / "shoes-ti" / "run.json").read_text())["stages"]["inversion"]
    assert imported["imported_from"] == str(tmp_path / "runs" / "shoes" / "learned_embeds.safetensors")


def test_configs_made_in_python_keep_the_bounds_their_flags_have():
    """The bounds the CLI checks as it parses a flag hold for a config made in Python too, before any work: before,
    ``InversionConfig(seed=2**64)`` crashed inside torch after the run folder was made."""
    from dyod.seeding import randn_per_seed
    from dyod.world.prior_training import PretrainConfig

    for make, message in ((lambda: dyod.InversionConfig(steps=0), "steps must be >= 1, got 0"),
                          (lambda: dyod.InversionConfig(seed=2**64), f"seed must be in [0, {2**63 - 1}], got {2**64}"),
                          (lambda: dyod.VAEConfig(seed=-1), "seed must be in [0,"),
                          (lambda: dyod.SampleConfig(batch_size=0), "batch_size must be >= 1, got 0"),
                          # before: taken, and refused only at the first batch (t0) or made NaN images (guidance)
                          (lambda: dyod.SampleConfig(t0=2), "t0 must be a fraction of T in (0, 1], got 2"),
                          (lambda: dyod.SampleConfig(t0=0.0), "t0 must be a fraction of T in (0, 1], got 0.0"),
                          (lambda: dyod.SampleConfig(guidance_scale=float("nan")),
                           "guidance_scale must be a finite number, got nan"),
                          (lambda: dyod.DataConfig(max_images=-1), "max_images must be >= 0, got -1"),
                          (lambda: PretrainConfig(corpus_seed=-5), "corpus_seed must be in [0,")):
        with pytest.raises(ValueError) as e:
            make()
        assert message in str(e.value)
    assert dyod.InversionConfig(seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*64\)"):  # past 2**64 a seed aliased a smaller one
        randn_per_seed([2**64], (2,), 0)
