"""The frozen UNet's lean layers keep less for the backward pass and give the same gradients, bit for bit."""

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D

from dyod.frozen_layers import (
    FrozenConv2d,
    LeanGEGLU,
    LeanResnetBlock2D,
    RecomputedFeedForward,
    keep_less_for_backward,
    recompute_feed_forwards,
    restore,
)

LEAN_CLASSES = (FrozenConv2d, LeanGEGLU, LeanResnetBlock2D)
from dyod.prior import load_prior


def kept_for_backward(fn, exclude=()):
    """Run ``fn`` and return (its result, the distinct storages autograd keeps for the backward pass, in bytes, leaving
    out the tensors in ``exclude``: the frozen weights, which are held anyway)."""
    kept = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def output_kept_and_gradient(layer, x, grad_out):
    """``layer(x)``, the bytes it keeps for the backward pass beyond its weights, and the gradient reaching ``x``."""
    out, kept = kept_for_backward(lambda: layer(x), exclude=layer.parameters())
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out, kept, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,stride,padding,groups", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 0, 2)])
def test_frozen_convolution_keeps_no_input_and_gives_the_same_gradient(dtype, kernel, stride, padding, groups):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, kernel, stride=stride, padding=padding, groups=groups).to(dtype).requires_grad_(False)
    x = torch.randn(2, 8, 9, 9, dtype=dtype, requires_grad=True)
    grad_out = None

    def run():
        nonlocal grad_out
        out, kept = kept_for_backward(lambda: conv(x), exclude=conv.parameters())
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        (grad,) = torch.autograd.grad(out, x, grad_out)
        return out, kept, grad

    plain_out, plain_kept, plain_grad = run()
    assert keep_less_for_backward(conv) == 1 and type(conv) is FrozenConv2d
    lean_out, lean_kept, lean_grad = run()
    assert plain_kept == x.numel() * x.element_size()  # the plain convolution keeps its input ...
    assert lean_kept == 0  # ... the frozen one nothing beyond its weight
    assert torch.equal(lean_out, plain_out) and torch.equal(lean_grad, plain_grad)


def test_trainable_or_gradient_free_convolutions_run_as_before():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    keep_less_for_backward(conv)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    _, kept = kept_for_backward(lambda: conv(x), exclude=conv.parameters())
    assert kept == x.numel() * 4  # a trainable weight needs the input for its gradient: kept as usual
    conv.requires_grad_(False)
    with torch.no_grad():
        _, kept = kept_for_backward(lambda: conv(x))
    assert kept == 0
    same_padding = torch.nn.Conv2d(4, 4, 3, padding="same").requires_grad_(False)
    keep_less_for_backward(same_padding)  # string padding: the plain path
    torch.testing.assert_close(same_padding(x), torch.nn.functional.conv2d(x, same_padding.weight, same_padding.bias,
                                                                           padding="same"), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_geglu_recomputes_gelu_and_gives_the_same_gradient(dtype):
    torch.manual_seed(0)
    geglu = GEGLU(16, 24).to(dtype).requires_grad_(False)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 24, dtype=dtype)
    plain_out, plain_kept, plain_grad = output_kept_and_gradient(geglu, x, grad_out)
    assert keep_less_for_backward(geglu) == 1 and type(geglu) is LeanGEGLU
    lean_out, lean_kept, lean_grad = output_kept_and_gradient(geglu, x, grad_out)
    projected = 3 * 5 * 48 * x.element_size()
    assert plain_kept == projected + projected // 2  # the projection and gelu(gate)
    assert lean_kept == projected  # the projection alone
    assert torch.equal(lean_out, plain_out) and torch.equal(lean_grad, plain_grad)


