"""The speed switches change how the frozen UNet runs, never what it computes."""

import pytest
import torch

from dyod import SampleConfig
from dyod.embeddings import add_placeholder_tokens, install_placeholder
from dyod.errors import DyodError
from dyod.inversion import inversion_loss
from dyod.performance import (
    check_compile_mode,
    new_accelerator,
    optimize_for_training,
    resolve_mixed_precision,
    resolve_precision,
)
from dyod.pipeline import DyodPipeline
from dyod.prior import load_prior


def test_precision_and_compile_mode_are_checked():
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("auto", "cuda") == torch.float16
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(DyodError, match="--precision must be one of"):
        resolve_precision("fp8", "cpu")
    assert resolve_mixed_precision("auto", "cpu") == "no"  # training on the CPU stays fp32
    assert resolve_mixed_precision("fp16", "cpu") == "fp16"  # an explicit choice is kept
    assert check_compile_mode("none") is None
    assert check_compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(DyodError, match="--compile must be one of"):
        check_compile_mode("fastest")


def test_optimized_sampling_computes_the_same_latents(fitted_run):
    config = SampleConfig(t0=0.6, num_inference_steps=10, guidance_scale=7.5)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = DyodPipeline.from_run(fitted_run, device="cpu")
    fast = DyodPipeline.from_run(fitted_run, device="cpu").optimize()  # channels-last, fused q/k/v
    assert fast.prior.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(type(p).__name__ == "FusedAttnProcessor2_0" for p in fast.prior.unet.attn_processors.values())
    expected = plain.denoise_from(init, noise, config.t0, config)
    torch.testing.assert_close(fast.denoise_from(init, noise, config.t0, config), expected, rtol=1e-4, atol=1e-4)
    # images too: the autoencoder runs channels-last as well
    a = plain.sample(2, config, seed=3, progress=False)
    b = fast.sample(2, config, seed=3, progress=False)
    for x, y in zip(a, b):
        diff = (torch.tensor(list(x.getdata())) - torch.tensor(list(y.getdata()))).abs().max()
        assert diff <= 1  # at most one level of 8-bit rounding


def test_gradient_checkpointing_gives_the_same_embedding_gradient(tiny_model):
    def grad(checkpointing: bool) -> torch.Tensor:
        prior = load_prior(tiny_model)
        ids = add_placeholder_tokens(prior.tokenizer, prior.text_encoder, "<s>", 1)
        emb = install_placeholder(prior.text_encoder, ids[0], torch.ones(1, prior.embedding_dim) * 0.1)
        optimize_for_training(prior, gradient_checkpointing=checkpointing)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=g)
        input_ids = prior.tokenizer(["a photo of <s>"] * 3, padding="max_length", max_length=prior.tokenizer.model_max_length,
                                    return_tensors="pt").input_ids
        loss = inversion_loss(prior, latents, noise, torch.tensor([10, 500, 990]), input_ids, prior.alphas_cumprod())
        loss.backward()
        assert all(p.grad is None for p in prior.unet.parameters())  # the UNet stays frozen
        return emb.learned.grad.clone()

    plain, checkpointed = grad(False), grad(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_each_training_stage_gets_its_own_accelerator_settings():
    first = new_accelerator(mixed_precision="bf16", cpu=True)
    assert first.mixed_precision == "bf16"
    second = new_accelerator(mixed_precision="no", cpu=True)  # plain Accelerator() would refuse or inherit bf16
    assert second.mixed_precision == "no"
