"""Layers of the frozen UNet that keep less for the backward pass, with the same gradients.

In the dataset-prompt step (Eq. 7) the UNet is frozen: the gradient passes through it to the text condition, and no
weight gets one. PyTorch's autograd still keeps what a weight gradient would need in two places:

* a convolution keeps its input, because one function computes the input, weight and bias gradients together. The
  input gradient needs only the weight and the input's shape (a transposed convolution), so a frozen convolution here
  keeps the weight alone — 16 % of what an SD-1.5 step keeps (``benchmarks/training_memory.py --breakdown``);
* GEGLU's product ``hidden * gelu(gate)`` keeps both factors, though ``gelu(gate)`` is one pointwise pass over
  ``gate``, which is kept anyway: recomputing it in the backward pass saves another 12 %.

The backward passes call the kernels autograd itself calls (``convolution_backward`` for the input alone,
``gelu_backward``): each layer's gradient is the same bit for bit on the CPU (tested). Where gradients from several
layers add up (the text condition feeds every cross-attention layer), autograd may add them in another order, a
rounding-level difference (about 1e-7 relative in fp32). Without gradients (sampling) the layers run as before.

Only ``nn.Conv2d`` with zero padding and diffusers' ``GEGLU`` are changed, by swapping the class of each instance in
place (weights, state dict and hooks stay as they are); ``restore`` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU


class _FrozenConvolution(torch.autograd.Function):
    """``F.conv2d`` that gives a gradient to its input only, and so keeps the weight, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = x.shape, stride, padding, dilation, groups
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        grad_input = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_input, None, None, None, None, None, None


class FrozenConv2d(torch.nn.Conv2d):
    """``nn.Conv2d`` whose backward pass, while its weight and bias are frozen, keeps the weight, not the input."""

    def _conv_forward(self, x, weight, bias):
        if (torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad
                and (bias is None or not bias.requires_grad) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)):
            return _FrozenConvolution.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class _GatedGelu(torch.autograd.Function):
    """``hidden * gelu(gate)`` for ``[hidden, gate] = projected``, keeping ``projected`` alone."""

    @staticmethod
    def forward(ctx, projected):
        ctx.save_for_backward(projected)
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        (projected,) = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        grad_hidden = grad * F.gelu(gate)  # gelu(gate) again: one pointwise pass instead of a kept tensor
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
        return torch.cat([grad_hidden, grad_gate], dim=-1)


class LeanGEGLU(GEGLU):
    """diffusers' ``GEGLU`` that recomputes ``gelu(gate)`` in the backward pass instead of keeping it."""

    def forward(self, hidden_states, *args, **kwargs):
        if torch.is_grad_enabled() and hidden_states.requires_grad and not args and not kwargs:
            return _GatedGelu.apply(self.proj(hidden_states))
        return super().forward(hidden_states, *args, **kwargs)


_LEAN = {torch.nn.Conv2d: FrozenConv2d, GEGLU: LeanGEGLU}


def _swap_classes(module: torch.nn.Module, classes: dict[type, type]) -> int:
    count = 0
    for layer in module.modules():
        new_class = classes.get(type(layer))  # exact types: a subclass with its own forward is left alone
        if new_class is not None:
            layer.__class__ = new_class
            count += 1
    return count


def keep_less_for_backward(module: torch.nn.Module) -> int:
    """In place: every plain ``nn.Conv2d`` and ``GEGLU`` in ``module`` becomes its lean twin. Returns how many."""
    return _swap_classes(module, _LEAN)


def restore(module: torch.nn.Module) -> int:
    """Undo ``keep_less_for_backward`` (the benchmarks measure both). Returns how many layers changed back."""
    return _swap_classes(module, {lean: base for base, lean in _LEAN.items()})
