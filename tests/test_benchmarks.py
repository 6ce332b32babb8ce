"""The benchmark scripts run their code paths at toy settings on the CPU, so they cannot rot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def load_script(name: str):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sd15_speed_tiny_prints_the_full_table(tmp_path):
    module = load_script("sd15_speed")
    text = module.main(["--tiny", "--json", str(tmp_path / "rows.json")])
    rows_table = text.split("\n\n")[1]  # after the header; the parts of a sampling batch follow in a table of their own
    lines = [line for line in rows_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert [tuple(c[:3]) for c in cells] == [
        ("sampling", "diffusers txt2img 50 steps", "2"), ("sampling", "diffusers img2img strength 0.7", "2"),
        ("sampling", "dyod t0=0.7", "2"),
        ("dataset prompt", "diffusers example", "1"), ("dataset prompt", "dyod", "1"),
        ("dataset prompt", "diffusers example", "2"), ("dataset prompt", "dyod", "2"),
        ("encode dataset (once)", "dyod, fp32 VAE", "2"),
        # optional rows, by priority (compiled ones are not run on the CPU; CUDA graphs fall back to the traced graph)
        ("dataset prompt", "dyod + CUDA graphs of the eager kernels", "2"),
        ("dataset prompt", "dyod with autograd's own frozen layers (before)", "2"),
        ("dataset prompt", "dyod + checkpointing the feed-forward projections", "2"),
        ("dataset prompt", "dyod in fp32, TF32 off (the reference)", "2"),
        ("dataset prompt", "dyod + checkpointing 1 finest level + feed-forwards", "2"),
        ("dataset prompt", "dyod + checkpointing 2 finest levels + feed-forwards", "2"),
        ("dataset prompt", "dyod + checkpointing all blocks", "2"),
        ("dataset prompt", "dyod + channels-last (eager)", "2"),
        ("sampling", "dyod t0=0.7 + CUDA graphs of the eager kernels", "2"),
        ("sampling", "dyod t0=0.7 + channels-last (eager)", "2"),
    ]
    for c in cells:  # every row measured; sampling and training rows carry a ratio against their diffusers peer
        assert float(c[3]) > 0
        assert c[4].startswith("×") or c[0] == "encode dataset (once)"
    assert cells[1][4] == "×1.00"  # the sampling peer is img2img at the same strength
    assert "(" in cells[2][5] and "(" in cells[-1][5]  # dyod's rows say how much of their time is the reverse process
    # Each dyod sampling row, and the img2img peer, time the parts of a batch besides the reverse process.
    written = json.loads((tmp_path / "rows.json").read_text())
    rows = written["rows"]
    phases = {r["method"]: r.get("phases_s_per_iter") for r in rows if r["stage"] == "sampling"}
    assert set(phases["dyod t0=0.7"]) == {"custom VAE + Lanczos up", "encode (prior's autoencoder)",
                                          "decode + Lanczos down + 8-bit images", "text condition (2 prompts)"}
    assert set(phases["diffusers img2img strength 0.7"]) == {"autoencoder (encode + decode)"}
    assert phases["diffusers txt2img 50 steps"] is None
    assert all(s > 0 for p in phases.values() if p for s in p.values())
    assert "| dyod t0=0.7 | encode (prior's autoencoder) |" in text
    # The eager dyod step at the largest batch also times the sample grid `dyod invert` writes while training.
    grid = [r for r in rows if r["method"] == "dyod" and r["stage"] == "dataset prompt"]
    assert [r.get("sample_grid_s") is not None for r in grid] == [False, True] and grid[1]["sample_grid_s"] > 0
    # The fast path computes what the fp32 path computes (on the CPU it is fp32 with channels-last and fused q/k/v).
    notes = written["notes"]
    errors = notes["faithfulness_relative_l2"]
    assert len(errors) == 4  # one UNet call, eager, then CUDA graphs and eager channels-last (the second check)
    assert all(0 <= e < 1e-4 for e in errors.values())
    # The training variants draw the same batches: their first losses match eager dyod's (fp32 on the CPU).
    training = notes["training_first_losses_relative_difference_vs_eager"]
    checkpointed = ("the feed-forward projections", "1 finest level + feed-forwards", "2 finest levels + feed-forwards",
                    "all blocks")
    assert set(training) == {f"dyod + {v}, batch 2" for v in ("channels-last (eager)",)} | {
        f"dyod + checkpointing {v}, batch 2" for v in checkpointed} | {"dyod with autograd's own frozen layers (before), batch 2",
                                  "dyod + CUDA graphs of the eager kernels, batch 2",
                                  "dyod vs dyod in fp32, TF32 off (the reference), batch 2"}
    assert all(0 <= e < 1e-5 for e in training.values())


@pytest.mark.slow
def test_sd15_speed_budget_skips_the_optional_rows_alone(tmp_path):
    """Past --budget-s the optional variants are listed as skipped; the peers and eager dyod, which every table needs,
    are still measured (on a GPU the budget keeps the whole table within one call of the device machine)."""
    text = load_script("sd15_speed").main(["--tiny", "--budget-s", "0", "--sections", "training",
                                           "--train-checkpointing", "all", "--json", str(tmp_path / "rows.json")])
    rows = {(r["method"], r["batch"]): r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    for method in ("diffusers example", "dyod"):
        for batch in (1, 2):
            assert rows[(method, batch)]["images_per_s"] > 0
    skipped = [key for key, r in rows.items() if r.get("error") == "skipped: out of time"]
    assert ("dyod + checkpointing all blocks", 2) in skipped and len(skipped) == len(rows) - 4
    assert "skipped: out of time" in text


@pytest.mark.slow
def test_training_memory_measures_what_checkpointing_saves(tmp_path):
    """benchmarks/training_memory.py at tiny widths and a real 64 x 64 latent: the per-image memory of a step is
    measured (each step in its own process), and recomputing every block's activations shows up as far less of it."""
    module = load_script("training_memory")
    before = "dyod with autograd's own frozen layers (before)"
    text = module.main(["--tiny", "--methods", f"dyod,{before},dyod + checkpointing all blocks",
                        "--json", str(tmp_path / "m.json")])
    assert "| dyod + checkpointing all blocks |" in text and "projected peak at batch 8" in text
    plain, autograds_own, checkpointed = json.loads((tmp_path / "m.json").read_text())["summary"]
    assert plain["method"] == "dyod" and autograds_own["method"] == before
    assert not any("error" in s for s in (plain, autograds_own, checkpointed))
    assert plain["per_image_bytes"] > 2**20  # activations dominate at this latent size
    assert checkpointed["per_image_bytes"] < 0.9 * plain["per_image_bytes"]  # how much less depends on the CPU's kernels
    # dyod's frozen layers keep neither convolution inputs nor gelu outputs (the breakdown counts 29 % less)
    assert plain["per_image_bytes"] < 0.85 * autograds_own["per_image_bytes"]
    assert checkpointed["resident_bytes"] == plain["resident_bytes"]  # the same weights stay on the device


