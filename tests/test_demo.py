"""The main job at a tiny size: it completes and writes its report."""

from dyod.demo import DemoConfig, run_demo


def test_demo_smoke_writes_report(tmp_path):
    config = DemoConfig(num_images=8, inversion_steps=2, vae_epochs=2, num_samples=2, t0s=(0.5, 1.0), num_inference_steps=4)
    report = run_demo(tmp_path / "demo", config, progress=False)
    text = report.read_text()
    assert "| 0.50 | 2 |" in text and "| 1.00 | 4 |" in text  # round(t0·T) UNet calls
    for name in ("samples_t0_0.50.png", "samples_t0_1.00.png", "samples_vae_alone.png", "dataset.png"):
        assert (tmp_path / "demo" / name).exists()
