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
