"""``dyod ui``: the browser page (Gradio) over ``dyod.studio``: sketch → your domain (Eq. 11), sample (Eq. 9-10),
explore the custom VAE's latent space, and the runs served. Local only: no analytics, fonts or scripts from elsewhere."""

from __future__ import annotations

import logging
import os

from PIL import Image

from .errors import DyodError
from .studio import MAX_IMAGES, Studio, on_white, unet_calls

logger = logging.getLogger(__name__)

# the brush's palette: the flat colours a stroke painting (the paper's Fig. 5) is made of
PALETTE = ["#e53935", "#fb8c00", "#fdd835", "#43a047", "#1e88e5", "#8e24aa", "#6d4c41", "#212121", "#ffffff"]


def require_gradio():
    """Gradio is an optional extra: say how to get it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before the import: no usage reports sent anywhere
    try:
        import gradio
    except ImportError:
        raise DyodError("dyod ui needs Gradio, an optional extra: pip install 'dyod[ui]'") from None
    return gradio


CANVAS = 256


def blank_canvas() -> dict:
    """The sketch pad's start: a white sheet to paint strokes on (or to upload over)."""
    return {"background": Image.new("RGB", (CANVAS, CANVAS), "white"), "layers": [], "composite": None}


def drawn(editor) -> Image.Image | None:
    """What the sketch pad holds, on white; None for a sheet still blank (nothing drawn, nothing uploaded)."""
    from PIL import ImageChops

    image = editor.get("composite") if isinstance(editor, dict) else editor
    if image is None:
        return None
    image = on_white(image)
    return None if ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox() is None else image