RESNET_BLOCKS = {
    "same width": dict(in_channels=8, out_channels=8, temb_channels=16),
    "shortcut": dict(in_channels=8, out_channels=12, temb_channels=16),
    "no time embedding": dict(in_channels=8, out_channels=8, temb_channels=None),
    "time act skipped, scaled output": dict(in_channels=8, out_channels=8, temb_channels=16, skip_time_act=True,
                                            output_scale_factor=2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", RESNET_BLOCKS.values(), ids=RESNET_BLOCKS.keys())
def test_lean_resnet_block_recomputes_its_norms_and_gives_the_same_gradients(dtype, config):
    torch.manual_seed(0)
    block = ResnetBlock2D(groups=4, **config).to(dtype).requires_grad_(False).eval()
    x = torch.randn(2, 8, 6, 6, dtype=dtype, requires_grad=True)
    temb = torch.randn(2, 16, dtype=dtype, requires_grad=True) if config["temb_channels"] else None
    inputs = [x] if temb is None else [x, temb]
    grad_out = torch.randn(2, config["out_channels"], 6, 6, dtype=dtype)

    def run():
        out, kept = kept_for_backward(lambda: block(x, temb), exclude=block.parameters())
        return out, kept, torch.autograd.grad(out, inputs, grad_out)

    plain_out, plain_kept, plain_grads = run()
    assert keep_less_for_backward(block) == 3 + (config["in_channels"] != config["out_channels"])
    assert type(block) is LeanResnetBlock2D
    lean_out, lean_kept, lean_grads = run()
    assert torch.equal(lean_out, plain_out)
    assert all(torch.equal(lean, plain) for lean, plain in zip(lean_grads, plain_grads, strict=True))
    # autograd keeps, per norm, the normalized tensor (for the SiLU) and the SiLU's output (for the convolution); the
    # lean block keeps neither: twice the block's input and twice its hidden width less
    element = x.element_size()
    assert plain_kept - lean_kept == 2 * x.numel() * element + 2 * grad_out.numel() * element
    with torch.no_grad():  # sampling: diffusers' own forward pass
        assert torch.equal(block(x, temb), plain_out.detach())


def test_other_resnet_blocks_and_trainable_norms_run_as_before():
    blocks = [ResnetBlock2D(in_channels=8, temb_channels=16, groups=4, time_embedding_norm="scale_shift"),
              ResnetBlock2D(in_channels=8, temb_channels=16, groups=4, up=True),
              ResnetBlock2D(in_channels=8, temb_channels=16, groups=4, non_linearity="mish")]
    for block in blocks:
        keep_less_for_backward(block)
        assert type(block) is ResnetBlock2D
    block = ResnetBlock2D(in_channels=8, temb_channels=16, groups=4).requires_grad_(False)
    keep_less_for_backward(block)
    block.norm1.requires_grad_(True)  # a trainable norm needs its own gradient: diffusers' forward pass
    x, temb = torch.randn(1, 8, 4, 4, requires_grad=True), torch.randn(1, 16)
    block(x, temb).sum().backward()
    assert block.norm1.weight.grad is not None and block.norm1.weight.grad.abs().sum() > 0


def test_the_unet_keeps_less_and_gives_the_text_condition_the_same_gradient(tiny_model):
    unet = load_prior(tiny_model).unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, requires_grad=True)

    def run():
        out, kept = kept_for_backward(lambda: unet(x, torch.tensor([10, 700]), encoder_hidden_states=context).sample,
                                      exclude=unet.parameters())
        (grad,) = torch.autograd.grad(out.pow(2).mean(), context)
        return out, kept, grad

    def sample():  # no gradient: the plain layers' path
        with torch.no_grad():
            return unet(x, 10, encoder_hidden_states=context).sample

    plain_out, plain_kept, plain_grad = run()
    plain_sample = sample()
    n_layers = sum(type(m) in (torch.nn.Conv2d, GEGLU) or type(m) is ResnetBlock2D and LeanResnetBlock2D.eligible(m)
                   for m in unet.modules())
    assert any(type(m) is ResnetBlock2D for m in unet.modules())
    assert keep_less_for_backward(unet) == n_layers > 0
    lean_out, lean_kept, lean_grad = run()
    assert lean_kept < 0.8 * plain_kept
    assert plain_grad.abs().sum() > 0
    assert torch.equal(lean_out, plain_out)
    # each layer's gradient is the same bit for bit (above); the context's sums the cross-attention layers'
    # contributions, in an order autograd may change with the graph's nodes
    torch.testing.assert_close(lean_grad, plain_grad, rtol=1e-6, atol=0)
    assert torch.equal(sample(), plain_sample)
    assert restore(unet) == n_layers
    assert not any(type(m) in LEAN_CLASSES for m in unet.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["geglu", "gelu"])  # Stable Diffusion's one function; another: the checkpoint
def test_recomputed_feed_forward_keeps_its_input_alone_and_gives_the_same_gradient(dtype, activation):
    torch.manual_seed(0)
    ff = FeedForward(16, activation_fn=activation).to(dtype).requires_grad_(False).eval()
    keep_less_for_backward(ff)  # as in training: the lean GEGLU keeps the projection
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 16, dtype=dtype)
    plain_out, plain_kept, plain_grad = output_kept_and_gradient(ff, x, grad_out)
    assert recompute_feed_forwards(ff) == 1 and type(ff) is RecomputedFeedForward
    recomputed_out, recomputed_kept, recomputed_grad = output_kept_and_gradient(ff, x, grad_out)
    one_function = "RecomputedGegluFeedForward" in type(recomputed_out.grad_fn).__name__
    assert one_function == (activation == "geglu")  # else torch.utils.checkpoint
    if activation == "geglu":
        assert plain_kept == 3 * 5 * 2 * 64 * x.element_size()  # the GEGLU projection: hidden and gate, 4 x 16 each
    assert recomputed_kept == x.numel() * x.element_size()  # the input alone
    assert torch.equal(recomputed_out, plain_out) and torch.equal(recomputed_grad, plain_grad)
    with torch.no_grad():
        assert torch.equal(ff(x), plain_out.detach())
    assert recompute_feed_forwards(ff, on=False) == 0 and type(ff) is FeedForward
