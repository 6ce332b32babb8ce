"""The t0 sweep (Table 1), automatic t0, and sweep-transform on the tiny fixture."""

import json

import pytest
from PIL import Image

import dyod
from dyod import SampleConfig
from dyod.cli import main
from dyod.errors import DyodError
from dyod.sweep import SweepRow, choose_t0, markdown_table, sweep

FAST = SampleConfig(num_inference_steps=10, guidance_scale=2.0)


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory, tiny_model, shapes):
    out = tmp_path_factory.mktemp("sweep") / "run"
    data = dyod.DataConfig(holdout_fraction=0.3)
    dyod.invert(shapes, tiny_model, out, dyod.InversionConfig(steps=2, batch_size=2), data, progress=False, device="cpu")
    dyod.train_vae(shapes, out, dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4), data, progress=False, device="cpu")
    return out


def test_holdout_split_is_stable_and_disjoint(shapes, holdout_run):
    from dyod.data import load_image_folder
    from dyod.run_info import describe_run

    assert describe_run(holdout_run).splitlines()[2].endswith(
        ", 0.3 of the folder held out (--holdout-fraction; `dyod tune` chooses t0 on it)")

    train = load_image_folder(shapes, holdout_fraction=0.3, split="train").paths
    held = load_image_folder(shapes, holdout_fraction=0.3, split="heldout").paths
    assert train and held and not set(train) & set(held)
    assert sorted(train + held) == load_image_folder(shapes).paths
    with pytest.raises(DyodError, match="holdout-fraction must be in"):
        load_image_folder(shapes, holdout_fraction=1.0)


def test_the_table_names_every_t0_with_its_own_digits():
    rows = [SweepRow(f"t0={t}", t, 1.0, 0.1, 1, 0.1, 4) for t in (0.05, 0.1, 0.1 + 0.2)]
    header = markdown_table(rows, 50).splitlines()[0]
    assert header == "| | 0.05T | 0.1T | 0.3T |"  # 0.05 was shown as 0.1T, a second 0.1 column


def test_sweep_produces_a_complete_table(fitted_run, tmp_path):
    rows = sweep(fitted_run, [0.3, 0.6, 1.0], n=4, config=FAST, out=tmp_path, progress=False)
    assert [r.label for r in rows] == ["VAE alone", "t0=0.30", "t0=0.60", "t0=1.00"]
    assert [r.unet_calls for r in rows] == [0, 3, 6, 10]
    assert all(r.n == 4 and r.kid_x100 == r.kid_x100 for r in rows)  # numbers, not NaN
    table = (tmp_path / "sweep.md").read_text()
    assert table.splitlines()[0] == "| | 0.3T | 0.6T | prior + S* (t0 = T) | VAE |"
    for label in ("KID × 100", "UNet calls", "speed, paper's T/t0", "speed, measured", "s / image"):
        assert f"| {label} |" in table
    assert "×3.33" in table and "×1.00" in table
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "sweep.png").stat().st_size > 1000
    assert table.count("**") == 2  # the best DYOD t0 is marked
    assert markdown_table(rows, 10) == table.strip()
    # again into the same folder (the CLI's --overwrite) at other t0s: the earlier sweep's other grids go
    (tmp_path / "notes.txt").write_text("mine")
    sweep(fitted_run, [0.6], n=4, config=FAST, out=tmp_path, progress=False)
    grids = sorted(p.name for p in tmp_path.glob("samples_*.png"))
    assert grids == sorted(r["grid"] for r in json.loads((tmp_path / "sweep.json").read_text())["rows"])
    assert len(grids) == 2 and (tmp_path / "notes.txt").exists()  # VAE alone and t0 = 0.6


def test_a_sweep_without_t0_1_shows_no_speed_it_did_not_measure(fitted_run, tmp_path):
    """The measured speed-up is against t0 = 1: a sweep of t0 < 1 alone (``tune``) has neither its table row (before:
    a row of dashes) nor the plot's second axis (before: an empty 0..1 axis) nor a legend naming t0 = 1."""
    import matplotlib.pyplot as plt

    from dyod.sweep import sweep_figure

    rows = sweep(fitted_run, [0.3, 0.6], n=4, config=FAST, progress=False)
    assert "speed, measured" not in markdown_table(rows, 10)
    fig = sweep_figure(rows)
    assert len(fig.axes) == 1 and {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"DYOD", "VAE alone"}
    plt.close(fig)
    with_alone = rows + sweep(fitted_run, [1.0], n=4, config=FAST, progress=False)[1:]  # its t0 = 1 row
    assert "| speed, measured | ×" in markdown_table(with_alone, 10)
    fig = sweep_figure(with_alone)
    legend = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert len(fig.axes) == 2 and legend == {"DYOD (t0 = 1: prior + S* alone)", "VAE alone", "measured speed-up"}
    plt.close(fig)