def build_app(studio: Studio):
    """The page: four tabs, one per thing a user does, every click queued one at a time."""
    gr = require_gradio()

    def guarded(fn):
        """The library's errors shown in the page as their message; the server goes on serving."""
        def call(*args, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - Gradio's way to show tqdm bars
            try:
                return fn(*args)
            except DyodError as e:
                raise gr.Error(str(e)) from None
        call.__name__ = fn.__name__
        return call

    first = studio.runs[0]
    with gr.Blocks(title="dyod", analytics_enabled=False) as app:
        gr.Markdown("# dyod — a diffusion model for your own data\nThe prior stays frozen; each run holds a dataset "
                    "prompt S* and a custom VAE (`dyod fit`).")
        run = gr.Dropdown(studio.runs, value=first, label="run", elem_id="run")

        with gr.Tab("Sketch → your domain", id="sketch"):
            with gr.Row():  # the pad on a row of its own: Gradio centres its sheet on the row's width
                sketch = gr.ImageEditor(blank_canvas(), type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                        canvas_size=(CANVAS, CANVAS), fixed_canvas=True, layers=False,
                                        brush=gr.Brush(colors=PALETTE, default_color=PALETTE[0], default_size=12),
                                        label="draw strokes (the brush), or upload a photo or a drawing",
                                        elem_id="sketch")
            with gr.Row():
                with gr.Column():
                    sketch_t0 = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="t0 (how far from your image)",
                                          elem_id="sketch-t0")
                    sketch_cost = gr.Markdown(unet_calls(0.5), elem_id="sketch-cost")
                    with gr.Row():
                        grayscale = gr.Checkbox(False, label="grayscale (the input's colours ignored)")
                        guidance = gr.Number(7.5, label="guidance scale")
                    with gr.Row():
                        sketch_seed = gr.Number(0, precision=0, label="seed")
                        sketch_n = gr.Slider(1, 16, value=4, step=1, label="results", elem_id="sketch-n")
                    sketch_go = gr.Button("Turn into the dataset's domain", variant="primary", elem_id="sketch-go")
                sketch_out = gr.Gallery(label="results", columns=4, format="png", elem_id="sketch-out")
            sketch_t0.change(unet_calls, sketch_t0, sketch_cost)

            def sketch_fn(run, editor, t0, gray, scale, seed, n):
                return studio.sketch_to_domain(run, drawn(editor), t0, gray, scale, seed, n)

            sketch_go.click(guarded(sketch_fn), [run, sketch, sketch_t0, grayscale, guidance, sketch_seed, sketch_n],
                            sketch_out, api_name="sketch")

        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                sample_t0 = gr.Slider(0.05, 1.0, value=studio.default_t0(first), step=0.05,
                                      label="t0 (the run's chosen t0 preselected)", elem_id="sample-t0")
                sample_n = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
                sample_seed = gr.Number(0, precision=0, label="first seed")
            sample_cost = gr.Markdown(unet_calls(studio.default_t0(first)))
            sample_go = gr.Button("Sample", variant="primary", elem_id="sample-go")
            with gr.Row():
                vae_out = gr.Gallery(label="the custom VAE alone (the start)", columns=4, format="png")
                dyod_out = gr.Gallery(label="DYOD, same seeds", columns=4, format="png", elem_id="sample-out")
            files = gr.File(label="the images as PNG, with what made each", file_count="multiple")
            sample_t0.change(unet_calls, sample_t0, sample_cost)

            def sample_fn(run, t0, n, seed):
                vae, images, paths = studio.sample(run, t0, n, seed)
                return vae, images, [str(p) for p in paths]

            sample_go.click(guarded(sample_fn), [run, sample_t0, sample_n, sample_seed], [vae_out, dyod_out, files],
                            api_name="sample")

        with gr.Tab("Explore", id="explore"):
            explore_t0 = gr.Slider(0.05, 0.95, value=min(studio.default_t0(first), 0.95), step=0.05, label="t0")
            gr.Markdown("**Interpolation** between two seeds' latents (or two images'), the forward noise ε held fixed")
            with gr.Row():
                seed_a = gr.Number(0, precision=0, label="seed A")
                seed_b = gr.Number(1, precision=0, label="seed B")
                frames = gr.Slider(2, 16, value=8, step=1, label="frames")
            with gr.Row():
                image_a = gr.Image(type="pil", sources=["upload"], label="or image A", height=160)
                image_b = gr.Image(type="pil", sources=["upload"], label="image B", height=160)
            interp_go = gr.Button("Interpolate", elem_id="interp-go")
            interp_out = gr.Gallery(label="interpolation", columns=8, format="png", height=220, elem_id="interp-out")
            interp_go.click(guarded(studio.interpolate), [run, explore_t0, seed_a, seed_b, frames, image_a, image_b],
                            interp_out, api_name="interpolate")
            gr.Markdown("**Traversal** of the custom VAE's most used latent dimensions, one strip each")
            with gr.Row():
                trav_seed = gr.Number(0, precision=0, label="seed")
                active = gr.Slider(1, 8, value=3, step=1, label="dimensions")
                trav_steps = gr.Slider(2, 12, value=7, step=1, label="values per dimension")
                spread = gr.Number(3.0, label="values in [-x, x]")
            trav_go = gr.Button("Traverse", elem_id="trav-go")
            trav_out = gr.Gallery(label="traversal: a strip per dimension", columns=1, format="png", height=360,
                                  object_fit="contain", elem_id="trav-out")

            def traverse_fn(run, t0, seed, k, steps, x):
                from .images import make_grid

                return [(make_grid(strip, len(strip)), f"dimension {d}: values from -{x:g} to {x:g}")
                        for d, strip in studio.traverse(run, t0, seed, k, steps, x)]

            trav_go.click(guarded(traverse_fn), [run, explore_t0, trav_seed, active, trav_steps, spread], trav_out,
                          api_name="traverse")

        with gr.Tab("Runs", id="runs"):
            info = gr.Code(studio.describe(first), language=None, label="dyod info", elem_id="run-info")

        def chose_run(run):
            t0 = studio.default_t0(run)
            return studio.describe(run), t0, unet_calls(t0)

        run.change(guarded(chose_run), run, [info, sample_t0, sample_cost], api_name="chose_run")
    return app


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          model: str | None = None, block: bool = True):
    """Start the page on host:port; one job at a time, the others queued."""
    gr = require_gradio()
    studio = Studio(runs, device=device, model=model)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1, max_size=32)
    logger.info("serving %d run%s on http://%s:%d", len(studio.runs), "" if len(studio.runs) == 1 else "s", host, port)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               footer_links=["settings"], allowed_paths=[str(studio.out)], theme=gr.themes.Default())
    return app
