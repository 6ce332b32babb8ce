"""The speed switches change how the frozen UNet runs, never what it computes."""

import pytest
import torch
from diffusers.models.attention import FeedForward

from dyod import InversionConfig, SampleConfig
from dyod.config import from_dict
from dyod.embeddings import add_placeholder_tokens, install_placeholder
from dyod.errors import DyodError
from dyod.frozen_layers import RecomputedFeedForward
from dyod.inversion import inversion_loss
from dyod.performance import (
    check_compile_device,
    check_compile_mode,
    enable_checkpointing,
    new_accelerator,
    optimize_for_training,
    parse_checkpointing,
    resolve_mixed_precision,
    resolve_precision,
    store_linears_in,
    use_channels_last,
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


def test_auto_mixed_precision_takes_bf16_only_where_the_gpu_computes_in_it(monkeypatch):
    # before Ampere (a T4, a V100, the paper's GTX 1080 Ti) PyTorch reports bf16 as supported by emulating it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in [(False, "fp16"), (True, "bf16")]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
        assert resolve_mixed_precision("auto") == expected
        assert resolve_mixed_precision("auto", "cpu") == "no" and resolve_mixed_precision("bf16") == "bf16"


def test_compiling_on_a_gpu_too_old_for_triton_is_refused_before_any_work(fitted_run, monkeypatch):
    # the paper's GTX 1080 Ti (compute capability 6.1): inductor's Triton kernels need 7.0
    capability = {"value": (6, 1)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080 Ti")
    with pytest.raises(DyodError, match=r"--compile-unet reduce-overhead: .*GTX 1080 Ti is 6\.1\. Use --compile-unet "
                                        r"cuda-graphs"):
        check_compile_device("reduce-overhead", "cuda", "--compile-unet")
    loaded = []
    monkeypatch.setattr(DyodPipeline, "from_run", classmethod(lambda cls, *a, **k: loaded.append(a)))
    with pytest.raises(DyodError, match="--compile default: .* Use --compile cuda-graphs .* or --compile none"):
        DyodPipeline.for_sampling(fitted_run, device="cuda", compile="default")
    assert not loaded  # refused before loading the prior
    for mode, device in [("cuda-graphs", "cuda"), ("none", "cuda"), ("reduce-overhead", "cpu")]:
        check_compile_device(mode, device)  # PyTorch's own kernels, no compiling, or no GPU: nothing to refuse
    capability["value"] = (7, 5)  # a T4
    check_compile_device("reduce-overhead", "cuda")


@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_optimized_sampling_computes_the_same_latents(fitted_run, compile_mode):
    # compiled: the UNet, encoder and decoder each trace as one graph (fullgraph; aot_eager keeps the CPU CI quick)
    torch._dynamo.reset()
    config = SampleConfig(t0=0.6, num_inference_steps=10, guidance_scale=7.5)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = DyodPipeline.from_run(fitted_run, device="cpu")
    fast = DyodPipeline.from_run(fitted_run, device="cpu").optimize(  # channels-last, fused q/k/v
        channels_last=True, compile=compile_mode, compile_backend="aot_eager")
    if compile_mode:
        assert all(type(m).__name__ == "OptimizedModule"
                   for m in (fast.prior.unet, fast.prior.vae.encoder, fast.prior.vae.decoder))
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


def test_compiled_pipeline_pads_the_last_batch_and_compiles_once(fitted_run):
    # a new batch shape recompiles a compiled model (a minute at SD scale): 3 images at batch 2 run as 2 + (1 padded)
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):  # one call per compiled graph
        graphs.append(graph_module)
        return graph_module.forward

    config = SampleConfig(t0=0.6, num_inference_steps=4, batch_size=2)
    plain = DyodPipeline.from_run(fitted_run, device="cpu")
    compiled = DyodPipeline.from_run(fitted_run, device="cpu").optimize(compile="default",
                                                                       compile_backend=counting_backend)
    assert compiled.compiled and not plain.compiled
    samples = compiled.sample(3, config, seed=5, progress=False)
    assert len(samples) == 3
    assert len(graphs) == 3  # the UNet, the encoder and the decoder, once each
    assert len(compiled.transform(samples, config, progress=False)) == 3
    assert len(graphs) == 3  # image initialization reuses them
    for a, b in zip(plain.sample(3, config, seed=5, progress=False), samples):  # the padding changes nothing
        assert (torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))).abs().max() <= 1
    torch._dynamo.reset()


