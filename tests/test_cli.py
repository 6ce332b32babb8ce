"""The command line: the documented commands, their outputs, and clear errors with exit code 2."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from dyod.cli import build_parser, main
from dyod.errors import DyodError


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model, shapes):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["fit", str(shapes), "--model", str(tiny_model), "--out", str(out), "--steps", "3", "--batch-size", "2",
               "--vae-epochs", "2", "--vae-latent-dim", "6", "--vae-batch-size", "4", "--device", "cpu"])
    assert rc == 0
    return out


def test_fit_writes_a_complete_run_folder(cli_run, tiny_model):
    run = json.loads((cli_run / "run.json").read_text())
    assert run["model"] == str(tiny_model)
    assert run["placeholder_token"] == "<dyod>" and run["num_vectors"] == 1
    assert run["prior"]["resolution"] == 16 and run["data"]["resolution"] == 32
    assert set(run["stages"]) == {"inversion", "vae"}
    for name in ("learned_embeds.safetensors", "data.json", "dyod.log", "inversion/config.json", "inversion/log.jsonl",
                 "vae/model.safetensors", "vae/config.json"):
        assert (cli_run / name).exists(), name
    assert list((cli_run / "vae" / "samples").glob("epoch-*.png"))


def test_sample_records_start_and_unet_calls(cli_run, shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("DYOD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "samples"
    assert main(["sample", str(cli_run), "--t0", "0.7", "-n", "3", "--seed", "5", "--out", str(out),
                 "--num-inference-steps", "10", "--device", "cpu"]) == 0
    record = json.loads((out / "dyod_output.json").read_text())
    assert record["denoising_steps"] == 7 and record["unet_calls_per_batch"] == 7
    assert record["start_timestep"] == 601 and record["seeds"] == [5, 6, 7]
    assert sorted(p.name for p in out.glob("seed-*.png")) == ["seed-000005.png", "seed-000006.png", "seed-000007.png"]
    assert Image.open(out / "seed-000005.png").size == (16, 16)  # the model's, below the dataset's 32
    assert (out / "grid.png").exists()
    assert record["images"] == ["seed-000005.png", "seed-000006.png", "seed-000007.png"]
    # the grid is not a sample: KID counts the three
    assert main(["eval", str(out), "--ref", str(shapes), "--json", str(tmp_path / "kid.json")]) == 0
    assert json.loads((tmp_path / "kid.json").read_text())["n_samples"] == 3


def test_a_long_sample_run_writes_as_it_goes_and_keeps_what_it_made(cli_run, tmp_path, monkeypatch, capsys):
    """Samples are written a batch at a time: a run stopped midway keeps its finished batches; grid.png shows the
    first 64 of a large run (a grid of every sample of a 50,000-sample run would be gigapixels)."""
    from dyod.pipeline import DyodPipeline

    flags = ["--t0", "1.0", "--num-inference-steps", "2", "--batch-size", "32", "--device", "cpu"]
    out = tmp_path / "many"
    assert main(["sample", str(cli_run), "-n", "70", "--out", str(out), *flags]) == 0
    assert len(list(out.glob("seed-*.png"))) == 70
    assert len(json.loads((out / "dyod_output.json").read_text())["images"]) == 70
    side = Image.open(out / "seed-000000.png").size[0]
    assert Image.open(out / "grid.png").size == (8 * side + 9 * 2,) * 2  # 8 x 8 images and their padding

    generate, calls = DyodPipeline.generate, []

    def fail_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DyodError("the machine went away")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(DyodPipeline, "generate", fail_on_the_second_batch)
    stopped = tmp_path / "stopped"
    assert main(["sample", str(cli_run), "-n", "70", "--out", str(stopped), *flags]) == 2
    assert "the machine went away" in capsys.readouterr().err
    assert sorted(p.name for p in stopped.glob("*.png")) == [f"seed-{i:06d}.png" for i in range(32)]

    # --resume samples the 38 missing seeds (the same images as the uninterrupted run's), then extends to -n 75
    monkeypatch.setattr(DyodPipeline, "generate", generate)
    assert main(["sample", str(cli_run), "-n", "70", "--out", str(stopped), "--resume", *flags]) == 0
    pixels = {f.name: np.asarray(Image.open(f), dtype=np.int16) for f in out.glob("seed-*.png")}
    resumed = {f.name: np.asarray(Image.open(f), dtype=np.int16) for f in stopped.glob("seed-*.png")}
    assert resumed.keys() == pixels.keys() and all(np.abs(resumed[k] - pixels[k]).max() <= 1 for k in pixels)
    assert np.array_equal(np.asarray(Image.open(stopped / "grid.png")), np.asarray(Image.open(out / "grid.png")))
    record = json.loads((stopped / "dyod_output.json").read_text())
    assert record["images"] == [f"seed-{i:06d}.png" for i in range(70)]
    assert main(["sample", str(cli_run), "-n", "75", "--out", str(stopped), "--resume", *flags]) == 0
    assert len(json.loads((stopped / "dyod_output.json").read_text())["images"]) == 75
    assert main(["sample", str(cli_run), "-n", "80", "--out", str(stopped), "--resume", *flags[:-2],
                 "--guidance-scale", "2", "--device", "cpu"]) == 2
    assert "were made with another config" in capsys.readouterr().err
    assert main(["sample", str(cli_run), "-n", "80", "--out", str(stopped), "--resume", "--seed", "5", *flags]) == 2
    assert "were made with another seed (seed=0)" in capsys.readouterr().err
    assert len(list(stopped.glob("seed-*.png"))) == 75  # nothing added


def test_sample_resume_refuses_a_folder_made_before_the_run_was_trained_again(cli_run, shapes, tmp_path, capsys):
    """Extending a sample folder after `train-vae --overwrite` would mix two generators' images in one folder."""
    import shutil

    run, out = tmp_path / "run", tmp_path / "s"
    shutil.copytree(cli_run, run)
    flags = ["--num-inference-steps", "4", "--t0", "0.5", "--device", "cpu", "--out", str(out)]
    assert main(["sample", str(run), "-n", "2", *flags]) == 0
    record = json.loads((out / "dyod_output.json").read_text())
    assert set(record["run_files"]) == {"embedding", "vae"} and all(record["run_files"].values())
    assert main(["train-vae", str(shapes), "--out", str(run), "--vae-epochs", "1", "--vae-latent-dim", "6",
                 "--vae-batch-size", "4", "--vae-seed", "9", "--device", "cpu", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "3", *flags, "--resume"]) == 2
    assert "made with the run's custom VAE as it was before it was trained again" in capsys.readouterr().err
    assert len(list(out.glob("seed-*.png"))) == 2
    del record["run_files"]  # a folder from before the record kept them: resumed as before
    (out / "dyod_output.json").write_text(json.dumps(record))
    assert main(["sample", str(run), "-n", "3", *flags, "--resume"]) == 0
    assert len(list(out.glob("seed-*.png"))) == 3


def test_sample_resume_takes_the_run_however_it_is_named(cli_run, tmp_path, monkeypatch, capsys):
    """The record names the run as the first command did (`run`, from its folder); a resume from elsewhere names it
    otherwise (absolute, `../run`), or the run has moved with the same S* and VAE: the same run all the same."""
    import shutil

    shutil.copytree(cli_run, tmp_path / "run")
    (tmp_path / "work").mkdir()
    flags = ["--num-inference-steps", "4", "--t0", "0.5", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "run", "-n", "1", *flags, "--out", "s"]) == 0
    assert main(["sample", str(tmp_path / "run"), "-n", "2", *flags, "--out", str(tmp_path / "s"), "--resume"]) == 0
    monkeypatch.chdir(tmp_path / "work")
    assert main(["sample", "../run", "-n", "3", *flags, "--out", "../s", "--resume"]) == 0
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert main(["sample", "../moved", "-n", "4", *flags, "--out", "../s", "--resume"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("seed-*.png")) == [f"seed-{i:06d}.png" for i in range(4)]
    other = tmp_path / "other"  # another run (other S*): still refused
    shutil.copytree(cli_run, other)
    (other / "learned_embeds.safetensors").write_bytes((other / "learned_embeds.safetensors").read_bytes() + b" ")
    capsys.readouterr()
    assert main(["sample", "../other", "-n", "5", *flags, "--out", "../s", "--resume"]) == 2
    assert "were made with another run" in capsys.readouterr().err


def test_sample_precision_flag_runs_the_prior_in_that_precision(cli_run, tmp_path):
    """--precision bf16 on the CPU: the same images as fp32 up to bf16 rounding (a few 8-bit levels at most)."""
    images = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["sample", str(cli_run), "--t0", "0.5", "-n", "2", "--out", str(out), "--num-inference-steps", "6",
                     "--device", "cpu", "--precision", precision]) == 0
        images[precision] = [np.asarray(Image.open(f), dtype=np.int16) for f in sorted(out.glob("seed-*.png"))]
    diffs = [np.abs(a - b).mean() for a, b in zip(images["fp32"], images["bf16"])]
    assert len(diffs) == 2 and all(d < 8 for d in diffs)
    assert any(d > 0 for d in diffs)  # the flag took effect: bf16 rounds differently