def test_sweep_scores_a_batch_at_a_time_with_the_kid_of_all_samples(fitted_run, monkeypatch):
    """A sweep keeps features, not samples: the feature network sees one batch of images at a time, and the KID is
    that of the whole set of samples scored at once."""
    import dataclasses

    import dyod.evaluation as evaluation
    from dyod.pipeline import DyodPipeline
    from dyod.run import Run
    from dyod.sweep import reference_features

    extractor, seen = evaluation.feature_extractor("emoji"), []

    def spy(*args, **kwargs):
        def features(images):
            seen.append(len(images))
            return extractor(images)
        return features

    monkeypatch.setattr(evaluation, "feature_extractor", spy)
    config = dataclasses.replace(FAST, batch_size=2)
    pipe = DyodPipeline.for_sampling(fitted_run, device="cpu")
    rows = sweep(fitted_run, [0.6], n=5, config=config, pipe=pipe, progress=False)
    assert seen[-3:] == [2, 2, 1]  # the t0 = 0.6 samples, batch by batch
    samples = pipe.sample(5, dataclasses.replace(config, t0=0.6), progress=False)
    whole = evaluation.kid(extractor(samples), reference_features(Run.open(fitted_run), extractor), num_subsets=50)
    assert rows[1].label == "t0=0.60" and rows[1].n == 5
    assert rows[1].kid_x100 == pytest.approx(whole.mean_x100, rel=1e-6, abs=1e-9)