def test_channels_last_by_default_only_when_compiling():
    # eager CUDA group norm converts channels-last inputs to NCHW (and the convolutions convert back)
    assert use_channels_last(None, None) is False and use_channels_last(None, "none") is False
    assert use_channels_last(None, "reduce-overhead") is True
    assert use_channels_last(None, "cuda-graphs") is False  # replays the eager kernels
    assert use_channels_last(True, None) is True and use_channels_last(False, "default") is False


def _embedding_gradient(model, autocast_dtype=None, store_text_linears=False, **optimize) -> torch.Tensor:
    """The gradient reaching S* from one dataset-prompt loss (under CPU autocast to ``autocast_dtype`` if given), with
    the frozen prior set up by ``optimize_for_training``."""
    prior = load_prior(model)
    ids = add_placeholder_tokens(prior.tokenizer, prior.text_encoder, "<s>", 1)
    emb = install_placeholder(prior.text_encoder, ids[0], torch.ones(1, prior.embedding_dim) * 0.1)
    optimize_for_training(prior, autocast_dtype=autocast_dtype if store_text_linears else None, **optimize)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    input_ids = prior.tokenizer(["a photo of <s>"] * 3, padding="max_length", max_length=prior.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = inversion_loss(prior, latents, noise, torch.tensor([10, 500, 990]), input_ids, prior.alphas_cumprod())
    loss.backward()
    assert all(p.grad is None for p in prior.unet.parameters())  # the UNet stays frozen
    assert all(p.grad is None for n, p in prior.text_encoder.named_parameters() if "learned" not in n)
    return emb.learned.grad.clone()


@pytest.mark.parametrize("levels", ["feed-forward", "1", "all"])
def test_gradient_checkpointing_gives_the_same_embedding_gradient(tiny_model, levels):
    plain, checkpointed = _embedding_gradient(tiny_model), _embedding_gradient(tiny_model, gradient_checkpointing=levels)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("levels", ["none", "feed-forward", "1"])
def test_training_step_compiles_as_one_graph(tiny_model, levels):
    # fullgraph=True: a graph break (which would cost the CUDA graphs of reduce-overhead their point) is an error.
    # aot_eager traces forward and backward as inductor would, without generating kernels (CPU CI stays quick).
    torch._dynamo.reset()
    plain = _embedding_gradient(tiny_model, gradient_checkpointing=levels)
    compiled = _embedding_gradient(tiny_model, gradient_checkpointing=levels, compile_mode="default",
                                   compile_backend="aot_eager")
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore")
def test_cuda_graphs_mode_traces_the_training_step_as_one_graph(tiny_model, caplog):
    # dynamo's cudagraphs backend: the traced forward and backward, replayed as CUDA graphs on a GPU (tests/test_gpu.py
    # compares those with eager); on the CPU it runs the traced graph as it is, the same arithmetic as eager.
    torch._dynamo.reset()
    plain = _embedding_gradient(tiny_model, gradient_checkpointing="1")
    with caplog.at_level("INFO", logger="dyod.performance"):
        traced = _embedding_gradient(tiny_model, gradient_checkpointing="1", compile_mode="cuda-graphs")
    assert "mode=cuda-graphs" in caplog.text and "seconds of tracing" in caplog.text
    torch.testing.assert_close(traced, plain, rtol=1e-5, atol=1e-7)


def test_checkpointing_levels_pick_the_finest_resolution_blocks(tiny_model):
    unet = load_prior(tiny_model).unet  # two levels: down_blocks[0] / up_blocks[1] at 8x8, the others at 4x4

    def flagged(block):
        return {m.gradient_checkpointing for m in block.modules() if hasattr(m, "gradient_checkpointing")}

    def recomputed(block):  # the feed-forwards that recompute their projection
        return {type(m) is RecomputedFeedForward for m in block.modules() if isinstance(m, FeedForward)}

    assert enable_checkpointing(unet, 0) == 0 and flagged(unet) == {False} and recomputed(unet) == {False}
    assert enable_checkpointing(unet, 0, feed_forwards=True) == 0 and flagged(unet) == {False}
    assert recomputed(unet) == {True}
    assert enable_checkpointing(unet, 1, feed_forwards=True) == 2
    assert flagged(unet.down_blocks[0]) == flagged(unet.up_blocks[1]) == {True}
    assert flagged(unet.down_blocks[1]) == flagged(unet.up_blocks[0]) == flagged(unet.mid_block) == {False}
    assert recomputed(unet.down_blocks[1]) == recomputed(unet.up_blocks[0]) == recomputed(unet.mid_block) == {True}
    # blocks recomputed whole do not checkpoint their feed-forwards again inside
    every = enable_checkpointing(unet, None, feed_forwards=True)
    assert flagged(unet) == {True} and recomputed(unet) == {False}
    assert enable_checkpointing(unet, 5) == every  # more levels than the UNet has: all
    assert parse_checkpointing("none") == parse_checkpointing(False) == (0, False)
    assert parse_checkpointing("feed-forward") == parse_checkpointing("ff") == (0, True)
    assert parse_checkpointing("all") == (None, False) and parse_checkpointing("2") == (2, True)
    with pytest.raises(DyodError, match="--gradient-checkpointing must be none, feed-forward, all, auto or a number"):
        parse_checkpointing("some")


def test_gradient_checkpointing_setting_reads_old_and_new_spellings():
    assert InversionConfig().gradient_checkpointing == "auto"
    assert from_dict(InversionConfig, {"gradient_checkpointing": True}).gradient_checkpointing == "all"  # older runs
    assert from_dict(InversionConfig, {"gradient_checkpointing": False}).gradient_checkpointing == "none"
    assert InversionConfig(gradient_checkpointing="True").gradient_checkpointing == "all"
    assert InversionConfig(gradient_checkpointing="2").gradient_checkpointing == "2"
    with pytest.raises(ValueError, match="--gradient-checkpointing must be"):
        InversionConfig(gradient_checkpointing="half")


def test_text_encoder_linears_stored_in_the_autocast_dtype_give_the_same_gradient(tiny_model):
    # Autocast computes every linear layer in bf16 anyway: storing the frozen ones in bf16 changes no number.
    reference = _embedding_gradient(tiny_model, autocast_dtype=torch.bfloat16)
    prior = load_prior(tiny_model)
    assert store_linears_in(prior.text_encoder, torch.bfloat16) == 2 * 6  # q, k, v, out, fc1, fc2 per layer
    norms = [m for m in prior.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # norms and embeddings stay fp32
    assert prior.text_encoder.get_input_embeddings().weight.dtype == torch.float32
    stored = _embedding_gradient(tiny_model, autocast_dtype=torch.bfloat16, store_text_linears=True)
    assert reference.abs().sum() > 0
    torch.testing.assert_close(stored, reference, rtol=0, atol=0)


def test_each_training_stage_gets_its_own_accelerator_settings():
    first = new_accelerator(mixed_precision="bf16", cpu=True)
    assert first.mixed_precision == "bf16"
    second = new_accelerator(mixed_precision="no", cpu=True)  # plain Accelerator() would refuse or inherit bf16
    assert second.mixed_precision == "no"


@pytest.mark.filterwarnings("ignore")
def test_a_new_checkpointing_setting_recompiles_the_compiled_unet(tiny_model):
    # --gradient-checkpointing auto changes the setting of an already compiled UNet between its probe steps: each
    # setting must be traced anew (dynamo guards on the flags and the swapped classes), and a setting seen before reuses
    # its graph
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    unet = load_prior(tiny_model).unet.requires_grad_(False)
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, requires_grad=True)
    graphs, gradients = [], []
    for setting in ["none", "feed-forward", "1", "none"]:
        enable_checkpointing(unet, *parse_checkpointing(setting))
        out = compiled(x, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        gradients.append(torch.autograd.grad(out.pow(2).mean(), context)[0])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 2, 3, 3]
    assert all(torch.equal(g, gradients[0]) for g in gradients)