def test_cuda_graphs_on_the_cpu_says_once_that_it_records_none(cli_run, tmp_path, capfd, caplog):
    """On the CPU `--compile cuda-graphs` runs the traced graphs as they are; the backend's page of warnings per graph
    is replaced by one line."""
    import logging

    logging.getLogger("torch._inductor.cudagraph_utils").setLevel(logging.NOTSET)  # as in a fresh process
    assert main(["sample", str(cli_run), "-n", "2", "--t0", "0.5", "--num-inference-steps", "2", "--compile",
                 "cuda-graphs", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert "skipping cudagraphs" not in capfd.readouterr().err
    assert caplog.text.count("off CUDA there is no CUDA graph to record") == 1


def test_each_result_png_says_what_made_it(cli_run, shapes, tmp_path):
    """A tEXt chunk "dyod" in every result: the run, model, settings and the image's own seed (input, latent value),
    enough to make it again away from its folder's record."""
    flags = ["--t0", "0.5", "--num-inference-steps", "2", "--device", "cpu"]
    assert main(["sample", str(cli_run), "-n", "2", "--seed", "7", *flags, "--out", str(tmp_path / "s")]) == 0
    record = json.loads((tmp_path / "s" / "dyod_output.json").read_text())
    made = json.loads(Image.open(tmp_path / "s" / "seed-000008.png").text["dyod"])
    assert made["seed"] == 8 and made["noise_seed"] == 8 and made["command"] == "sample"
    assert made["config"] == record["config"] and made["run"] == str(cli_run) and made["model"] == record["model"]
    assert "dyod" not in Image.open(tmp_path / "s" / "grid.png").text
    assert main(["sample", str(cli_run), "-n", "1", "--seed", str(made["seed"]), *flags, "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "seed-000008.png")),
                          np.asarray(Image.open(tmp_path / "s" / "seed-000008.png")))
    one = sorted(shapes.glob("*.png"))[0]
    assert main(["transform", str(cli_run), str(one), "--seed", "3", *flags, "--out", str(tmp_path / "t")]) == 0
    made = json.loads(Image.open(tmp_path / "t" / f"0000-{one.stem}.png").text["dyod"])
    assert made["input"] == str(one) and made["noise_seed"] == 3
    assert main(["interpolate", str(cli_run), "--seeds", "1,2", "--steps", "3", "--no-fix-noise", *flags,
                 "--out", str(tmp_path / "i")]) == 0
    made = json.loads(Image.open(tmp_path / "i" / "frame-002.png").text["dyod"])
    assert made["seeds"] == [1, 2] and made["lambda"] == 1.0 and made["noise_seed"] == 3
    assert main(["traverse", str(cli_run), "--dim", "1", "--range", "-2,2", "--steps", "3", *flags,
                 "--out", str(tmp_path / "v")]) == 0
    made = json.loads(Image.open(tmp_path / "v" / "dim-001-value-000.png").text["dyod"])
    assert made["dim"] == 1 and made["value"] == -2.0 and made["seed"] == 0


def test_transform_interpolate_traverse(cli_run, shapes, tmp_path):
    assert main(["transform", str(cli_run), str(shapes), "--t0", "0.6", "--out", str(tmp_path / "t"), "--grayscale",
                 "--num-inference-steps", "5", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "t").glob("0*.png"))) == 12
    assert main(["interpolate", str(cli_run), "--seeds", "3,7", "--steps", "4", "--out", str(tmp_path / "i"),
                 "--num-inference-steps", "5", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "i").glob("frame-*.png"))) == 4
    assert Image.open(tmp_path / "i" / "grid.png").size[0] > 4 * 16
    assert main(["traverse", str(cli_run), "--dim", "2", "--range", "-3,3", "--steps", "5", "--out",
                 str(tmp_path / "v"), "--num-inference-steps", "5", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "v" / "dyod_output.json").read_text())["values"] == [-3.0, -1.5, 0.0, 1.5, 3.0]


def test_traverse_several_dimensions_a_row_each_and_the_most_active_ones(cli_run, tmp_path, capsys, caplog):
    """Fig. 7 shows several dimensions, a row each: `--dim 1,4` makes each row the traversal `--dim D` makes alone
    (the same z and ε), and `--active K` takes the K dimensions of largest posterior-mean variance, as recorded when
    the VAE was trained, or measured on the run's dataset for a VAE trained before that was recorded."""
    import shutil

    from dyod.run import ACTIVITY_FILE

    # a batch a row, so that the row is computed as the traversal alone is (CPU kernels round differently by batch)
    fast = ["--range=-2,2", "--steps", "3", "--batch-size", "3", "--num-inference-steps", "4", "--device", "cpu"]
    assert main(["traverse", str(cli_run), "--dim", "1,4", *fast, "--out", str(tmp_path / "rows")]) == 0
    assert main(["traverse", str(cli_run), "--dim", "4", *fast, "--out", str(tmp_path / "alone")]) == 0
    rows = json.loads((tmp_path / "rows" / "dyod_output.json").read_text())
    assert rows["dims"] == [1, 4] and rows["values"] == [-2.0, 0.0, 2.0]
    assert rows["images"] == [f"dim-{d:03d}-value-{i:03d}.png" for d in (1, 4) for i in range(3)]
    for i in range(3):
        made = json.loads(Image.open(tmp_path / "rows" / f"dim-004-value-{i:03d}.png").text["dyod"])
        assert made["dim"] == 4 and made["value"] == [-2.0, 0.0, 2.0][i]
        assert (Image.open(tmp_path / "rows" / f"dim-004-value-{i:03d}.png").tobytes()
                == Image.open(tmp_path / "alone" / f"dim-004-value-{i:03d}.png").tobytes())
    side = Image.open(tmp_path / "rows" / rows["images"][0]).size[0]
    grid = Image.open(tmp_path / "rows" / "grid.png").size
    assert grid[0] > 3 * side > grid[1] > 2 * side  # 3 columns, 2 rows
    assert main(["info", str(tmp_path / "rows")]) == 0
    assert "  latent dimensions 1, 4 (a row each) at -2.0, 0.0, 2.0, the rest from seed 0" in capsys.readouterr().out

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    activity = json.loads((run / "vae" / ACTIVITY_FILE).read_text())
    assert len(activity["posterior_mean_variance"]) == 6
    activity["posterior_mean_variance"] = [0.5, 0.001, 0.02, 0.0, 3.0, 0.004]  # dims 4, 0, 2 active, in that order
    activity["active_dimensions"] = 3
    (run / "vae" / ACTIVITY_FILE).write_text(json.dumps(activity))
    with caplog.at_level("INFO", logger="dyod"):
        assert main(["traverse", str(run), "--active", "4", *fast, "--out", str(tmp_path / "active")]) == 0
    record = json.loads((tmp_path / "active" / "dyod_output.json").read_text())
    assert record["dims"] == [4, 0, 2, 5] and record["posterior_mean_variance"] == [3.0, 0.5, 0.02, 0.004]
    assert "the 4 most used latent dimensions: 4, 0, 2, 5" in caplog.text
    assert "4 dimensions asked: only 3 of the custom VAE's 6 latent dimensions are active" in caplog.text
    assert len(record["images"]) == 12
    capsys.readouterr()
    assert main(["info", str(tmp_path / "active")]) == 0
    assert capsys.readouterr().out.splitlines()[2:4] == [
        "  latent dimensions 4, 0, 2, 5 (a row each) at -2.0, 0.0, 2.0, the rest from seed 0",
        "  the 4 dimensions the dataset uses most (--active): posterior-mean variance 3, 0.5, 0.02, 0.004"]

    # a VAE trained before the activity was recorded: measured on the run's dataset, then recorded
    (run / "vae" / ACTIVITY_FILE).unlink()
    assert main(["traverse", str(run), "--active", "2", *fast, "--out", str(tmp_path / "measured")]) == 0
    measured = json.loads((run / "vae" / ACTIVITY_FILE).read_text())
    recorded = json.loads((cli_run / "vae" / ACTIVITY_FILE).read_text())
    assert measured["num_images"] == recorded["num_images"] == 12
    assert measured["posterior_mean_variance"] == pytest.approx(recorded["posterior_mean_variance"], rel=1e-5, abs=1e-9)
    variance = recorded["posterior_mean_variance"]
    best = sorted(range(6), key=lambda d: -variance[d])[:2]
    assert json.loads((tmp_path / "measured" / "dyod_output.json").read_text())["dims"] == best
    (run / "vae" / ACTIVITY_FILE).unlink()
    info = json.loads((run / "run.json").read_text())
    info["data"]["root"] = str(tmp_path / "gone")
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["traverse", str(run), "--active", "2", *fast, "--out", str(tmp_path / "nothing")]) == 2
    assert "is not here to measure it; give the dimensions with --dim" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_interpolate_between_and_traverse_from_images_latents(cli_run, shapes, tmp_path, capsys):
    """`--images A B` interpolates between two images' custom-VAE latents (ε from --noise-seed) and `--image A`
    traverses from one: what the library gives from `latents_of` those images, and said so in the records."""
    from dyod import DyodPipeline, SampleConfig

    a, b = sorted(shapes.glob("*.png"))[:2]
    fast = ["--t0", "0.5", "--num-inference-steps", "4", "--device", "cpu"]
    assert main(["interpolate", str(cli_run), "--images", str(a), str(b), "--steps", "3", "--noise-seed", "4", *fast,
                 "--out", str(tmp_path / "between")]) == 0
    assert main(["traverse", str(cli_run), "--image", str(a), "--dim", "1,3", "--range=-2,2", "--steps", "3",
                 "--seed", "5", *fast, "--out", str(tmp_path / "from")]) == 0
    pipe = DyodPipeline.for_sampling(cli_run, device="cpu")
    config = SampleConfig(t0=0.5, num_inference_steps=4)
    ends = pipe.latents_of([Image.open(a), Image.open(b)])
    expected = pipe.interpolate(4, 4, 3, config, progress=False, ends=(ends[0], ends[1]))
    assert [Image.open(tmp_path / "between" / f"frame-{i:03d}.png").tobytes() for i in range(3)] == [
        im.tobytes() for im in expected]
    expected = pipe.traverse(5, [1, 3], [-2.0, 0.0, 2.0], config, progress=False, z=ends[0])
    record = json.loads((tmp_path / "from" / "dyod_output.json").read_text())
    written = np.stack([np.asarray(Image.open(tmp_path / "from" / name), dtype=np.int16) for name in record["images"]])
    # the same images up to a level of rounding: the command and the library batch the rows differently, and with two
    # threads a CPU's reductions may round the last bit differently at another batch shape (seen: at most 1 level)
    assert written.shape == (6, *np.asarray(expected[0]).shape)
    assert np.abs(written - np.stack([np.asarray(im, dtype=np.int16) for im in expected])).max() <= 1
    assert record["image"] == str(a) and record["seed"] == 5
    made = json.loads(Image.open(tmp_path / "between" / "frame-002.png").text["dyod"])
    assert made["end_images"] == [str(a), str(b)] and made["lambda"] == 1.0 and made["noise_seed"] == 4
    capsys.readouterr()
    assert main(["info", str(tmp_path / "between")]) == 0
    assert capsys.readouterr().out.splitlines()[2] == (
        f"  between the custom VAE latents of images {a} and {b}, 3 steps, the forward noise held fixed")
    assert main(["info", str(tmp_path / "from")]) == 0
    assert capsys.readouterr().out.splitlines()[2] == (
        f"  latent dimensions 1, 3 (a row each) at -2.0, 0.0, 2.0, the rest from image {a} (ε from seed 5)")
    for argv, message in ((["interpolate", "--images", str(shapes), str(b)], f"--images takes image files; {shapes} is "
                                                                                 "a folder"),
                          (["traverse", "--dim", "0", "--image", str(tmp_path / "nope.png")],
                           f"--image takes image files; {tmp_path / 'nope.png'} is not there")):
        assert main([argv[0], str(cli_run), *argv[1:], *fast, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_transform_reads_inputs_at_the_model_size_with_the_same_results(cli_run, tmp_path):
    """The command reads each input straight to the model's resolution (in grayscale with --grayscale), so a folder
    of photos is never held at full size: the results are those of transforming the full-size images."""
    from dyod import DyodPipeline, SampleConfig
    from dyod.data import load_image

    rng = np.random.default_rng(0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    photo = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    photo.save(inputs / "a.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(inputs / "b.png")
    Image.fromarray(rng.integers(0, 256, (20, 12, 4), dtype=np.uint8), "RGBA").save(inputs / "c.png")
    for grayscale in (False, True):
        out = tmp_path / f"out-{grayscale}"
        assert main(["transform", str(cli_run), str(inputs), "--t0", "0.6", "--num-inference-steps", "5", "--seed", "3",
                     "--out", str(out), "--device", "cpu", *(["--grayscale"] if grayscale else [])]) == 0
        full = [load_image(f) for f in sorted(inputs.glob("*.png"))]
        expected = DyodPipeline.from_run(cli_run, device="cpu").transform(
            full, SampleConfig(t0=0.6, num_inference_steps=5), seed=3, grayscale=grayscale, progress=False)
        made = [Image.open(f) for f in sorted(out.glob("0*.png"))]
        assert len(made) == 3
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(made, expected))


def test_errors_exit_2_and_overwrite_nothing(cli_run, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.png").write_bytes(b"mine")
    assert main(["sample", str(cli_run), "-n", "1", "--out", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.png").read_bytes() == b"mine"
    assert main(["sample", str(cli_run), "--t0", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "dyod sample: error: --t0 must be a fraction of T in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist; create one with `dyod fit" in capsys.readouterr().err
    assert main(["sample", str(cli_run), "-n", "0", "--out", str(tmp_path / "z")]) == 2
    assert main(["interpolate", str(cli_run), "--seeds", "3", "--out", str(tmp_path / "w")]) == 2
    assert "exactly 2" in capsys.readouterr().err


def test_what_a_run_lacks_is_named_before_the_model_loads(cli_run, tmp_path, capsys, monkeypatch):
    from dyod.pipeline import DyodPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model for a traversal that cannot run")

    monkeypatch.setattr(DyodPipeline, "for_sampling", no_loading)
    out = tmp_path / "t"
    assert main(["traverse", str(cli_run), "--dim", "6", "--out", str(out)]) == 2
    assert "--dim must be in [0, 5]: the run's custom VAE has 6 latent dimensions; got 6" in capsys.readouterr().err
    for flags, message in ((["--dim", "1,7,9"], "--dim must be in [0, 5]: the run's custom VAE has 6 latent dimensions; "
                                                "got 7, 9"),
                           (["--dim", "2,2"], "--dim takes one or more different dimensions, e.g. 3 or 3,5,7; got '2,2'"),
                           (["--dim", ","], "--dim takes one or more different dimensions"),
                           (["--active", "7"], "--active 7: the run's custom VAE has 6 latent dimensions")):
        assert main(["traverse", str(cli_run), *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err, flags
    for flags, message in (([], "one of the arguments --dim --active is required"),  # one of the two, exactly
                           (["--dim", "1", "--active", "2"], "argument --active: not allowed with argument --dim")):
        with pytest.raises(SystemExit):
            main(["traverse", str(cli_run), *flags, "--out", str(out)])
        assert message in capsys.readouterr().err, flags
    assert not out.exists()
    run = tmp_path / "prompt-only"  # a run whose VAE stage has not run
    run.mkdir()
    (run / "run.json").write_text((cli_run / "run.json").read_text())
    assert main(["traverse", str(run), "--dim", "0", "--out", str(out)]) == 2
    assert "lacks model.safetensors; run `dyod train-vae` first" in capsys.readouterr().err
    for command in (["sample", "-n", "2"], ["interpolate", "--seeds", "1,2"]):
        assert main([command[0], str(run), *command[1:], "--t0", "0.5", "--out", str(out)]) == 2
        assert "has no custom VAE, which t0 = 0.5 starts from; run `dyod train-vae`" in capsys.readouterr().err
    # a sweep (tune) refuses rather than leave out the rows it cannot make: before, an empty table and exit 0
    for command in (["sweep", "--ref", str(cli_run)], ["tune"]):
        assert main([*command[:1], str(run), *command[1:], "--t0", "0.5", "-n", "2", "--out", str(out)]) == 2
        assert "has no custom VAE, which t0 = 0.5 starts from; run `dyod train-vae` (or `dyod fit`) first, or sweep " \
            "--t0 1 alone (the VAE-alone baseline needs it too)" in capsys.readouterr().err
    vae_only = tmp_path / "vae-only"  # a run whose prompt stage has not run
    vae_only.mkdir()
    (vae_only / "run.json").write_text((cli_run / "run.json").read_text())
    (vae_only / "vae").symlink_to(cli_run / "vae")
    assert main(["sweep", str(vae_only), "--t0", "0.5", "-n", "2", "--ref", str(cli_run), "--out", str(out)]) == 2
    assert "has no dataset prompt S* (learned_embeds.safetensors), which the prompt 'a photo of {}' uses" in \
        capsys.readouterr().err
    assert main(["sweep-transform", str(vae_only), str(cli_run / "vae" / "samples"), "--t0", "0.5", "--out",
                 str(out)]) == 2
    assert "has no dataset prompt S*" in capsys.readouterr().err
    # sampling commands likewise (before, the model loaded and the pipeline refused: "no learned token yet")
    for command in (["sample", "-n", "2", "--t0", "0.5"], ["interpolate", "--seeds", "1,2"], ["traverse", "--dim", "0"],
                    ["transform", str(cli_run / "vae" / "samples")]):
        assert main([command[0], str(vae_only), *command[1:], "--out", str(out)]) == 2
        assert "has no dataset prompt S* (learned_embeds.safetensors), which the prompt 'a photo of {}' uses; run " \
            "`dyod invert` (or `dyod fit`) first, or give a --prompt without {}" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_whose_model_has_moved_samples_with_model(cli_run, tiny_model, tiny_v_model, tmp_path, capsys):
    """run.json records where the model was; sampling commands take --model for its new place (a run copied to
    another machine) and refuse a model of other shape, for which S* and the VAE were not made."""
    import shutil

    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model, moved)
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "model": str(tmp_path / "gone")}))
    flags = ["-n", "2", "--t0", "0.5", "--num-inference-steps", "2", "--device", "cpu"]
    assert main(["sample", str(run), *flags, "--out", str(tmp_path / "a")]) == 2
    assert "if it has moved, give its new place with --model" in capsys.readouterr().err
    assert main(["sample", str(run), *flags, "--model", str(moved), "--out", str(tmp_path / "b")]) == 0
    assert main(["sample", str(cli_run), *flags, "--out", str(tmp_path / "c")]) == 0
    for name in ("seed-000000.png", "seed-000001.png"):  # the same model, so the same images
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / name)), np.asarray(Image.open(tmp_path / "c" / name)))
    assert json.loads((tmp_path / "b" / "dyod_output.json").read_text())["model"] == str(moved)
    assert main(["sample", str(run), *flags, "--model", str(tiny_v_model), "--out", str(tmp_path / "d")]) == 2
    assert "is not the model run" in capsys.readouterr().err


def test_a_model_folder_given_relative_is_recorded_where_it_is(tiny_model, shapes, tmp_path, monkeypatch, capsys):
    """`--model models/sd` from one folder: run.json records the folder's absolute path, so that a later command run
    from elsewhere loads it (before: "could not load the diffusers model 'models/sd'"), and the same folder named
    otherwise (absolute, or as an earlier run recorded it, relative) is the run's model."""
    import shutil

    shutil.copytree(tiny_model, tmp_path / "models" / "sd")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    fast = ["--steps", "2", "--batch-size", "2", "--sample-every", "0", "--device", "cpu"]
    assert main(["invert", str(shapes), "--model", "models/sd", "--out", "run", *fast]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model"] == str(tmp_path / "models" / "sd")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["sample", "../run", "-n", "1", "--t0", "1", "--num-inference-steps", "2", "--device", "cpu",
                 "--out", "s"]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps({**info, "model": "../models/sd"}))  # as recorded before
    assert main(["invert", str(shapes), "--model", str(tmp_path / "models" / "sd"), "--out", "../run", *fast,
                 "--steps", "3", "--resume"]) == 0
    assert main(["invert", str(shapes), "--model", str(tiny_model), "--out", "../run", *fast, "--overwrite"]) == 2
    assert "was made for model" in capsys.readouterr().err  # another folder (a copy) is another model


def test_missing_model_and_empty_data_are_explained(tmp_path, shapes, capsys):
    assert main(["invert", str(shapes), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "could not load the diffusers model" in err and "does not exist" in err and "model_index.json" in err
    # the run folder the failed command began is gone (before: a bare run.json stayed, "model: none yet"), an empty
    # folder the user made stays, and a run that was there already stays as it was
    assert not (tmp_path / "r").exists()
    (tmp_path / "mine").mkdir()
    assert main(["fit", str(shapes), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    from dyod.run import Run

    import dyod.inversion
    from dyod.errors import DyodError

    import logging

    def logs_then_fails(model):  # a record before the failure opens RUN/dyod.log: that log goes with the run
        logging.getLogger("dyod.prior").warning("trying %s", model)
        raise DyodError("could not load the diffusers model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dyod.inversion, "load_prior", logs_then_fails)
        assert main(["invert", str(shapes), "--model", "m", "--out", str(tmp_path / "logged")]) == 2
    assert not (tmp_path / "logged").exists()
    Run.open_or_create(tmp_path / "made-before")
    assert main(["invert", str(shapes), "--model", str(tmp_path / "no-such-model"), "--out",
                 str(tmp_path / "made-before")]) == 2
    assert (tmp_path / "made-before" / "run.json").exists()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for command in (["train-vae"], ["fit", "--model", "m"], ["invert", "--model", "m"]):
        assert main([command[0], str(tmp_path / "empty"), *command[1:], "--out", str(tmp_path / "r2")]) == 2
        assert "no image files found in" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # refused before a run folder is made


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(how: str) -> dict:
    """The Hub switched off (HF_HUB_OFFLINE), or not reachable: its address a closed port on this machine, as a
    machine without a network finds it (nothing leaves the machine either way)."""
    return {"HF_HUB_OFFLINE": "1"} if how == "switched off" else {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}


@pytest.mark.parametrize("offline", ["switched off", "unreachable"])
def test_hub_id_offline_says_how_to_fix(tmp_path, shapes, offline):
    """Unreachable, huggingface_hub retried each file five times (28 s) and then said the model "does not appear to
    have a file named config.json"; now one request finds the Hub unreachable and the error says so."""
    result = subprocess.run(
        [sys.executable, "-m", "dyod", "invert", str(shapes), "--model", "someone/not-cached-model", "--out",
         str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
        env={**_offline_env(offline), "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    assert "could not load the diffusers model 'someone/not-cached-model'" in result.stderr
    assert "and the model is not (wholly) in the Hugging Face cache" in result.stderr
    assert "there is no folder someone/not-cached-model here either" in result.stderr  # a mistyped relative path
    assert ("is switched off (HF_HUB_OFFLINE)" if offline == "switched off" else "could not be reached (") \
        in result.stderr
    assert "Retrying" not in result.stderr and not (tmp_path / "r").exists()


def test_a_hub_id_the_hub_does_not_know_is_refused_at_once(tmp_path, monkeypatch):
    """A local stand-in for the Hub answers as the Hub does for an unknown id (404, X-Error-Code: RepoNotFound): refused
    after one request. A server that answers the question with another error (a mirror that serves files but not the
    API) is not taken for a missing network: the model then loads as usual, not from the cache alone."""
    import http.server
    import threading

    from huggingface_hub import constants

    from dyod.errors import DyodError
    from dyod.prior import hub_options, load_prior

    asked, answer = [], {"status": 404, "X-Error-Code": "RepoNotFound"}

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(self.path)
            self.send_response(answer["status"])
            if "X-Error-Code" in answer:
                self.send_header("X-Error-Code", answer["X-Error-Code"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        with pytest.raises(DyodError, match="the Hugging Face Hub has no model of that id .*`hf auth login` first\\), "
                                            "and there is no folder someone/no-such-model here"):
            load_prior("someone/no-such-model")
        # one request for the model (huggingface_hub may ask other things of its own), no retries, no file downloads
        assert [path for path in asked if "no-such-model" in path] == ["/api/models/someone/no-such-model"]
        answer.clear()
        answer["status"] = 403
        assert hub_options("someone/mirrored-model") == {}
    finally:
        server.shutdown()


@pytest.mark.parametrize("offline", ["switched off", "unreachable"])
def test_a_hub_id_in_the_hugging_face_cache_loads_offline(tmp_path, shapes, tiny_model, offline):
    """`--model org/name` goes through huggingface_hub's cache, as a model downloaded once elsewhere would: laid out
    here as hub downloads are (refs/main naming a snapshot), with the hub offline. The run records the hub id, and
    sampling loads the model by it again. Unreachable, each command took nearly 3 minutes (five retries of every file
    before huggingface_hub fell back to its cache); now one request, then the cache."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--dyod-test--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**_offline_env(offline), "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    for command in (["invert", str(shapes), "--model", "dyod-test/tiny-sd", "--out", str(run), "--steps", "2",
                     "--batch-size", "2", "--sample-every", "0", "--device", "cpu"],
                    ["sample", str(run), "-n", "2", "--t0", "1", "--num-inference-steps", "3", "--device", "cpu",
                     "--out", str(tmp_path / "samples")]):
        result = subprocess.run([sys.executable, "-m", "dyod", *command], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Retrying" not in result.stderr
    assert json.loads((run / "run.json").read_text())["model"] == "dyod-test/tiny-sd"
    record = json.loads((tmp_path / "samples" / "dyod_output.json").read_text())
    assert record["model"] == "dyod-test/tiny-sd" and len(record["images"]) == 2


def test_bad_flag_values_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["invert", "d", "--model", "m", "--out", "o", "--steps", "-3"])
    assert e.value.code == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    for value in ("nan", "inf"):  # float() reads them; a guidance scale of nan made NaN images
        with pytest.raises(SystemExit):
            main(["sample", "run", "--out", "o", "--guidance-scale", value])
        assert f"--guidance-scale takes a finite number, got '{value}'" in capsys.readouterr().err


def test_seeds_out_of_range_exit_2_before_any_work(tmp_path, shapes, capsys):
    """Seeds past 2**64 crashed inside torch's generator (invert, train-vae, eval) after the run folder was made, or
    aliased smaller ones (sample); negative training seeds were taken. Seeds are in [0, 2**63) everywhere."""
    too_big = str(2**64)
    for command, flag in ((["invert", str(shapes), "--model", "m"], "--seed"),
                          (["train-vae", str(shapes)], "--vae-seed"),
                          (["fit", str(shapes), "--model", "m"], "--vae-seed"),
                          (["sample", "run", "-n", "2"], "--seed"),
                          (["sample", "run", "-n", "2"], "--noise-seed"),
                          (["eval", str(shapes), "--ref", str(shapes)], "--seed")):
        for value, message in ((too_big, f"{flag} must be <= {2**63 - 1}, got {too_big}"),
                               ("-3", f"{flag} must be >= 0, got -3")):
            with pytest.raises(SystemExit) as e:
                main([*command, "--out", str(tmp_path / "r"), f"{flag}={value}"])
            assert e.value.code == 2 and message in capsys.readouterr().err
    assert main(["interpolate", "run", "--seeds", f"3,{too_big}", "--out", str(tmp_path / "r")]) == 2
    assert f"--seeds must be in [0, {2**63 - 1}], got '3,{too_big}'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_overwrite_replaces_the_earlier_results_so_resume_never_keeps_them(cli_run, tmp_path):
    """--overwrite into a folder of 4 samples at t0 0.5 with -n 2 at t0 0.7 left seeds 2 and 3 of the old run there,
    and a --resume to -n 4 then kept them as if made at t0 0.7: a folder whose record said one t0, holding two."""
    flags = ["--num-inference-steps", "2", "--device", "cpu"]
    out = tmp_path / "s"
    assert main(["sample", str(cli_run), "-n", "4", "--t0", "0.5", *flags, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")  # not dyod's: stays
    assert main(["sample", str(cli_run), "-n", "2", "--t0", "0.7", *flags, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dyod_output.json", "grid.png", "notes.txt", "seed-000000.png",
                                                     "seed-000001.png"]
    assert main(["sample", str(cli_run), "-n", "4", "--t0", "0.7", *flags, "--out", str(out), "--resume"]) == 0
    t0s = [json.loads(Image.open(out / f"seed-{i:06d}.png").text["dyod"])["config"]["t0"] for i in range(4)]
    assert t0s == [0.7] * 4 and (out / "notes.txt").read_text() == "mine"
    assert main(["interpolate", str(cli_run), "--seeds", "1,2", "--steps", "2", *flags, "--out", str(out),
                 "--overwrite"]) == 0  # another command's results are replaced the same way
    assert sorted(p.name for p in out.iterdir()) == ["dyod_output.json", "frame-000.png", "frame-001.png", "grid.png",
                                                     "notes.txt"]


def test_a_file_where_an_output_folder_goes_is_named(cli_run, tmp_path, shapes, capsys):
    """--out naming a file crashed with NotADirectoryError/FileExistsError tracebacks; each command now names it before
    any work, and an OSError past the checks (here a --json path under a file) is one line, after what was done."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for command, what in ((["sample", str(cli_run), "-n", "1"], "output folder"),
                          (["sweep", str(cli_run), "--t0", "0.5"], "output folder"),
                          (["fit", str(shapes), "--model", "m"], "run folder"), (["train-vae", str(shapes)], "run folder"),
                          (["invert", str(shapes), "--model", "m"], "run folder"), (["demo"], "demo folder")):
        assert main([*command, "--out", str(afile)]) == 2
        assert f"{what} {afile} is a file, not a folder; choose another --out" in capsys.readouterr().err
    assert main(["datasets", "make", "faces", str(afile), "-n", "2"]) == 2
    assert f"dataset folder {afile} is a file, not a folder; choose another folder" in capsys.readouterr().err
    assert afile.read_text() == "keep me"
    assert main(["eval", str(shapes), "--ref", str(shapes), "--num-subsets", "2", "--json", str(afile / "kid.json")]) == 2
    out, err = capsys.readouterr()
    assert "KID×100 = " in out  # the result came before the failure, and stays
    assert f"dyod eval: error: [Errno 17] File exists: '{afile}'" in err and "Traceback" not in err


def test_tune_without_held_out_images_loads_no_model_and_makes_no_folder(cli_run, tmp_path, capsys, monkeypatch):
    from dyod.pipeline import DyodPipeline

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the reference was checked")

    monkeypatch.setattr(DyodPipeline, "for_sampling", load)
    assert main(["tune", str(cli_run), "--out", str(tmp_path / "t"), "-n", "2"]) == 2
    assert (f"run {cli_run} holds no images out; fit it with --holdout-fraction 0.2 (or use --choose-t0), or give "
            "`dyod tune --ref DIR` a folder of images kept out of its training") in capsys.readouterr().err
    assert main(["sweep", str(cli_run), "--ref", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s"), "-n", "2"]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_tune_a_run_without_held_out_images_against_a_folder_given(cli_run, shapes, tmp_path, capsys):
    """A run fitted without --holdout-fraction: `tune --ref DIR` chooses t0 against images kept out some other way
    (before: only a refit with a held-out fraction could), records the folder, and `sample` uses the t0."""
    import shutil

    from dyod.run_info import describe_run

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    kept_out = tmp_path / "kept-out"
    kept_out.mkdir()
    for path in sorted(shapes.glob("*.png"))[:4]:
        shutil.copy(path, kept_out)
    flags = ["--num-inference-steps", "4", "--device", "cpu", "-n", "2"]
    assert main(["tune", str(run), "--ref", str(kept_out), "--t0", "0.25,0.5", *flags]) == 0
    chosen = json.loads((run / "run.json").read_text())["chosen_t0"]
    assert chosen["reference"] == str(kept_out.resolve()) and chosen["t0"] in (0.25, 0.5)
    assert f"chosen t0: {chosen['t0']:.2f}" in capsys.readouterr().out
    assert f"  chosen t0: {chosen['t0']:.2f} ({kept_out.resolve()}: KID × 100 " in describe_run(run)
    assert main(["sample", str(run), *flags, "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "dyod_output.json").read_text())["config"]["t0"] == chosen["t0"]


def test_choose_t0_holds_out_a_fifth_unless_given_or_recorded(tmp_path, shapes, monkeypatch):
    """`fit --choose-t0` holds out 0.2 of the images unless --holdout-fraction says otherwise; on --resume the run's
    own fraction (it took 0.2 there too, and the resume was then refused as training on other data)."""
    import dyod.fitting
    from dyod.run import Run

    fractions = []

    def fit(data_dir, model, out, inversion_config, vae_config, data_config, **kwargs):
        fractions.append(data_config.holdout_fraction)
        Run.open_or_create(out).update(chosen_t0={"t0": 0.5})  # what the command prints afterwards
        return Path(out)

    monkeypatch.setattr(dyod.fitting, "fit", fit)
    Run.open_or_create(tmp_path / "run").update(data_config={"holdout_fraction": 0.3})
    for flags in ([], ["--holdout-fraction", "0.4"], ["--resume"]):
        out = tmp_path / ("run" if "--resume" in flags else "new")
        main(["fit", str(shapes), "--model", "m", "--out", str(out), "--choose-t0", *flags])
    assert fractions == [0.2, 0.4, 0.3]


def test_a_command_leaves_no_run_log_attached(cli_run, tmp_path, caplog):
    """`main` closes the run log it attached: a later command in the same process wrote into every earlier run's
    dyod.log (and, where an earlier --out was a file, failed on opening it)."""
    import logging

    from dyod.cli import _RunLog

    with caplog.at_level("INFO", logger="dyod"):
        assert main(["sample", str(cli_run), "-n", "1", "--out", str(tmp_path / "s")]) == 0
    assert not any(isinstance(h, _RunLog) for h in logging.getLogger("dyod").handlers)
    wrote = f"wrote 1 image and grid.png to {tmp_path / 's'}"
    assert wrote in caplog.text and wrote not in (cli_run / "dyod.log").read_text()


def test_bad_stage_settings_are_refused_before_any_work(tmp_path, shapes, capsys, monkeypatch):
    import dyod.inversion

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model for a prompt that cannot train")

    monkeypatch.setattr(dyod.inversion, "load_prior", no_loading)
    assert main(["invert", str(shapes), "--model", "m", "--out", str(tmp_path / "r"), "--templates", "a photo of {}",
                 "a photo"]) == 2
    assert "each of --templates must contain {} where S* goes; 'a photo' does not" in capsys.readouterr().err
    assert main(["invert", str(shapes), "--model", "m", "--out", str(tmp_path / "r"), "--placeholder-token", " "]) == 2
    assert "--placeholder-token must be a word without spaces around it" in capsys.readouterr().err
    # a token the context texts hold: the tokenizer reads it there too (before: "a photo of photo" trained S* twice)
    assert main(["invert", str(shapes), "--model", "m", "--out", str(tmp_path / "r"), "--placeholder-token", "photo"]) == 2
    assert ("--placeholder-token 'photo' occurs in the context text 'a photo of {}' outside {}, where the tokenizer "
            "would read it as S* too") in capsys.readouterr().err
    assert main(["fit", str(shapes), "--model", "m", "--out", str(tmp_path / "r"), "--initializer", ""]) == 2
    assert "--initializer must be a word" in capsys.readouterr().err
    assert main(["fit", str(shapes), "--model", "m", "--out", str(tmp_path / "r"), "--vae-resolution", "24"]) == 2
    assert "--vae-resolution must be 0 (from the dataset) or a power of two >= 16, got 24" in capsys.readouterr().err
    assert main(["fit", str(shapes), "--model", "m", "--out", str(tmp_path / "r"), "--holdout-fraction", "1.5"]) == 2
    assert "--holdout-fraction must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written either
    for command in (["sweep", "run", "--out", str(tmp_path / "s")], ["tune", "run", "--out", str(tmp_path / "s")],
                    ["sweep-transform", "run", "in.png", "--out", str(tmp_path / "s")]):
        assert main([*command, "--t0", "0.3,abc"]) == 2
        assert "--t0 takes comma-separated float values, got '0.3,abc'" in capsys.readouterr().err
        assert main([*command, "--t0", "0.3,2"]) == 2
        assert "t0 must be a fraction of T in (0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # the output folder is made only once the flags are good
    for command, model in (("fit", ["--model", "m"]), ("invert", ["--model", "m"]), ("train-vae", [])):
        assert main([command, str(shapes), *model, "--out", str(tmp_path / "r"), "--resume"]) == 2  # no run there
        assert f"--resume: {tmp_path / 'r'} holds no run (run.json is missing)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    few = tmp_path / "few"
    few.mkdir()
    from dyod.data import is_heldout

    for path in [p for p in sorted(shapes.glob("*.png")) if not is_heldout(p, shapes, 0.2)][:3]:
        (few / path.name).write_bytes(path.read_bytes())  # three images, none held out at 0.2
    assert main(["fit", str(few), "--model", "m", "--out", str(tmp_path / "r"), "--choose-t0"]) == 2
    assert "which needs at least 2; --holdout-fraction 0.2 holds out" in capsys.readouterr().err
    # a folder that is missing is named as such (before: "holds out 0 of the images in" it)
    assert main(["fit", str(tmp_path / "nowhere"), "--model", "m", "--out", str(tmp_path / "r"), "--choose-t0"]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist; give a folder of images" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_pretrain_settings_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "prior"
    with pytest.raises(SystemExit) as e:
        main(["reference", "pretrain", "--out", str(out), "--checkpoint-every", "0"])  # was a modulo by zero
    assert e.value.code == 2 and "--checkpoint-every must be >= 1" in capsys.readouterr().err
    for flags, message in ((["--caption-dropout", "2"], "--caption-dropout must be in [0, 1], got 2.0"),
                           (["--text-heads", "3"], "--text-width (128) must be a multiple of --text-heads (3)")):
        assert main(["reference", "pretrain", "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_device_this_machine_lacks_is_named(cli_run, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", str(cli_run), "-n", "1", "--out", str(tmp_path / "s"), "--device", "cuda"]) == 2
    assert "--device cuda: " in (err := capsys.readouterr().err) and "leave --device out" in err
    assert main(["sample", str(cli_run), "-n", "1", "--out", str(tmp_path / "s"), "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device name" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["invert", "d", "--model", "m", "--out", str(tmp_path / "r"), "--device", "cuda:1"]) == 2
    assert "--device cuda:1: this machine has 1 CUDA GPU(s)" in capsys.readouterr().err
    # a named second GPU for training, which Accelerate would silently replace with the first: refused, with the way
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for command in (["invert", str(cli_run), "--model", "m"], ["train-vae", str(cli_run)]):
        assert main([*command, "--out", str(tmp_path / "r"), "--device", "cuda:1"]) == 2
        assert "`CUDA_VISIBLE_DEVICES=1 dyod ...`" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # another backend this machine lacks
    assert main(["sample", str(cli_run), "-n", "1", "--out", str(tmp_path / "s"), "--device", "mps"]) == 2
    assert "--device mps: this machine (or this PyTorch) has no mps device" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()  # refused before any work


def test_bad_gradient_checkpointing_names_the_flag(tmp_path, shapes, tiny_model, capsys):
    out = tmp_path / "r"
    assert main(["invert", str(shapes), "--model", str(tiny_model), "--out", str(out),
                 "--gradient-checkpointing", "half"]) == 2
    assert ("--gradient-checkpointing must be none, feed-forward, all, auto or a number of resolution levels"
            in capsys.readouterr().err)
    assert not (out / "inversion").exists()  # refused before any work


def test_fit_under_a_multi_process_launch(tmp_path, tiny_model, shapes):
    """`torchrun`/`accelerate launch` run every stage in every process (two CPU processes here, gloo): the run folder
    is written once, by the main process, and a second launch resumes it."""
    import os

    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dyod.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fit = [*launch, "fit", str(shapes), "--model", str(tiny_model), "--out", str(out), "--steps", "4",
           "--checkpoint-every", "2", "--batch-size", "2", "--vae-epochs", "2", "--vae-batch-size", "2",
           "--vae-latent-dim", "6", "--device", "cpu", "--choose-t0", "--choose-t0-samples", "2"]
    result = subprocess.run(fit, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("chosen t0:") == 1  # the held-out sweep runs in the main process alone
    assert json.loads((out / "run.json").read_text())["chosen_t0"]["n"] == 2
    steps = [json.loads(line)["step"] for line in (out / "inversion" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one process logs
    assert len((out / "vae" / "log.jsonl").read_text().splitlines()) == 2
    assert set(json.loads((out / "run.json").read_text())["stages"]) == {"inversion", "vae"}
    vae = json.loads((out / "run.json").read_text())["stages"]["vae"]  # two processes share each update's images
    assert (vae["processes"], vae["batch_per_update"]) == (2, 4)
    assert vae["updates_per_epoch"] == json.loads((out / "vae" / "config.json").read_text())["num_images"] // 4
    assert (out / "learned_embeds.safetensors").exists() and (out / "vae" / "model.safetensors").exists()
    resume = [*launch, "invert", str(shapes), "--model", str(tiny_model), "--out", str(out), "--steps", "6",
              "--checkpoint-every", "2", "--batch-size", "2", "--resume", "--device", "cpu"]
    result = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]  # on the images --choose-t0 held out of the run, still
    steps = [json.loads(line)["step"] for line in (out / "inversion" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fit_with_an_imported_s_star_under_a_multi_process_launch(tmp_path, tiny_model, shapes, fitted_run):
    """The import is checked by every process and written by the main one; the custom VAE then trains on both."""
    import os

    out, source = tmp_path / "run", fitted_run / "learned_embeds.safetensors"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dyod.cli"]
    fit = [*launch, "fit", str(shapes), "--model", str(tiny_model), "--out", str(out), "--embedding", str(source),
           "--vae-epochs", "1", "--vae-batch-size", "2", "--vae-latent-dim", "6", "--device", "cpu"]
    result = subprocess.run(fit, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["stages"]["inversion"]["imported_from"] == str(source.resolve())
    assert info["stages"]["vae"]["processes"] == 2 and (out / "vae" / "model.safetensors").exists()
    assert result.stderr.count("imported from") == 1  # logged by the main process alone
    assert load_file(str(out / "learned_embeds.safetensors"))["<dyod>"].equal(load_file(str(source))["<dyod>"])


def test_sample_under_a_multi_process_launch_deals_out_the_seeds(cli_run, tmp_path):
    """`dyod sample` under torchrun: each process samples its share of the seeds, and the folder holds what one process
    makes. A command that does not share its work (interpolate) runs once, in the main process."""
    import os

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dyod.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["-n", "5", "--seed", "3", "--batch-size", "2", "--t0", "0.5", "--num-inference-steps", "4", "--device", "cpu"]
    result = subprocess.run([*launch, "sample", str(cli_run), *flags, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("wrote 5 images") == 1, result.stderr[-3000:]  # the folder is finished once
    assert main(["sample", str(cli_run), *flags, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "dyod_output.json").read_text())
    one = json.loads((tmp_path / "one" / "dyod_output.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["images"] == one["images"] == [f"seed-{s:06d}.png" for s in range(3, 8)]
    for name in one["images"] + ["grid.png"]:
        a, b = (np.asarray(Image.open(tmp_path / folder / name), dtype=int) for folder in ("one", "two"))
        assert np.abs(a - b).max() <= 1, name  # a seed's image, whichever process made it (up to rounding)

    result = subprocess.run([*launch, "interpolate", str(cli_run), "--seeds", "1,2", "--steps", "3", "--t0", "0.5",
                             "--num-inference-steps", "4", "--device", "cpu", "--out", str(tmp_path / "frames")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("wrote 3 images") == 1, result.stderr[-3000:]  # made once, not once per process
    assert json.loads((tmp_path / "frames" / "dyod_output.json").read_text())["images"] == [
        "frame-000.png", "frame-001.png", "frame-002.png"]


def test_datasets_make_writes_the_asked_number_of_images(tmp_path, capsys):
    assert main(["datasets", "make", "faces", str(tmp_path / "faces"), "-n", "3", "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "faces").glob("*.png")) == [f"{i:05d}.png" for i in range(3)]
    assert json.loads((tmp_path / "faces" / "dataset.json").read_text())["n"] == 3
    with pytest.raises(SystemExit) as e:
        main(["datasets", "make", "faces", str(tmp_path / "none"), "--n", "0"])
    assert e.value.code == 2 and "-n must be >= 1, got 0" in capsys.readouterr().err
    assert main(["datasets", "make", "faces", str(tmp_path / "faces"), "-n", "2"]) == 2  # never silently overwritten
    assert "dataset folder" in capsys.readouterr().err and len(list((tmp_path / "faces").glob("*.png"))) == 3
    (tmp_path / "faces" / "notes.txt").write_text("mine")
    # --overwrite with fewer images: the third image of the earlier dataset does not stay to be trained on
    assert main(["datasets", "make", "apple-orange", str(tmp_path / "faces"), "-n", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == ["00000.png", "00001.png", "dataset.json",
                                                                     "notes.txt"]


def test_datasets_make_takes_the_folder_as_out_too(tmp_path, capsys):
    assert main(["datasets", "make", "faces", "--out", str(tmp_path / "a"), "-n", "1"]) == 0
    assert [p.name for p in (tmp_path / "a").glob("*.png")] == ["00000.png"]
    assert main(["datasets", "make", "faces", "-n", "1"]) == 2
    assert "give the output folder" in capsys.readouterr().err
    assert main(["datasets", "make", "faces", str(tmp_path / "b"), "--out", str(tmp_path / "c"), "-n", "1"]) == 2
    assert "two output folders given" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_readme_commands_parse():
    """Every `dyod …` line of the README's code blocks is read by the parser as `main` reads it (flags renamed or
    removed would fail here): optional parts in brackets included, shell variables given a value."""
    import re
    import shlex

    from dyod.cli import _join_negative_values, build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = [line.split(" # ")[0].strip() for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
             for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("dyod ") and not line.startswith("dyod invert: error")]
    assert len(commands) >= 5
    parser = build_parser()
    for line in commands:
        words = shlex.split(re.sub(r"[\[\]]|\.\.\.", "", line.replace("$MODEL", "emoji-prior")))[1:]
        args = parser.parse_args(_join_negative_values(words))
        assert args.command == words[0], line


def test_every_flag_the_readme_names_exists():
    """A flag renamed or removed in the code but still in the README or a guide in docs/ fails here: every --flag they
    name is an option of a dyod command or of a benchmark script (`--vae-*` names a family)."""
    import argparse
    import re

    from dyod.cli import build_parser

    known = set()

    def walk(parser):
        for action in parser._actions:
            known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    known.add("--local-dir")  # of `hf download`, which the README names for downloading a model elsewhere
    known.add("--step")  # the README's example of a shortened flag, which dyod refuses
    root = Path(__file__).parents[1]
    for script in (root / "benchmarks").glob("*.py"):
        known.update(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))
    known.update(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", (root / "scripts" / "cli_reference.py").read_text()))
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])", doc.read_text()))
        assert named <= known, (doc.name, sorted(named - known))
    guides = "".join(doc.read_text() for doc in (root / "docs").glob("*.md"))
    assert len(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])", guides))) > 50


def test_the_training_commands_name_the_bundled_prior_in_their_help():
    """A new user's first `dyod fit DATA --model ?`: the flag's help names what works offline, by the name that
    resolves (the help text is written out so that `dyod --help` does not import torch)."""
    import argparse

    from dyod.cli import build_parser
    from dyod.prior import BUNDLED_PRIOR, resolve_model

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("fit", "invert"):
        model = next(a for a in commands[name]._actions if "--model" in a.option_strings)
        assert model.required and f"{BUNDLED_PRIOR}: the bundled reference prior" in model.help, name
    assert Path(resolve_model(BUNDLED_PRIOR), "model_index.json").is_file()


def test_a_mistyped_flag_is_refused_with_the_commands_usage_and_the_nearest_flag(tmp_path, capsys):
    """argparse refused `dyod sweep RUN --t0s 0.5` with dyod's top-level usage, which lists no flag of `sweep`; now
    the command's own usage and the flag meant, where one is near enough (none for `--count`, not `--out`)."""
    cases = [(["sweep", "RUN", "--t0s", "0.5", "--out", str(tmp_path / "o")], "dyod sweep",
              "unrecognized arguments: --t0s 0.5; --t0s: did you mean --t0?"),
             (["sample", "RUN", "--guidence-scale=3", "--out", str(tmp_path / "o")], "dyod sample",
              "unrecognized arguments: --guidence-scale=3; --guidence-scale: did you mean --guidance-scale?"),
             (["datasets", "make", "faces", str(tmp_path / "o"), "--count", "3"], "dyod datasets make",
              "unrecognized arguments: --count 3\n")]
    for argv, command, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"usage: {command} " in err and f"{command}: error: {message}" in err, err
    assert not (tmp_path / "o").exists()


def test_flags_are_taken_whole_and_a_shortened_one_is_refused_naming_the_flags_it_begins(tmp_path, capsys):
    """argparse's default took any unambiguous prefix (`--step 3` as `--steps 3`), which a flag added later would make
    ambiguous, breaking a user's script; dyod takes flags whole and names the ones a shortened flag begins, and the
    short flag given with two dashes."""
    cases = [(["interpolate", "RUN", "--seeds", "1,2", "--step", "3", "--out", str(tmp_path / "o")], "dyod interpolate",
              "unrecognized arguments: --step 3; --step: did you mean --steps?"),
             (["sample", "RUN", "--n", "5", "--out", str(tmp_path / "o")], "dyod sample",
              "unrecognized arguments: --n 5; --n: did you mean -n?"),
             (["sample", "RUN", "--num-inference", "5", "--out", str(tmp_path / "o")], "dyod sample",
              "--num-inference: did you mean --num-inference-steps?"),
             (["train-vae", "DATA", "--vae", "3", "--out", str(tmp_path / "o")], "dyod train-vae",
              "--vae: did you mean one of --vae-resolution, --vae-latent-dim, --vae-hidden-dims, ... (12 flags)?"),
             # a flag's last words: what sample calls --num-inference-steps, invert calls --steps
             (["sample", "RUN", "--steps", "5", "--out", str(tmp_path / "o")], "dyod sample",
              "--steps: did you mean --num-inference-steps?"),
             (["fit", "DATA", "--model", "M", "--epochs", "5", "--out", str(tmp_path / "o")], "dyod fit",
              "--epochs: did you mean --vae-epochs?")]
    for argv, command, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"{command}: error: " in err and message in err, err
    assert not (tmp_path / "o").exists()


def _every_parser(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _every_parser(child)


def test_every_flag_says_the_kind_of_value_it_takes_and_its_default():
    """Flags outside the configs showed argparse's made-up metavars (`--seed SEED`, `--steps STEPS`,
    `--inception-weights INCEPTION_WEIGHTS`) beside the configs' INT, FLOAT, TEXT, and several helps left out the
    default (`--seed`: 0 in every command, `world train-features` had no help at all)."""
    parsers = list(_every_parser(build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings)}"
            metavar = action.metavar or action.dest.upper()  # argparse's own: the flag's name, in capitals
            assert action.choices or metavar in ("INT", "FLOAT", "TEXT", "BOOL", "VALUE", "INT,INT", "LOW,HIGH",
                                                  "T0[,T0...]", "INT[,INT...]", "FILE", "DIR", "OUT", "MODEL", "DEVICE"), where
            assert action.help, where
            if action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool):
                assert "default" in parser._get_formatter()._get_help_string(action), where
    sample = next(parser for parser in parsers if parser.prog == "dyod sample").format_help()
    assert "first seed; sample i uses seed+i (default: 0)" in " ".join(sample.split())


def test_the_parser_and_dyod_info_import_no_model_library(cli_run):
    """`dyod --help` and a mistyped flag took 1.3 s (torch imported to build the parser), `dyod info` 4 s (diffusers
    and transformers imported only to quiet their logging); their verbosity is now set through the environment, which
    each reads on its first import, so a command that loads a model is as quiet as before."""
    script = f"""
import os, sys
from dyod.cli import build_parser, main
build_parser()
assert "torch" not in sys.modules
assert main(["info", {str(cli_run)!r}]) == 0
assert "diffusers" not in sys.modules and "transformers" not in sys.modules, "imported"
import diffusers, transformers
assert diffusers.utils.logging.get_verbosity() == diffusers.utils.logging.ERROR
assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_VERBOSITY")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"run {cli_run}" in done.stdout


def test_a_config_switch_alone_is_true(capsys):
    """`dyod fit DATA --grayscale` as `dyod transform … --grayscale`: a boolean setting given alone is true, and
    `--grayscale false` still reads."""
    from dyod.cli import build_parser, config_from_args
    from dyod.config import DataConfig, InversionConfig

    parser = build_parser()
    base = ["fit", "data", "--model", "m", "--out", "o"]
    assert config_from_args(parser.parse_args([*base, "--grayscale"]), DataConfig).grayscale is True
    assert config_from_args(parser.parse_args([*base, "--grayscale", "--max-images", "3"]), DataConfig).grayscale
    assert config_from_args(parser.parse_args([*base, "--grayscale", "false"]), DataConfig).grayscale is False
    assert config_from_args(parser.parse_args(base), DataConfig).grayscale is False
    assert config_from_args(parser.parse_args([*base, "--sample-latents", "no"]), InversionConfig).sample_latents is False
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--grayscale", "maybe"])
    assert "argument --grayscale: expected true or false, got 'maybe'" in capsys.readouterr().err


def test_version(capsys):
    import dyod

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dyod {dyod.__version__}"


def test_info_says_what_a_run_holds_and_what_comes_next(cli_run, shapes, tiny_model, tmp_path, capsys, monkeypatch):
    import shutil

    from dyod.run import Run
    from dyod.run_info import describe_run

    assert main(["info", str(cli_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run {cli_run}"
    assert lines[1] == f"  model: {tiny_model} (16 px, epsilon)"
    assert lines[2] == f"  data: 12 images at 32 px from {shapes.resolve()}"
    assert lines[3].startswith("  dataset prompt S*: <dyod> (1 vector), 3 steps, final loss ")
    active = json.loads((cli_run / "run.json").read_text())["stages"]["vae"]["active_dimensions"]
    assert lines[4].startswith(f"  custom VAE: 32 px, latent 6 ({active} active), 2 epochs, final loss ")
    assert lines[5] == f"  next: dyod sample {cli_run} -n 16 --out SAMPLES"

    again = tmp_path / "again"  # S* made, then `invert --overwrite` stopped at step 1: both are said
    shutil.copytree(cli_run, again)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint = again / "inversion" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(checkpoint)), str(checkpoint), metadata={**metadata, "step": "1"})
    assert describe_run(again).splitlines()[3].endswith(
        "; a new training stopped at step 1 of 3; --resume continues it")

    run = tmp_path / "run"  # both stages stopped: their checkpoints say where, and the next commands resume
    shutil.copytree(cli_run, run)
    (run / "learned_embeds.safetensors").unlink()
    (run / "vae" / "model.safetensors").unlink()
    Run.open(run).update(chosen_t0={"t0": 0.5, "kid_x100": 1.0, "fingerprint": {"embedding": "old", "vae": "old"}})
    assert main(["info", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3:] == ["  dataset prompt S*: stopped at step 3 of 3; --resume continues",
                         "  custom VAE: stopped at epoch 2 of 2; --resume continues",
                         "  chosen t0: 0.50 (held-out KID × 100 1.00), stale: a stage was trained again since; "
                         "`dyod tune` chooses again",
                         f"  next: dyod invert {shapes.resolve()} --model {tiny_model} --out {run} --resume; then "
                         f"dyod train-vae {shapes.resolve()} --out {run} --resume"]

    Run.open(run).update(model=str(tmp_path / "moved-away"))
    assert describe_run(run).splitlines()[1] == (f"  model: {tmp_path / 'moved-away'} (16 px, epsilon) — not on this "
                                                 "machine: the sampling commands take --model NEW_PLACE")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    Run.open(run).update(model="dyod-test/tiny-sd")
    assert describe_run(run).splitlines()[1] == ("  model: dyod-test/tiny-sd (16 px, epsilon) — a hub id, not in this "
                                                 "machine's Hugging Face cache: the sampling commands download it "
                                                 "(online)")
    snapshot = tmp_path / "hub" / "models--dyod-test--tiny-sd" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert describe_run(run).splitlines()[1].endswith(" — a hub id, in this machine's Hugging Face cache")

    Run.open_or_create(tmp_path / "new")  # made, nothing trained
    assert main(["info", str(tmp_path / "new")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  model: none yet", "  dataset prompt S*: not trained", "  custom VAE: not trained",
        f"  next: dyod invert DATA --model MODEL --out {tmp_path / 'new'}; then dyod train-vae DATA --out "
        f"{tmp_path / 'new'}"]
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "run folder" in capsys.readouterr().err


def test_info_says_what_made_a_folder_of_outputs_and_a_non_run_is_named_for_what_it_is(cli_run, shapes, tmp_path,
                                                                                       capsys):
    """`dyod info SAMPLES` said "has no run.json; create one with `dyod fit ... --out SAMPLES`"; now it says what made
    them and how to score them. Given where a run goes, a folder of outputs names the run that made them, a folder
    of images says to fit a run on it (not to make one inside it)."""
    fast = ["--num-inference-steps", "4", "--device", "cpu"]
    samples, between, along = tmp_path / "samples", tmp_path / "between", tmp_path / "along"
    assert main(["sample", str(cli_run), "-n", "3", "--seed", "5", "--t0", "0.5", "--out", str(samples), *fast]) == 0
    assert main(["interpolate", str(cli_run), "--seeds", "3,7", "--steps", "3", "--out", str(between), *fast]) == 0
    assert main(["traverse", str(cli_run), "--dim", "2", "--range=-1,1", "--steps", "3", "--out", str(along),
                 *fast]) == 0
    capsys.readouterr()
    made_by = f"from run {cli_run.resolve()}"
    score = f"  next: dyod eval {{}} (KID × 100 against the run's dataset, {shapes.resolve()})"
    model = json.loads((cli_run / "run.json").read_text())["model"]
    assert main(["info", str(samples)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"outputs {samples}: 3 images made by `dyod sample` {made_by} (model {model})",
        "  t0 0.5 (2 of 4 DDIM steps), guidance 7.5, prompt 'a photo of {}'", "  seeds 5–7", score.format(samples)]
    assert main(["info", str(between)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == (
        "  between the custom VAE latents of seeds 3 and 7, 3 steps, the forward noise held fixed")
    assert main(["info", str(along)]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == ["  latent dimension 2 at -1.0, 0.0, 1.0, the rest from seed 0",
                                                        score.format(along)]

    # scored against the run's dataset without naming it, as against it named
    assert main(["eval", str(samples), "--json", str(tmp_path / "by_record.json")]) == 0
    assert main(["eval", str(samples), str(shapes), "--json", str(tmp_path / "named.json")]) == 0
    by_record = json.loads((tmp_path / "by_record.json").read_text())
    assert by_record == json.loads((tmp_path / "named.json").read_text()) and by_record["n_reference"] == 12
    (along / "dyod_output.json").write_text(json.dumps({"command": "traverse", "run_path": str(tmp_path / "gone")}))
    assert main(["info", str(along)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"  next: dyod eval {along} DATA_DIR (KID × 100 against a folder of images)")
    assert main(["eval", str(along)]) == 2  # the run is gone: the reference must be named
    assert "give the reference folder" in capsys.readouterr().err

    assert main(["sample", str(samples), "-n", "1", "--out", str(tmp_path / "o")]) == 2
    assert (f"{samples} holds the outputs of `dyod sample` (its dyod_output.json), not a run; the run that made "
            f"them: {cli_run.resolve()}") in capsys.readouterr().err
    assert main(["transform", str(shapes), str(shapes), "--out", str(tmp_path / "o")]) == 2
    assert (f"{shapes} holds images, not a run (no run.json); fit a run on them with `dyod fit {shapes} --model "
            "MODEL --out RUN`") in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (shapes / "run.json").exists()


def test_info_on_a_folder_of_images_says_what_dyod_will_read(shapes, tiny_model, tmp_path, capsys):
    """Before fitting: how many images dyod reads, of which kinds and sizes, the resolution of its outputs, and the
    files it cannot open; a model folder given as a run says to give it as --model."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    Image.new("RGB", (48, 40), "red").save(data / "wide.jpg")
    (data / "broken.png").write_bytes(b"not an image")
    assert main(["info", str(data)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"data {data}: 14 image files (13 .png, 1 .jpg)",
        "  sizes: 32x32 (12), 48x40 (1); outputs at 32 px, or at the model's resolution where that is smaller "
        "(non-square images are centre-cropped)",
        "  cannot be read: 1, e.g. broken.png: cannot identify image file "
        f"'{data / 'broken.png'}' (left out, with the reason in the run's data.json)",
        f"  next: dyod fit {data} --model MODEL --out RUN"]
    assert main(["info", str(tiny_model)]) == 2
    assert (f"{tiny_model} is a diffusers model (model_index.json), not a run; fit a run with it: `dyod fit DATA_DIR "
            f"--model {tiny_model} --out RUN`") in capsys.readouterr().err


def test_the_commands_dyod_suggests_quote_paths_with_spaces(cli_run, shapes, tmp_path):
    """`next: dyod sample my run -n 16` copied into a shell is two arguments; quoted, it is the run."""
    import shutil

    from dyod.run import Run
    from dyod.run_info import describe_run

    run, data = tmp_path / "my run", tmp_path / "my data"
    shutil.copytree(cli_run, run)
    shutil.copytree(shapes, data)
    assert describe_run(run).splitlines()[-1] == f"  next: dyod sample '{run}' -n 16 --out SAMPLES"
    Run.open(run).update(data={**Run.open(run).info["data"], "root": str(data)})
    (run / "learned_embeds.safetensors").unlink()
    assert describe_run(run).splitlines()[-1].startswith(f"  next: dyod invert '{data}' --model ")
    with pytest.raises(DyodError, match=f"`dyod fit '{data}' --model MODEL --out RUN`"):
        Run.open(data)


def test_a_file_given_as_the_run_names_the_run_it_is_in(cli_run, tmp_path, capsys):
    assert main(["sample", str(cli_run / "vae" / "model.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert (f"{cli_run / 'vae' / 'model.safetensors'} is a file, not a run folder; it is in the run {cli_run}: give "
            "that folder") in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("")
    assert main(["info", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file, not a run folder; give the folder `dyod fit --out` made" in capsys.readouterr().err


def test_a_prompt_without_s_star_is_warned_of(cli_run, tmp_path, caplog):
    """`--prompt "a painting of a cat"` (the {} forgotten) sampled the prior without the dataset prompt, silently;
    now the sampling commands say so. With {} or the token written out, nothing is said."""
    base = ["sample", str(cli_run), "-n", "1", "--t0", "1", "--num-inference-steps", "1", "--device", "cpu",
            "--overwrite", "--out", str(tmp_path / "s")]
    for prompt, warned in (("a painting of a cat", True), ("a painting of {}", False), ("a photo of <dyod>", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dyod"):
            assert main([*base, "--prompt", prompt]) == 0
        warning = (f"--prompt {prompt!r} holds neither {{}} nor the learned token <dyod>: the images are not "
                   "conditioned on the dataset prompt S*")
        assert (warning in caplog.text) == warned, caplog.text


def test_the_cli_reference_in_docs_is_what_the_parser_says():
    """docs/cli.md is generated from the parser (scripts/cli_reference.py), so help and docs cannot drift apart."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "scripts" / "cli_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "## `dyod export`" in (root / "docs" / "cli.md").read_text()
