"""The browser UI: ``dyod.studio`` (what each tab does) against the library and the command line, the Gradio app
through gradio_client, and the page itself in Debian's headless Chromium driven by Playwright."""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dyod.errors import DyodError
from dyod.studio import Studio, find_runs, on_white, unet_calls


def _pixels(images):
    return [np.asarray(im.convert("RGB")) for im in images]


def _sketch(size: int = 256) -> Image.Image:
    """A stroke painting: a red disc and a blue bar on white, as someone would draw it on the pad."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 150, 150), fill=(229, 57, 53))
    draw.rectangle((120, 170, 230, 210), fill=(30, 136, 229))
    return image


def test_find_runs_takes_run_folders_and_the_runs_under_a_folder(fitted_run, tmp_path):
    assert find_runs([fitted_run]) == [Path(fitted_run)]
    assert find_runs([fitted_run.parent]) == [Path(fitted_run)]  # a folder of runs
    assert find_runs([fitted_run, fitted_run.parent]) == [Path(fitted_run)]  # each once
    with pytest.raises(DyodError, match=r"no run folders \(with run.json\) in .*: fit one first with `dyod fit"):
        find_runs([tmp_path])
    with pytest.raises(DyodError, match=r"nowhere is not there: give run folders made by `dyod fit`"):
        find_runs([tmp_path / "nowhere"])


def test_the_cost_shown_beside_the_t0_slider_is_the_samplers_step_count():
    from dyod.sampling import num_denoising_steps

    for t0 in (0.05, 0.3, 0.58, 1.0):
        n = num_denoising_steps(t0, 50)
        assert unet_calls(t0).startswith(f"{n} UNet call{'s' if n > 1 else ''} per batch")
    assert "(2.0× fewer than from pure noise)" in unet_calls(0.5)


def test_a_transparent_sketch_is_painted_on_white():
    stroke = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    stroke.putpixel((3, 3), (255, 0, 0, 255))
    flat = np.asarray(on_white(stroke))
    assert flat.shape == (8, 8, 3) and tuple(flat[3, 3]) == (255, 0, 0) and (flat[0, 0] == 255).all()


def test_the_sketch_tab_is_dyod_transform_of_the_sketch(fitted_run, tmp_path):
    """Eq. 11 on the pad's image: what the library's transform (hence `dyod transform`) makes of the same sketch,
    result i with noise seed seed + i, grayscale as the command reads it."""
    from dyod.config import SampleConfig
    from dyod.pipeline import DyodPipeline

    studio = Studio([fitted_run], device="cpu", out=tmp_path)
    pipe = DyodPipeline.for_sampling(fitted_run, device="cpu")
    sketch = _sketch()
    for grayscale in (False, True):
        got = studio.sketch_to_domain(str(fitted_run), sketch, 0.4, grayscale, 3.0, seed=5, n=3)
        want = pipe.transform([sketch] * 3, SampleConfig(t0=0.4, guidance_scale=3.0), seed=5, grayscale=grayscale,
                              progress=False)
        assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(_pixels(got), _pixels(want)))
    assert not np.array_equal(*_pixels(got[:2]))  # each result its own noise


def test_the_sample_tab_writes_what_dyod_sample_writes(fitted_run, tmp_path):
    """The same images, the same PNG metadata (run, model, settings, seed) as `dyod sample`, and the VAE's samples at
    the same seeds beside them."""
    from dyod.cli import main
    from dyod.outputs import PNG_KEY
    from dyod.pipeline import DyodPipeline

    studio = Studio([fitted_run], device="cpu", out=tmp_path / "ui")
    vae, images, files = studio.sample(str(fitted_run), 0.5, n=3, seed=2)
    assert main(["sample", str(fitted_run), "--out", str(tmp_path / "cli"), "-n", "3", "--seed", "2", "--t0", "0.5",
                 "--device", "cpu"]) == 0
    cli = sorted((tmp_path / "cli").glob("seed-*.png"))
    assert [f.name for f in files] == [f.name for f in cli] == ["seed-000002.png", "seed-000003.png", "seed-000004.png"]
    for ours, theirs, image in zip(files, cli, images):
        a, b = Image.open(ours), Image.open(theirs)
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(image))
        assert json.loads(a.text[PNG_KEY]) == json.loads(b.text[PNG_KEY])
    assert json.loads(Image.open(files[0]).text[PNG_KEY])["seed"] == 2
    want = DyodPipeline.for_sampling(fitted_run, device="cpu").vae_samples([2, 3, 4])
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(vae), _pixels(want)))


def test_the_explore_tab_is_the_librarys_interpolation_and_traversal(fitted_run, tmp_path):
    from dyod.config import SampleConfig
    from dyod.pipeline import DyodPipeline
    from dyod.run import Run
    from dyod.vae import most_active_dimensions
    from dyod.vae_training import run_latent_activity

    studio = Studio([fitted_run], device="cpu", out=tmp_path)
    pipe = DyodPipeline.for_sampling(fitted_run, device="cpu")
    config = SampleConfig(t0=0.5)
    frames = studio.interpolate(str(fitted_run), 0.5, seed_a=1, seed_b=4, steps=4)
    want = pipe.interpolate(1, 4, 4, config, fix_noise=True, progress=False)
    assert len(frames) == 4 and all(np.array_equal(a, b) for a, b in zip(_pixels(frames), _pixels(want)))
    strips = studio.traverse(str(fitted_run), 0.5, seed=3, active=2, steps=3, spread=2.0)
    dims = most_active_dimensions(run_latent_activity(Run.open(fitted_run)), 2)
    assert [d for d, _ in strips] == dims and all(len(strip) == 3 for _, strip in strips)
    want = pipe.traverse(3, dims, [-2.0, 0.0, 2.0], config, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels([im for _, s in strips for im in s]), _pixels(want)))


def test_the_studio_refuses_what_it_cannot_do_with_the_librarys_message(fitted_run, tmp_path):
    no_prompt = tmp_path / "runs" / "no-prompt"
    shutil.copytree(fitted_run, no_prompt)
    (no_prompt / "learned_embeds.safetensors").unlink()
    studio = Studio([tmp_path / "runs"], device="cpu", out=tmp_path / "ui")
    with pytest.raises(DyodError, match=r"has no dataset prompt S\* .* run `dyod invert` \(or `dyod fit`\) first"):
        studio.sample(str(no_prompt), 0.5, n=1)
    studio = Studio([fitted_run], device="cpu", out=tmp_path / "ui")
    with pytest.raises(DyodError, match="draw a sketch or upload an image first"):
        studio.sketch_to_domain(str(fitted_run), None, 0.5)
    with pytest.raises(DyodError, match=r"t0 must be a fraction of T in \(0, 1\], got 0.0"):
        studio.sample(str(fitted_run), 0.0)
    with pytest.raises(DyodError, match="the number of images must be between 1 and 64, got 65"):
        studio.sample(str(fitted_run), 0.5, n=65)
    with pytest.raises(DyodError, match="is not one of the runs this UI serves"):
        studio.describe(str(no_prompt))
    with pytest.raises(DyodError, match="give two images to interpolate between, or none"):
        studio.interpolate(str(fitted_run), 0.5, image_a=_sketch())


def test_the_ui_needs_gradio_and_says_how_to_get_it(monkeypatch):
    import builtins

    from dyod.ui import require_gradio

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio":
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    with pytest.raises(DyodError, match=r"dyod ui needs Gradio, an optional extra: pip install 'dyod\[ui\]'"):
        require_gradio()


def test_the_sketch_pad_reads_blank_as_nothing_drawn():
    from dyod.ui import blank_canvas, drawn

    assert drawn(blank_canvas()) is None and drawn(None) is None
    painted = blank_canvas()
    painted["composite"] = _sketch()
    assert np.array_equal(np.asarray(drawn(painted)), np.asarray(_sketch()))
    empty = {**blank_canvas(), "composite": Image.new("RGBA", (256, 256), (0, 0, 0, 0))}
    assert drawn(empty) is None  # transparent: the pad's canvas before a stroke


# -- the server -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(fitted_run, tmp_path_factory):
    """`dyod ui RUN` in a thread of this process, on a free port of 127.0.0.1."""
    pytest.importorskip("gradio", reason="the ui extra (pip install 'dyod[ui]') is not installed")
    from dyod.ui import serve

    port = _free_port()
    app = serve([str(fitted_run)], port=port, device="cpu", block=False)
    yield f"http://127.0.0.1:{port}/", fitted_run
    app.close()


def test_each_tab_through_gradio_client(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, run = served
    client = Client(url, verbose=False)
    path = tmp_path / "sketch.png"
    _sketch().save(path)
    editor = {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))}
    results = client.predict(str(run), editor, 0.5, False, 3.0, 0, 2, api_name="/sketch")
    assert len(results) == 2
    vae, images, files = client.predict(str(run), 0.5, 3, 0, api_name="/sample")
    assert len(vae) == len(images) == len(files) == 3
    assert "seed" in json.loads(Image.open(files[0]).text["dyod"])
    assert len(client.predict(str(run), 0.5, 0, 1, 4, None, None, api_name="/interpolate")) == 4
    strips = client.predict(str(run), 0.5, 0, 2, 3, 2.0, api_name="/traverse")  # a strip of 3 per dimension
    assert len(strips) == 2 and Image.open(strips[0]["image"]).width > 3 * Image.open(files[0]).width
    with pytest.raises(AppError, match="draw a sketch or upload an image first"):  # a blank pad
        client.predict(str(run), {"background": None, "layers": [], "composite": None}, 0.5, False, 3.0, 0, 2,
                       api_name="/sketch")
    with pytest.raises(AppError, match="give two images to interpolate between"):
        client.predict(str(run), 0.5, 0, 1, 4, handle_file(str(path)), None, api_name="/interpolate")
    assert len(client.predict(str(run), 0.5, 3, 0, api_name="/sample")[1]) == 3  # still serving after the errors
    info, t0, cost = client.predict(str(run), api_name="/chose_run")  # the Runs tab, and the run's t0 preselected
    assert info.startswith(f"run {run}") and t0 == 0.7 and cost.startswith("35 UNet calls")


def test_a_second_click_waits_for_the_first_job(served, monkeypatch):
    """One job at a time: two jobs sent together run one after the other, never side by side."""
    import threading

    from gradio_client import Client

    url, run = served
    spans, lock = [], threading.Lock()
    real = Studio.describe

    def slow_describe(self, name):
        start = time.monotonic()
        time.sleep(1.0)
        with lock:
            spans.append((start, time.monotonic()))
        return real(self, name)

    monkeypatch.setattr(Studio, "describe", slow_describe)
    client = Client(url, verbose=False)
    jobs = [client.submit(str(run), api_name="/chose_run") for _ in range(2)]
    assert all(job.result(timeout=60)[0].startswith(f"run {run}") for job in jobs)
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1  # the second started after the first had finished


# -- the page in a real browser ---------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """A run fitted on the bundled prior at test size (a few steps of S*, a small custom VAE)."""
    import dyod
    from dyod.testing import make_shapes_dataset

    data = make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=12, size=32)
    out = tmp_path_factory.mktemp("runs") / "bundled"
    dyod.invert(data, "emoji-prior", out, dyod.InversionConfig(steps=5, batch_size=2, checkpoint_every=0),
                progress=False, device="cpu")
    dyod.train_vae(data, out, dyod.VAEConfig(epochs=2, batch_size=4, latent_dim=8), progress=False, device="cpu")
    return out


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (scripts/test.sh installs Debian's chromium with apt-get)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    return playwright.sync_playwright()


def test_the_page_turns_a_drawn_stroke_into_images_in_a_real_browser(bundled_run, tmp_path):
    """Draw on the sketch pad, move the t0 slider, run: the gallery shows the results at the dataset's size, they
    change with t0, and no request of the page left 127.0.0.1. Screenshots of each tab go to $DYOD_SCREENSHOTS."""
    import subprocess
    import sys

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "dyod.cli", "ui", str(bundled_run), "--port", str(port),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shots = Path(os.environ.get("DYOD_SCREENSHOTS", tmp_path))
    try:
        with _browser() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            hosts = set()
            page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
            deadline = time.time() + 120
            while True:  # the server loads its run first
                try:
                    page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
                    break
                except Exception:
                    if time.time() > deadline or server.poll() is not None:
                        raise
                    time.sleep(1)
            page.locator("#sketch button[aria-label='Brush']").click()
            page.wait_for_timeout(500)
            box = page.locator("#sketch canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2 - 40  # the sheet is centred
            page.mouse.move(x, y)
            page.mouse.down()
            for i in range(25):
                page.mouse.move(x + 5 * i, y + 3 * i)
            page.mouse.up()

            def run_at(t0: str) -> list[bytes]:
                number = page.locator("#sketch-t0 input[type='number']")
                number.fill(t0)
                number.press("Enter")
                page.wait_for_function(f"document.querySelector('#sketch-cost').innerText.startsWith('{round(float(t0) * 50)} UNet')")
                before = page.locator("#sketch-out img").first.get_attribute("src") if page.locator(
                    "#sketch-out img").count() else None
                page.locator("#sketch-go").click()
                page.wait_for_function(  # the gallery holds this click's 4 results (their files are new)
                    "old => { const im = document.querySelectorAll('#sketch-out img');"
                    " return im.length == 4 && im[0].getAttribute('src') != old"
                    " && [...im].every(e => e.complete && e.naturalWidth > 0); }", arg=before, timeout=120_000)
                page.wait_for_load_state("networkidle")
                images = page.locator("#sketch-out img")
                assert images.count() == 4
                sizes = [images.nth(i).evaluate("e => [e.naturalWidth, e.naturalHeight]") for i in range(4)]
                assert sizes == [[32, 32]] * 4  # the dataset's resolution
                return [page.request.get(images.nth(i).get_attribute("src")).body() for i in range(4)]

            try:
                low = run_at("0.3")
            except Exception:
                page.screenshot(path=str(shots / "ui-failed.png"))
                raise
            page.screenshot(path=str(shots / "ui-sketch.png"))
            high = run_at("0.8")
            assert low != high  # another t0, other images
            for tab in ("Sample", "Explore", "Runs"):
                page.get_by_role("tab", name=tab).click()
                if tab == "Sample":
                    page.locator("#sample-go").click()
                    page.locator("#sample-out img").nth(7).wait_for(timeout=120_000)
                if tab == "Explore":
                    page.locator("#interp-go").click()
                    page.locator("#interp-out img").nth(7).wait_for(timeout=120_000)
                    page.locator("#trav-go").click()
                    page.locator("#trav-out img").nth(2).wait_for(timeout=120_000)
                page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy images below the fold load
                page.wait_for_timeout(500)
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(shots / f"ui-{tab.lower()}.png"), full_page=tab == "Explore")
            assert str(bundled_run) in page.locator("#run-info").inner_text()
            browser.close()
        assert hosts == {f"127.0.0.1:{port}"}, hosts
    finally:
        server.terminate()
        print(server.communicate(timeout=30)[0].decode(errors="replace")[-4000:])  # shown when the test fails
