"""Stage 2: the vanilla VAE (PyTorch-VAE) and its training."""

import json

import pytest
import torch

import dyod
from dyod.errors import DyodError
from dyod.vae import VanillaVAE, default_hidden_dims, load_vae, save_vae, vae_loss
from dyod.vae_training import epoch_batches, vae_resolution


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
def test_shapes_at_each_resolution(resolution):
    dims = default_hidden_dims(resolution, (32, 64, 128, 256, 512))
    model = VanillaVAE(resolution, 10, dims).eval()
    x = torch.rand(2, 3, resolution, resolution) * 2 - 1
    recons, mu, log_var = model(x)
    assert recons.shape == x.shape and mu.shape == (2, 10) and log_var.shape == (2, 10)
    assert recons.abs().max() <= 1
    assert model.decode(torch.zeros(1, 10)).shape == (1, 3, resolution, resolution)


def test_each_process_trains_on_its_own_share_of_an_epoch():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    # One process: consecutive batches of the shuffled order, the incomplete last one dropped (as always).
    assert [b.tolist() for b in epoch_batches(order, 4)] == [order[i : i + 4].tolist() for i in range(0, 20, 4)]
    # Three processes: each update takes 3 × 4 images, a disjoint 4 per process; the epoch covers the order once.
    shares = [list(epoch_batches(order, 4, rank, 3)) for rank in range(3)]
    assert all(len(share) == 23 // 12 for share in shares)
    seen = torch.cat([b for share in shares for b in share]).tolist()
    assert sorted(seen) == sorted(order[:12].tolist()) and len(set(seen)) == 12


def test_each_process_of_a_launch_trains_on_its_own_images_with_its_own_noise(tmp_path, shapes, monkeypatch):
    """train_vae as each process of a two-process launch runs it (its accelerator says rank r of 2; averaging the
    gradients is DistributedDataParallel's part, not shown here): in every epoch the two train on disjoint images that
    together cover the dataset, and draw different reparameterization noise."""
    import dyod.performance
    from dyod.vae import VanillaVAE

    new_accelerator, forward = dyod.performance.new_accelerator, VanillaVAE.forward
    seen: dict[int, list] = {}

    class Rank:  # a real single-process accelerator, as process `index` of 2 sees it
        num_processes = 2

        def __init__(self, accelerator, index):
            self.accelerator, self.process_index, self.is_main_process = accelerator, index, index == 0

        def reduce(self, tensor, reduction):
            return tensor

        def __getattr__(self, name):
            return getattr(self.accelerator, name)

    def recording(model, x, noise=None):
        seen[rank].append(([row.numpy().tobytes() for row in x], noise))
        return forward(model, x, noise)

    monkeypatch.setattr(VanillaVAE, "forward", recording)
    for rank in (0, 1):
        seen[rank] = []
        monkeypatch.setattr(dyod.performance, "new_accelerator", lambda **kw: Rank(new_accelerator(**kw), rank))
        dyod.train_vae(shapes, tmp_path / f"run{rank}", dyod.VAEConfig(epochs=2, batch_size=2, latent_dim=4),
                       progress=False, device="cpu")
    assert (tmp_path / "run0" / "vae" / "model.safetensors").exists()  # the main process alone writes the VAE
    assert not (tmp_path / "run1" / "vae" / "model.safetensors").exists()
    assert len(seen[0]) == len(seen[1]) == 2 * 12 // 4  # 12 images, 2 per process per update, two epochs
    for epoch in (slice(0, 3), slice(3, 6)):
        images = [{image for batch, _ in seen[rank][epoch] for image in batch} for rank in (0, 1)]
        assert len(images[0]) == len(images[1]) == 6 and not images[0] & images[1]
    for (_, noise_0), (_, noise_1) in zip(seen[0], seen[1]):
        assert noise_0.shape == (2, 4) and not torch.equal(noise_0, noise_1)


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
    with pytest.raises(DyodError, match="already holds a custom VAE; pass --resume"):
        dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=1), progress=False, device="cpu")