def test_training_memory_breakdown_shows_what_the_frozen_layers_no_longer_keep():
    text = load_script("training_memory").main(["--tiny", "--breakdown"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert float(rows["Convolution.input"][0]) > 0 and float(rows["Convolution.input"][2]) == 0
    assert float(rows["Mul.other"][0]) > 0 and float(rows["Mul.other"][2]) == 0  # gelu(gate): recomputed
    assert float(rows["Silu.self"][0]) >= 5 * float(rows["Silu.self"][2])  # the resnets' normalized x: recomputed
    assert rows["NativeLayerNorm.input"][0] == rows["NativeLayerNorm.input"][2]  # the rest as it was


@pytest.mark.slow
def test_results_page_script_runs_small(tmp_path):
    """benchmarks/results.py end to end at toy settings: the summary, Table 1, the diagnosis, and the hand-written
    findings carried into the page."""
    module = load_script("results")
    out = tmp_path / "docs"
    (out / "results").mkdir(parents=True)
    (out / "results" / "findings.md").write_text("## Findings\n\nwritten by hand\n")
    module.main(["--datasets", "faces", "--n-images", "24", "--n-samples", "6", "--inversion-steps", "2",
                 "--vae-epochs", "1", "--t0s", "0.5,1.0", "--out", str(out), "--work", str(tmp_path / "work")])
    page = (out / "RESULTS.md").read_text()
    assert "| faces | 0.5 |" in page  # the summary row: the only DYOD t0 is the best one
    assert "## Findings\n\nwritten by hand" in page
    assert "prior + S* (t0 = T)" in page and "the floor of any t0" in page
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert [row["dataset"] for row in summary] == ["faces"]
    assert len(summary[0]["diagnosis"]) == 5  # floor, VAE through the autoencoder, two guidance scales, no S*
    assert all(d["kid_x100"] == d["kid_x100"] for d in summary[0]["diagnosis"])  # no NaN


@pytest.mark.slow
def test_host_overhead_script_times_every_method():
    """benchmarks/host_overhead.py at one round of one step: every method's step runs at SD 1.5's topology and gets a
    row with its ratio to the peer (the times themselves are the script's to report, not the test's to judge)."""
    module = load_script("host_overhead")
    threads = torch.get_num_threads()
    text = module.main(["--steps", "1", "--rounds", "1"])
    assert torch.get_num_threads() == threads  # timed on one thread, the caller's setting restored
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].strip() for r in rows] == list(module.METHODS)
    assert rows[0][2].strip() == "×1.00" and all(float(r[1]) > 0 for r in rows)
    unet = module.TOPOLOGY.unet  # SD 1.5's topology: the UNet's defaults but for the widths
    assert "down_block_types" not in unet and len(unet["block_out_channels"]) == 4


