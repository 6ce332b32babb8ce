"""Promises of the fast paths that only a CUDA GPU can check (skipped elsewhere; CI has no GPU).

On a lent GPU machine: ``python -m pytest tests/test_gpu.py`` (about a minute: two tiny UNets compile).
``DYOD_GPU_TESTS_ON=cpu`` runs the same code on the CPU (without the synchronization checks) to check the tests."""

import os

import pytest
import torch

import dyod
from dyod.data import load_image_folder, pil_to_tensor, resize_lanczos
from dyod.inversion import LatentCache, PromptTrainer
from dyod.performance import new_accelerator
from dyod.pipeline import DyodPipeline
from dyod.prior import load_prior
from dyod.sampling import Schedule, sample_ddim

DEVICE = os.environ.get("DYOD_GPU_TESTS_ON", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


class never_synchronizes:
    """Inside: any CUDA call that makes the host wait for the GPU raises (``torch.cuda.set_sync_debug_mode``)."""

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def trainer(model, data, mixed_precision="no", **options) -> PromptTrainer:
    prior = load_prior(model)
    x = pil_to_tensor([resize_lanczos(im, prior.resolution) for im in load_image_folder(data).images[:8]])
    with torch.no_grad():
        posterior = prior.vae.encode(x).latent_dist
    cache = LatentCache(posterior.mean, posterior.std)
    config = dyod.InversionConfig(batch_size=4, mixed_precision=mixed_precision, **options)
    return PromptTrainer(prior, cache, config, new_accelerator(mixed_precision=mixed_precision, cpu=DEVICE == "cpu"))


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_training_step_never_waits_for_the_gpu(tiny_model, shapes, precision):
    # fp16 (what GPUs without bf16 train in) brings Accelerate's gradient scaler, which must not read back either
    if precision == "fp16" and DEVICE != "cuda":
        pytest.skip("fp16 autocast and the gradient scaler are set up on CUDA only")
    bf16 = DEVICE == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    run = trainer(tiny_model, shapes, mixed_precision=precision if precision != "auto" else "bf16" if bf16 else "no")
    run.step()  # warm-up: cuDNN's algorithm search, AdamW's state, the pinned blocks
    with never_synchronizes():
        losses = [run.step() for _ in range(3)]
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("mode", ["reduce-overhead", "cuda-graphs"])
def test_cuda_graph_training_matches_eager(tiny_model, shapes, mode):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    eager = trainer(tiny_model, shapes)
    compiled = trainer(tiny_model, shapes, compile_unet=mode, gradient_checkpointing="1")
    for _ in range(4):  # the same seeded batches: the losses agree step by step, S* too
        a, b = eager.step(), compiled.step()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled.embedding.learned, eager.embedding.learned, rtol=1e-4, atol=1e-6)


def test_ddim_loop_never_waits_for_the_gpu(fitted_run):
    pipe = DyodPipeline.for_sampling(fitted_run, device=DEVICE)  # fp16 and optimize() on CUDA
    config = dyod.SampleConfig(t0=0.6, num_inference_steps=10)
    schedule = Schedule.from_scheduler_config(pipe.prior.scheduler_config, config.num_inference_steps)
    model = pipe.denoiser(config)
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    sample_ddim(model, x, schedule.start(config.t0), schedule, progress=False)  # warm-up
    with never_synchronizes():
        out = sample_ddim(model, x, schedule.start(config.t0), schedule, progress=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["reduce-overhead", "cuda-graphs"])
def test_cuda_graph_sampling_matches_eager(fitted_run, mode):
    torch._dynamo.reset()
    config = dyod.SampleConfig(t0=0.6, num_inference_steps=10)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eager = DyodPipeline.for_sampling(fitted_run, device=DEVICE, precision="fp32")
    compiled = DyodPipeline.for_sampling(fitted_run, device=DEVICE, precision="fp32", compile=mode)
    expected = eager.denoise_from(init, noise, config.t0, config)
    for _ in range(3):  # recording, then replays of the CUDA graphs
        torch.testing.assert_close(compiled.denoise_from(init, noise, config.t0, config), expected, rtol=1e-3, atol=1e-4)
    a = eager.sample(2, config, seed=3)
    b = compiled.sample(2, config, seed=3)
    for x, y in zip(a, b):
        diff = (torch.tensor(list(x.getdata())) - torch.tensor(list(y.getdata()))).abs().max()
        assert diff <= 2  # the autoencoder compiled too: a level or two of 8-bit rounding at most


def test_frozen_layers_keep_less_with_the_same_gradient(tiny_model):
    from dyod.frozen_layers import keep_less_for_backward, recompute_feed_forwards, restore

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    unet = load_prior(tiny_model).unet.to(DEVICE).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g).to(DEVICE)
    context = torch.randn(4, 77, unet.config.cross_attention_dim, generator=g).to(DEVICE).requires_grad_(True)

    def step():
        """(bytes the forward pass leaves allocated for the backward pass, the gradient reaching the context)"""
        before = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
        loss = unet(x, torch.tensor([10, 300, 600, 900], device=DEVICE), encoder_hidden_states=context).sample.pow(2).mean()
        kept = torch.cuda.memory_allocated() - before if DEVICE == "cuda" else 0
        return kept, torch.autograd.grad(loss, context)[0]

    restore(unet)
    step()  # warm-up: cuDNN's algorithm choices
    plain_kept, plain_grad = step()
    keep_less_for_backward(unet)
    step()
    lean_kept, lean_grad = step()
    assert lean_kept < 0.9 * plain_kept or DEVICE == "cpu"  # the CPU test counts the kept tensors instead
    assert plain_grad.abs().sum() > 0
    torch.testing.assert_close(lean_grad, plain_grad, rtol=1e-5, atol=1e-8)  # cuDNN may pick another algorithm
    assert recompute_feed_forwards(unet) > 0  # --gradient-checkpointing feed-forward
    step()
    recomputed_kept, recomputed_grad = step()
    assert recomputed_kept < lean_kept or DEVICE == "cpu"
    torch.testing.assert_close(recomputed_grad, lean_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sample_grids_while_the_prompt_trains_in_mixed_precision(tmp_path, tiny_model, shapes, precision):
    """invert's sample grids on the GPU: the text encoder under autocast with its linears in half precision, the UNet
    in half precision, the autoencoder visiting the GPU and leaving it. Every tile is an image (a NaN would decode to
    black), and S* changes them. (That the last grid is what sampling with the saved S* gives is tested in fp32 on
    the CPU: in half precision 25 guided steps of the tiny random UNet drift apart between the two arithmetics.)"""
    import numpy as np
    from PIL import Image

    if precision == "fp16" and DEVICE != "cuda":
        pytest.skip("fp16 autocast is set up on CUDA only")
    if precision == "bf16" and DEVICE == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU does not compute in bf16")
    out = tmp_path / "run"
    config = dyod.InversionConfig(steps=4, batch_size=2, sample_every=2, mixed_precision=precision)
    dyod.invert(shapes, tiny_model, out, config, progress=False, device=None if DEVICE == "cuda" else "cpu")
    folder = out / "inversion" / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000.png", "step-000002.png", "step-000004.png"]
    first, last = (np.asarray(Image.open(folder / name), dtype=float) for name in ("step-000000.png", "step-000004.png"))
    assert last.shape == (20, 4 * 16 + 5 * 2, 3)  # four 16-px images (the model's: the dataset's 32 px are larger)
    tiles = [last[2:18, 2 + i * 18:18 + i * 18] for i in range(4)]
    assert all(tile.std() > 1.0 and tile.max() > 0 for tile in tiles)
    assert np.abs(first - last).max() > 0