def test_latent_activity_is_the_variance_of_the_posterior_mean_and_the_mean_kl_per_dimension():
    """Burda et al. (2016)'s activity per dimension, computed a batch at a time, against the whole batch at once: a
    dimension the encoder maps every image to the same value has none (dims 1 and 3 here), and the most active come
    first."""
    from dyod.vae import latent_activity, most_active_dimensions

    torch.manual_seed(0)
    model = VanillaVAE(16, latent_dim=5, hidden_dims=(8, 16))
    with torch.no_grad():
        model.fc_mu.weight[[1, 3]] = 0.0  # the same mean for every image
        model.fc_mu.weight[4] *= 40.0  # far more spread than the others
        model.fc_mu.bias[4] = 2.0  # a mean away from 0 adds to the KL, not to the variance
    pixels = torch.randint(0, 256, (11, 3, 16, 16), dtype=torch.uint8)
    activity = latent_activity(model, pixels, batch_size=4)
    assert not model.training and activity["num_images"] == 11
    with torch.no_grad():
        mu, log_var = model.encode(pixels.double().float() / 127.5 - 1.0)
    mu, log_var = mu.double(), log_var.double()
    variance = torch.tensor(activity["posterior_mean_variance"], dtype=torch.float64)
    torch.testing.assert_close(variance, mu.var(dim=0, unbiased=False), rtol=1e-6, atol=1e-12)
    kl = (-0.5 * (1 + log_var - mu**2 - log_var.exp())).mean(dim=0)
    torch.testing.assert_close(torch.tensor(activity["mean_kl"], dtype=torch.float64), kl, rtol=1e-6, atol=1e-9)
    assert variance[1] == 0 and variance[3] == 0 and variance[4] > 0.01
    assert most_active_dimensions(activity, 5)[0] == 4 and most_active_dimensions(activity, 5)[3:] == [1, 3]
    assert most_active_dimensions(activity, 2) == most_active_dimensions(activity, 5)[:2]
    assert activity["active_dimensions"] == int((variance > 0.01).sum()) and 1 <= activity["active_dimensions"] <= 3
    _assert_same_activity(latent_activity(model, pixels, batch_size=256), activity)
    with pytest.raises(DyodError, match="at least one image"):
        latent_activity(model, pixels[:0])


def _assert_same_activity(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["num_images"] == b["num_images"]
    assert a["active_dimensions"] == b["active_dimensions"]
    for key in ("posterior_mean_variance", "mean_kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key


def test_training_records_how_much_the_vae_uses_each_latent_dimension(tmp_path, shapes):
    """The activity on the training images is written beside the weights, and the count of active dimensions in the
    run's record of the stage; it is what the saved VAE gives on those images."""
    from dyod.data import dataset_files
    from dyod.run import ACTIVITY_FILE
    from dyod.vae import latent_activity
    from dyod.vae_training import read_pixels

    folder = dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=2, batch_size=4, latent_dim=8),
                            progress=False, device="cpu")
    recorded = json.loads((folder / ACTIVITY_FILE).read_text())
    assert recorded["num_images"] == 12 and len(recorded["posterior_mean_variance"]) == 8
    pixels, _ = read_pixels(shapes, dataset_files(shapes), 32, dyod.DataConfig())
    _assert_same_activity(latent_activity(load_vae(folder), pixels), recorded)
    stage = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["vae"]
    assert stage["active_dimensions"] == recorded["active_dimensions"]


def test_a_resolution_the_vae_cannot_take_is_refused_in_its_config():
    for resolution in (8, 24):
        with pytest.raises(ValueError, match=f"--vae-resolution must be 0 .* or a power of two >= 16, got {resolution}"):
            dyod.VAEConfig(resolution=resolution)
    with pytest.raises(ValueError, match="--vae-hidden-dims takes positive channel counts"):
        dyod.VAEConfig(hidden_dims=())


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


