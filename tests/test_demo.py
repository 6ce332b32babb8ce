"""The main job at a tiny size, on the bundled reference prior: it completes and writes its report."""

import json

import pytest

from dyod.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_smoke_writes_report(tmp_path):
    config = DemoConfig(num_images=12, inversion_steps=2, inversion_batch_size=2, vae_epochs=1, num_samples=4,
                        t0s=(0.5, 1.0), num_inference_steps=4)
    report = run_demo(tmp_path / "demo", config, progress=False)
    text = report.read_text()
    assert "| DYOD t0 = 0.5 | 2 | ×2.00 |" in text and "| prior + S* alone (t0 = 1) | 4 | ×1.00 |" in text
    assert "KID × 100" in text and "VAE alone" in text
    for name in ("samples_t0_0.50.png", "samples_t0_1.00.png", "samples_vae_alone.png", "dataset.png"):
        assert (tmp_path / "demo" / name).exists()
    from PIL import Image

    with Image.open(tmp_path / "demo" / "overview.png") as overview:  # four labelled rows of 4 images of 64 px
        assert overview.height == 4 * (64 + 2 * 2) and overview.width == 150 + 4 * 64 + 5 * 2
    assert "![](overview.png)" in text
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["VAE alone", "DYOD t0 = 0.5", "prior + S* alone (t0 = 1)"]
    assert all(isinstance(r["kid_x100"], float) for r in rows)
    floor = json.loads((tmp_path / "demo" / "demo.json").read_text())["autoencoder_floor"]["kid_x100"]
    assert "| dataset images through the prior's autoencoder (the floor) | - | - |" in text and f"{floor:.2f}" in text
    assert "![](run/inversion/samples/step-000000.png) ![](run/inversion/samples/step-000002.png)" in text
    assert (tmp_path / "demo" / "dataset_through_autoencoder.png").exists()
    assert "![KID against t0](kid_vs_t0.png)" in text and (tmp_path / "demo" / "kid_vs_t0.png").stat().st_size > 1000

    # latent manipulation at the best t0 < 1: an interpolation with ε fixed and the 3 most used dimensions traversed
    from PIL import Image

    from dyod.run import ACTIVITY_FILE
    from dyod.vae import most_active_dimensions

    made = json.loads((tmp_path / "demo" / "demo.json").read_text())["latent_manipulation"]
    activity = json.loads((tmp_path / "demo" / "run" / "vae" / ACTIVITY_FILE).read_text())
    assert made["t0"] == 0.5 and made["traversed_dimensions"] == most_active_dimensions(activity, 3)
    assert "## Latent manipulation at t0 = 0.5 (the best DYOD row)" in text
    assert f"({', '.join(map(str, made['traversed_dimensions']))}: the largest variances" in text
    assert "![](interpolation.png)" in text and "![](traversal.png)" in text
    width, height = Image.open(tmp_path / "demo" / "traversal.png").size
    assert 7 * 64 < width < 8 * 64 and 3 * 64 < height < 4 * 64  # 7 values, a row per dimension
    width, height = Image.open(tmp_path / "demo" / "interpolation.png").size
    assert 8 * 64 < width < 9 * 64 and 64 < height < 2 * 64

    # image initialization: a row of painted strokes, a row per t0 < 1 of what S* makes of them, and the baseline's
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["image_initialization"] == {
        "strokes": 8, "stroke_seed": 1, "t0s": [0.5], "baseline_prompt": "a photo of object", "baseline_t0": 0.5}
    assert ("perturbed to t' = 0.5 (the rows below) and denoised with S*; the last row, the paper's baseline: t' = 0.5 "
            "with \"a photo of object\", the prompt without S* (Fig. 5): ![](image_initialization.png)") in text
    width, height = Image.open(tmp_path / "demo" / "image_initialization.png").size
    assert 8 * 64 < width < 9 * 64 and 3 * 64 < height < 4 * 64


def test_the_sweep_plot_draws_the_floor_when_given():
    from dyod.sweep import SweepRow, sweep_figure

    rows = [SweepRow("VAE alone", None, 200.0, 5.0, 0, 0.01, 4), SweepRow("t0=0.50", 0.5, 300.0, 6.0, 2, 0.1, 4),
            SweepRow("t0=1.00", 1.0, 310.0, 6.0, 4, 0.2, 4)]
    lines = {line.get_label(): line.get_ydata()[0] for line in sweep_figure(rows, floor=150.0).axes[0].get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"VAE alone": 200.0, "dataset through the prior's autoencoder (floor)": 150.0}


def test_the_verdict_says_what_the_numbers_say():
    from dyod.demo import verdict
    from dyod.evaluation import KIDResult

    def k(value):
        return KIDResult(value / 100, 0.0, 2, 1, 2, 2)

    assert verdict(k(100), k(200), k(150), k(50)) == "DYOD beats both baselines."
    assert verdict(k(300), k(200), k(150), k(50)) == "DYOD beats neither baseline."
    said = verdict(k(700), k(200), k(750), k(550))
    assert said.startswith("DYOD beats the prior + S* alone but not the VAE alone. No t0 can beat the VAE alone "
                           "with this prior: its autoencoder")
    assert "scoring 550.00, above the VAE alone's 200.00" in said
    assert verdict(k(300), k(200), k(350), k(100)) == "DYOD beats the prior + S* alone but not the VAE alone."