def test_chosen_t0_is_the_argmin_of_the_heldout_sweep_and_becomes_the_default(holdout_run, tmp_path, capsys):
    t0, rows = choose_t0(holdout_run, [0.2, 0.5, 0.8], n=3, config=FAST, progress=False)
    dyod_rows = [r for r in rows if r.t0 is not None]
    assert t0 == min(dyod_rows, key=lambda r: r.kid_x100).t0
    info = json.loads((holdout_run / "run.json").read_text())["chosen_t0"]
    assert info["t0"] == t0 and set(info["sweep"]) == {"0.20", "0.50", "0.80"}
    assert main(["sample", str(holdout_run), "-n", "1", "--out", str(tmp_path / "s"), "--num-inference-steps", "10",
                 "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "s" / "dyod_output.json").read_text())
    assert record["config"]["t0"] == t0 and record["denoising_steps"] == round(t0 * 10)



def test_sampling_with_other_settings_than_the_t0_was_chosen_with_is_warned_of(holdout_run, tmp_path, caplog):
    """The chosen t0 is the best for the guidance, schedule and prompt it was swept with: `dyod sample` with others
    says so (before: silently used it); with the same settings, or an explicit --t0, it says nothing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(holdout_run, run)
    t0, _ = choose_t0(run, [0.2, 0.5], n=3, config=FAST, progress=False)
    assert json.loads((run / "run.json").read_text())["chosen_t0"]["config"] == {
        "num_inference_steps": 10, "guidance_scale": 2.0, "prompt": "a photo of {}", "negative_prompt": ""}
    base = ["sample", str(run), "-n", "1", "--device", "cpu", "--num-inference-steps", "10"]
    for flags, warned in ((["--guidance-scale", "2.0"], False), (["--guidance-scale", "4.0"], True),
                          (["--guidance-scale", "4.0", "--t0", "0.5"], False)):
        caplog.clear()
        assert main([*base, *flags, "--out", str(tmp_path / "s"), "--overwrite"]) == 0
        warning = (f"the run's t0 = {t0:.2f} was chosen with guidance_scale=2.0; sampling with guidance_scale=4.0, "
                   "another t0 may be better")
        assert (warning in caplog.text) == warned


def test_a_chosen_t0_is_not_used_once_a_stage_is_trained_again(holdout_run, shapes, tiny_model, tmp_path, caplog):
    """`dyod tune`, then `invert --overwrite` (or `train-vae --overwrite`): the t0 chosen for the earlier S* (VAE) is
    no longer `dyod sample`'s default; the run says so and samples at the config's default."""
    import shutil

    from dyod.run import Run

    run = tmp_path / "run"
    shutil.copytree(holdout_run, run)
    t0, _ = choose_t0(run, [0.2, 0.5], n=3, config=FAST, progress=False)
    assert Run.open(run).chosen_t0() == t0
    flags = ["--num-inference-steps", "10", "--device", "cpu", "-n", "1"]
    assert main(["sample", str(run), *flags, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "dyod_output.json").read_text())["config"]["t0"] == t0

    assert main(["invert", str(shapes), "--model", str(tiny_model), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--seed", "5", "--holdout-fraction", "0.3", "--sample-every", "0",
                 "--device", "cpu", "--overwrite"]) == 0
    caplog.clear()
    assert Run.open(run).chosen_t0() is None
    assert "chosen with the dataset prompt S* as it was before it was trained again" in caplog.text
    assert main(["sample", str(run), *flags, "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "dyod_output.json").read_text())["config"]["t0"] == SampleConfig().t0

    choose_t0(run, [0.2, 0.5], n=3, config=FAST, progress=False)  # chosen again: used again
    assert Run.open(run).chosen_t0() is not None
    dyod.train_vae(shapes, run, dyod.VAEConfig(epochs=1, batch_size=4, latent_dim=4, seed=3),
                   dyod.DataConfig(holdout_fraction=0.3), progress=False, device="cpu", overwrite=True)
    assert Run.open(run).chosen_t0() is None and "chosen with the custom VAE as it was" in caplog.text


def test_heldout_reference_needs_a_holdout(fitted_run):
    with pytest.raises(DyodError, match="holds no images out"):
        choose_t0(fitted_run, [0.5], n=2, config=FAST, progress=False)


def test_sweep_transform_with_and_without_the_prompt(fitted_run, shapes, tmp_path):
    from dyod.data import load_image_folder
    from dyod.sweep import sweep_transform

    inputs = load_image_folder(shapes, max_images=4).images
    rows = sweep_transform(fitted_run, inputs, t0s=(0.5,), config=FAST, out=tmp_path, progress=False)
    assert [(r["t0"], r["prompt"]) for r in rows] == [(0.5, "with S*"), (0.5, "without S*")]
    assert rows[1]["prompt_text"] == "a photo of object"
    assert "| KID × 100, with S* |" in (tmp_path / "sweep_transform.md").read_text()
    assert sorted(p.name for p in tmp_path.glob("transform_*.png")) == ["transform_t0_0.50_plain.png",
                                                                        "transform_t0_0.50_s.png"]
    assert Image.open(tmp_path / "sweep_transform.png").size[0] > 300  # the plot, as a sweep has one
    from dyod.sweep import transform_sweep_figure

    fig = transform_sweep_figure(rows + [{**r, "t0": 0.7, "kid_x100": r["kid_x100"] + 1} for r in rows])
    curves = {bars.get_label(): bars.lines[0].get_xydata().tolist() for bars in fig.axes[0].containers}
    assert curves == {"with S* ('a photo of {}')": [[0.5, rows[0]["kid_x100"]], [0.7, rows[0]["kid_x100"] + 1]],
                      "without S* ('a photo of object')": [[0.5, rows[1]["kid_x100"]], [0.7, rows[1]["kid_x100"] + 1]]}
    assert [r["grid"] for r in rows] == ["transform_t0_0.50_s.png", "transform_t0_0.50_plain.png"]

    # again into the same folder (the CLI's --overwrite) at another t': the earlier grids go, also those of a record
    # written before the rows named their grids; other files stay
    record = json.loads((tmp_path / "sweep_transform.json").read_text())
    for row in record["rows"]:
        del row["grid"]
    (tmp_path / "sweep_transform.json").write_text(json.dumps(record))
    (tmp_path / "notes.png").write_bytes(b"")
    sweep_transform(fitted_run, inputs, t0s=(0.7,), config=FAST, out=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["notes.png", "sweep_transform.png",
                                                              "transform_t0_0.70_plain.png", "transform_t0_0.70_s.png"]


def test_sweep_transform_of_one_input_is_refused_before_loading_the_model(fitted_run, shapes, tmp_path, capsys,
                                                                          monkeypatch):
    from dyod.pipeline import DyodPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model for a sweep that cannot be scored")

    monkeypatch.setattr(DyodPipeline, "for_sampling", no_loading)
    one = sorted(shapes.glob("*.png"))[0]
    out = tmp_path / "st"
    assert main(["sweep-transform", str(fitted_run), str(one), "--t0", "0.5", "--out", str(out)]) == 2
    assert "KID, which needs at least 2 of them; got 1 readable input image(s)" in capsys.readouterr().err
    assert not out.exists()