def test_a_stopped_vae_training_resumes_to_the_uninterrupted_result(tmp_path, shapes, monkeypatch):
    """A checkpoint every epoch (weights, BatchNorm statistics, Adam, the learning-rate schedule, the shuffling
    generator): a run stopped in its third epoch and resumed ends where an uninterrupted run ends, bit for bit, and
    logs each epoch once; a finished run resumed with more epochs goes on."""
    from safetensors.torch import load_file

    import dyod.vae_training
    from dyod.cli import main

    config = dyod.VAEConfig(epochs=4, batch_size=4, latent_dim=4, checkpoint_every=1)
    dyod.train_vae(shapes, tmp_path / "whole", config, progress=False, device="cpu")

    calls, loss = 0, dyod.vae_training.vae_loss

    def stops_in_epoch_three(*args):
        nonlocal calls
        calls += 1
        if calls == 8:  # 12 images at batch 4: three steps an epoch
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(dyod.vae_training, "vae_loss", stops_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        dyod.train_vae(shapes, tmp_path / "stopped", config, progress=False, device="cpu")
    monkeypatch.setattr(dyod.vae_training, "vae_loss", loss)
    assert not (tmp_path / "stopped" / "vae" / "model.safetensors").exists()
    with pytest.raises(DyodError, match="already holds a custom VAE; pass --resume to continue it or --overwrite"):
        dyod.train_vae(shapes, tmp_path / "stopped", config, progress=False, device="cpu")
    dyod.train_vae(shapes, tmp_path / "stopped", config, progress=False, device="cpu", resume=True)
    whole = load_file(str(tmp_path / "whole" / "vae" / "model.safetensors"))
    stopped = load_file(str(tmp_path / "stopped" / "vae" / "model.safetensors"))
    assert all(torch.equal(whole[k], stopped[k]) for k in whole)
    assert ((tmp_path / "stopped" / "vae" / "log.jsonl").read_text()
            == (tmp_path / "whole" / "vae" / "log.jsonl").read_text())  # epochs 1-4, once each, the same losses

    assert main(["train-vae", str(shapes), "--out", str(tmp_path / "whole"), "--resume", "--vae-epochs", "5",
                 "--vae-batch-size", "4", "--vae-latent-dim", "4", "--device", "cpu"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "whole" / "vae" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5]


def test_resuming_a_vae_on_other_data_or_without_a_checkpoint_is_refused(tmp_path, shapes):
    config = dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4)
    with pytest.raises(DyodError, match="holds no run"):  # nothing there: refused before anything is made
        dyod.train_vae(shapes, tmp_path / "run", config, progress=False, device="cpu", resume=True)
    assert not (tmp_path / "run").exists()
    dyod.Run.open_or_create(tmp_path / "run")  # a run (say, with its prompt learned) whose VAE never started
    with pytest.raises(DyodError, match="does not exist, so the custom VAE has nothing to resume"):
        dyod.train_vae(shapes, tmp_path / "run", config, progress=False, device="cpu", resume=True)
    dyod.train_vae(shapes, tmp_path / "run", config, progress=False, device="cpu")
    fewer = dyod.DataConfig(max_images=8)
    with pytest.raises(DyodError, match=r"training on other data \(num_images differ: 12 then, 8 now\)"):
        dyod.train_vae(shapes, tmp_path / "run", dyod.VAEConfig(epochs=2, batch_size=4, latent_dim=4), fewer,
                       progress=False, device="cpu", resume=True)


def test_a_vae_resumed_from_the_command_line_keeps_the_settings_it_was_started_with(tmp_path, shapes, capsys, caplog):
    """`train-vae --resume` without the flags the run was started with took the defaults: a latent of 128 where the
    checkpoint held 4 crashed on loading the weights, a batch size or KL weight changed silently. The flags not given
    are now the run's own; another shape is refused; another learning rate is taken (as the advice after a
    non-finite loss says), with a warning."""
    from safetensors.torch import load_file

    from dyod.checkpoint import checkpoint_meta
    from dyod.cli import main

    flags = ["--vae-batch-size", "4", "--vae-latent-dim", "4", "--vae-kld-weight", "0.01", "--device", "cpu"]
    assert main(["train-vae", str(shapes), "--out", str(tmp_path / "whole"), "--vae-epochs", "2", *flags]) == 0
    assert main(["train-vae", str(shapes), "--out", str(tmp_path / "run"), "--vae-epochs", "1", *flags]) == 0
    assert main(["train-vae", str(shapes), "--out", str(tmp_path / "run"), "--vae-epochs", "2", "--resume"]) == 0
    whole = load_file(str(tmp_path / "whole" / "vae" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "run" / "vae" / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    capsys.readouterr()
    assert main(["train-vae", str(shapes), "--out", str(tmp_path / "run"), "--resume", "--vae-latent-dim", "8"]) == 2
    assert "was made with other settings (latent_dim 4 then, 8 now), which shape what it holds" in capsys.readouterr().err
    assert main(["train-vae", str(shapes), "--out", str(tmp_path / "run"), "--vae-epochs", "3", "--resume",
                 "--vae-learning-rate", "0.001"]) == 0
    assert "(learning_rate 0.005 then, 0.001 now)" in caplog.text
    schedule = checkpoint_meta(tmp_path / "run" / "vae" / "checkpoint.safetensors")["scheduler"]
    assert schedule["base_lrs"] == [0.001] and schedule["_last_lr"][0] == pytest.approx(0.001 * 0.95**3)