@pytest.mark.slow
def test_compile_time_script_compiles_each_way_in_its_own_process():
    """benchmarks/compile_time.py on a toy UNet: three processes, each compiling once; the second one finds the first
    one's inductor cache (it compiles in a fraction of the time, here by far more than timing noise) and every
    compiled UNet computes what the eager one does."""
    module = load_script("compile_time")
    text = module.main(["--tiny", "--calls", "1"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == list(module.METHODS)
    cold, warm, _ = (float(r[1]) for r in rows)
    assert warm < cold / 2
    assert all(float(r[4]) < 1e-4 for r in rows)


def test_decoder_finetune_trains_the_decoder_alone(tiny_model):
    """The experiment's premise: the encoder (hence the latent space the UNet, S* and the runs live in) is untouched
    bit for bit while the decoder learns the images."""
    from diffusers import AutoencoderKL

    module = load_script("decoder_finetune")
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    mse_before = module.reconstruction_mse(vae, images)
    losses = module.finetune_decoder(vae, images, steps=30, batch_size=4, lr=1e-3, seed=0)
    after = vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert not any(p.requires_grad for p in vae.parameters())
    assert len(losses) == 30 and module.reconstruction_mse(vae, images) < mse_before


@pytest.mark.slow
def test_unet_generalization_scores_both_held_out_sets(capsys):
    """benchmarks/unet_generalization.py on the bundled prior at 8 scenes a set: the autoencoder column is the scenes
    through the prior's autoencoder, scored as the script scores them, and img2img is measured on both sets."""
    from diffusers import AutoencoderKL

    from dyod.config import PretrainConfig
    from dyod.evaluation import feature_extractor, kid
    from dyod.prior import bundled_prior_path
    from dyod.world.concepts import heldout_corpora, render_scenes, to_unit

    script = load_script("unet_generalization")
    results = script.measure(bundled_prior_path(), n=8, steps=10, batch_size=4)
    assert set(results) == {"in_set", "out_of_set"}
    vae = AutoencoderKL.from_pretrained(bundled_prior_path() / "vae")
    extractor = feature_extractor("emoji")
    x = to_unit(render_scenes(heldout_corpora(PretrainConfig())["out_of_set"], range(8))[0])
    with torch.no_grad():  # the round trip written out, not the script's helper
        through = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    expected = kid(extractor(through), extractor(x), num_subsets=50, seed=0).mean_x100
    assert results["out_of_set"]["autoencoder"] == pytest.approx(expected, rel=1e-6)
    assert all(row["img2img"] != row["autoencoder"] for row in results.values())
