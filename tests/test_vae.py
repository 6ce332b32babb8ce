"""Stage 2: the vanilla VAE (PyTorch-VAE) and its training."""

import json

import pytest
import torch

import dyod
from dyod.errors import DyodError
from dyod.vae import VanillaVAE, default_hidden_dims, load_vae, save_vae, vae_loss
from dyod.vae_training import vae_resolution


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
def test_shapes_at_each_resolution(resolution):
    dims = default_hidden_dims(resolution, (32, 64, 128, 256, 512))
    model = VanillaVAE(resolution, 10, dims).eval()
    x = torch.rand(2, 3, resolution, resolution) * 2 - 1
    recons, mu, log_var = model(x)
    assert recons.shape == x.shape and mu.shape == (2, 10) and log_var.shape == (2, 10)
    assert recons.abs().max() <= 1
    assert model.decode(torch.zeros(1, 10)).shape == (1, 3, resolution, resolution)


def test_default_resolution_follows_the_dataset():
    config = dyod.VAEConfig()
    assert vae_resolution(config, 64) == 64
    assert vae_resolution(config, 200) == 128
    assert vae_resolution(config, 100) == 64
    assert vae_resolution(dyod.VAEConfig(resolution=32), 512) == 32
    with pytest.raises(DyodError, match="power of two"):
        VanillaVAE(48, 4, (32, 64))


def test_kl_term_is_zero_at_the_prior():
    x = torch.zeros(2, 3, 4, 4)
    loss, rec, kld = vae_loss(x, x, torch.zeros(2, 5), torch.zeros(2, 5), kl_scale=1.0)
    assert loss == 0 and kld == 0


def test_save_load_round_trip_and_pickles_refused(tmp_path):
    model = VanillaVAE(32, 6, (16, 32, 32, 32)).eval()
    save_vae(model, tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    z = torch.randn(3, 6)
    assert torch.equal(model.decode(z), loaded.decode(z))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "model.pt").write_bytes(b"x")
    with pytest.raises(DyodError, match="pickles are refused"):
        load_vae(tmp_path / "pickled")


def test_training_reduces_reconstruction_error_and_writes_samples(tmp_path, shapes):
    folder = dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=15, batch_size=4, latent_dim=16,
                            learning_rate=5e-3, sample_every=5), progress=False, device="cpu")
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(log) == 15
    assert log[-1]["recon"] < 0.5 * log[0]["recon"]
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["epoch-0005.png", "epoch-0010.png", "epoch-0015.png"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["resolution"] == 32 and config["training"]["epochs"] == 15
    with pytest.raises(DyodError, match="already holds a trained VAE"):
        dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=1), progress=False, device="cpu")


def test_a_resolution_the_vae_cannot_take_is_refused_before_any_image_is_read(tmp_path, shapes, monkeypatch):
    import dyod.data

    def no_reading(*args, **kwargs):
        raise AssertionError("read the dataset for a VAE that cannot train")

    monkeypatch.setattr(dyod.data, "load_image", no_reading)
    with pytest.raises(DyodError, match="the VAE resolution must be a power of two >= 16, got 24"):
        dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(resolution=24), progress=False, device="cpu")


def test_unreadable_images_are_skipped_and_listed_and_none_readable_is_an_error(tmp_path, shapes):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "broken.png").write_bytes(b"not a png")
    config = dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4)
    dyod.train_vae(data, tmp_path / "run", config, progress=False, device="cpu")
    stats = json.loads((tmp_path / "run" / "data.json").read_text())
    assert stats["num_images"] == 12 and [s["path"] for s in stats["skipped"]] == [str(data / "broken.png")]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nope")
    with pytest.raises(DyodError, match=r"none of the 1 image files in .*bad could be read; first problem: .*a.png"):
        dyod.train_vae(tmp_path / "bad", tmp_path / "run2", config, progress=False, device="cpu")
