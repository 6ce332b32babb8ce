"""Layers of the frozen UNet that keep less for the backward pass, with the same gradients.

In the dataset-prompt step (Eq. 7) the UNet is frozen: the gradient passes through it to the text condition, and no
weight gets one. PyTorch's autograd still keeps what a weight gradient would need in two places:

* a convolution keeps its input, because one function computes the input, weight and bias gradients together. The
  input gradient needs only the weight and the input's shape (a transposed convolution), so a frozen convolution here
  keeps the weight alone — 16 % of what an SD-1.5 step keeps (``benchmarks/training_memory.py --breakdown``);
* GEGLU's product ``hidden * gelu(gate)`` keeps both factors, though ``gelu(gate)`` is one pointwise pass over
  ``gate``, which is kept anyway: recomputing it in the backward pass saves another 12 %;
* a resnet block's ``silu(group_norm(x))`` keeps both ``x`` (for the norm) and the normalized ``x`` (for the SiLU),
  though the second is one pointwise pass over the first: recomputing it saves another 11 % of what is left.

The backward passes call the kernels autograd itself calls (``convolution_backward`` for the input alone,
``gelu_backward``, ``silu_backward``, ``native_group_norm_backward``): each layer's gradient is the same bit for bit
on the CPU (tested). Where gradients from several layers add up (the text condition feeds every cross-attention
layer), autograd may add them in another order, a rounding-level difference (about 1e-7 relative in fp32). Without
gradients (sampling) the layers run as before.

Only ``nn.Conv2d`` with zero padding, diffusers' ``GEGLU`` and its ``ResnetBlock2D`` in Stable Diffusion's form (group
norms, SiLU, the time embedding added before the second norm, no resampling inside) are changed, by swapping the class
of each instance in place (weights, state dict and hooks stay as they are); ``restore`` undoes it.

``RecomputedFeedForward`` is here too, though it is not free: it trades 6 % more arithmetic for a quarter of the
memory, so ``--gradient-checkpointing feed-forward`` turns it on (``dyod.performance.enable_checkpointing``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D
from torch.utils.checkpoint import checkpoint


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


class _GroupNormSiLU(torch.autograd.Function):
    """``silu(group_norm(x))`` keeping ``x``, which the norm's backward pass needs anyway, not the normalized ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        batch, channels = x.shape[:2]
        geometry = batch, channels, x.numel() // (batch * channels), groups
        normalized, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, *geometry, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.geometry, ctx.eps = geometry, eps
        return F.silu(normalized)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        # the same deterministic kernel again: the normalized x autograd would have kept, bit for bit
        normalized = torch.ops.aten.native_group_norm(x, weight, bias, *ctx.geometry, ctx.eps)[0]
        grad_normalized = torch.ops.aten.silu_backward(grad, normalized)
        grad_x = torch.ops.aten.native_group_norm_backward(grad_normalized, x, mean, rstd, weight, *ctx.geometry,
                                                           [True, False, False])[0]
        return grad_x, None, None, None, None


def _group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    return _GroupNormSiLU.apply(x.contiguous(), norm.weight, norm.bias, norm.num_groups, norm.eps)  # as group_norm


class LeanResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` whose two ``silu(group_norm(·))`` recompute the norm in the backward pass.

    Its forward pass is diffusers' for the blocks ``eligible`` says it covers (``tests/test_frozen_layers.py`` compares
    the two, output and gradient, bit for bit, so a change in diffusers shows there)."""

    @staticmethod
    def eligible(block: ResnetBlock2D) -> bool:
        return (block.time_embedding_norm == "default" and block.upsample is None and block.downsample is None
                and type(block.nonlinearity) is torch.nn.SiLU
                and type(block.norm1) is torch.nn.GroupNorm and type(block.norm2) is torch.nn.GroupNorm)

    def forward(self, input_tensor, temb, *args, **kwargs):
        x = input_tensor
        frozen_norms = not any(p.requires_grad for p in (*self.norm1.parameters(), *self.norm2.parameters()))
        if (args or kwargs or not (torch.is_grad_enabled() and x.requires_grad and frozen_norms) or not x.is_contiguous()
                or torch.is_autocast_enabled(x.device.type)):  # autocast would compute the norms in fp32
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden_states = self.conv1(_group_norm_silu(x, self.norm1))
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = self.conv2(self.dropout(_group_norm_silu(hidden_states, self.norm2)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
        output = input_tensor + hidden_states
        # Stable Diffusion's factor is 1: x / 1 is x exactly, and a kernel less each way for the host to launch
        return output if self.output_scale_factor == 1 else output / self.output_scale_factor


_LEAN = {torch.nn.Conv2d: FrozenConv2d, GEGLU: LeanGEGLU, ResnetBlock2D: LeanResnetBlock2D}


def _swap_classes(module: torch.nn.Module, classes: dict[type, type], skip: Iterable[torch.nn.Module] = ()) -> int:
    """Swap the class of every layer of ``module`` whose exact type is in ``classes`` (and that the new class finds
    ``eligible``, where it says), but those inside the modules in ``skip``. Returns how many changed."""
    skipped = {id(m) for block in skip for m in block.modules()}
    count = 0
    for layer in module.modules():
        new_class = classes.get(type(layer))  # exact types: a subclass with its own forward is left alone
        if (new_class is not None and id(layer) not in skipped
                and getattr(new_class, "eligible", lambda _: True)(layer)):
            layer.__class__ = new_class
            count += 1
    return count


def _linear_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``F.linear`` on a contiguous 3-D input, as autograd computes it: ``linear`` flattens the
    input to 2-D for ``addmm``, whose first-operand gradient is ``grad @ weight``."""
    return grad.reshape(-1, grad.shape[-1]).mm(weight).view(*grad.shape[:-1], weight.shape[1])


class _RecomputedGegluFeedForward(torch.autograd.Function):
    """``out(hidden * gelu(gate))`` for ``[hidden, gate] = proj(x)``, keeping ``x`` alone: the projection (8 channels
    per channel of ``x``) is recomputed in the backward pass, whose kernels are the ones autograd would call."""

    @staticmethod
    def forward(ctx, x, proj_weight, proj_bias, out_weight, out_bias):
        ctx.save_for_backward(x, proj_weight, proj_bias, out_weight)
        hidden, gate = F.linear(x, proj_weight, proj_bias).chunk(2, dim=-1)
        return F.linear(hidden * F.gelu(gate), out_weight, out_bias)

    @staticmethod
    def backward(ctx, grad):
        x, proj_weight, proj_bias, out_weight = ctx.saved_tensors
        hidden, gate = F.linear(x, proj_weight, proj_bias).chunk(2, dim=-1)  # the same kernel: the same values
        grad_product = _linear_input_grad(grad, out_weight)
        grad_hidden = grad_product * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad_product * hidden, gate)
        return _linear_input_grad(torch.cat([grad_hidden, grad_gate], dim=-1), proj_weight), None, None, None, None


class RecomputedFeedForward(FeedForward):
    """diffusers' ``FeedForward`` (GEGLU projection, gated product, output projection) that keeps its input for the
    backward pass and recomputes the rest there, with the same gradient bit for bit.

    Not a free change like the layers above, so it is a level of ``--gradient-checkpointing`` (``feed-forward``):
    the GEGLU projection is 8 channels per channel of the input, a large share of what a step keeps, for a small share
    of its arithmetic (``benchmarks/training_memory.py --breakdown`` measures both; docs/PERFORMANCE.md). Eager, Stable
    Diffusion's form (GEGLU with biases, no active dropout, a contiguous 3-D input, no autocast) runs as one autograd
    function, little Python; any other form, and any compiled one, through ``torch.utils.checkpoint``
    (non-reentrant), whose bookkeeping costs the host more per call when eager (``benchmarks/host_overhead.py``) and
    which ``torch.compile`` honours."""

    def _geglu_form(self, x: torch.Tensor) -> bool:
        if len(self.net) not in (3, 4):  # GEGLU, dropout, output projection, and the optional final dropout
            return False
        act, dropout, out, *final = self.net
        return (type(act) in (GEGLU, LeanGEGLU) and act.proj.bias is not None and type(out) is torch.nn.Linear
                and out.bias is not None and type(dropout) is torch.nn.Dropout
                and all(not d.training or d.p == 0 for d in (dropout, *final)) and x.dim() == 3 and x.is_contiguous()
                and not torch.is_autocast_enabled(x.device.type))

    def forward(self, hidden_states, *args, **kwargs):
        if (torch.is_grad_enabled() and hidden_states.requires_grad and not args and not kwargs
                and not any(p.requires_grad for p in self.parameters())):
            # compiled, the partitioner would keep what the function's backward pass uses (the projection: it never
            # recomputes a matrix product); a checkpointed region it recomputes as told
            if self._geglu_form(hidden_states) and not torch.compiler.is_compiling():
                proj, out = self.net[0].proj, self.net[2]
                return _RecomputedGegluFeedForward.apply(hidden_states, proj.weight, proj.bias, out.weight, out.bias)
            return checkpoint(super().forward, hidden_states, use_reentrant=False)
        return super().forward(hidden_states, *args, **kwargs)


def recompute_feed_forwards(module: torch.nn.Module, on: bool = True, skip: Iterable[torch.nn.Module] = ()) -> int:
    """In place: every ``FeedForward`` in ``module`` recomputes in the backward pass (``on``), but those inside the
    blocks in ``skip`` (checkpointed whole anyway), or keeps what autograd keeps (``not on``). Returns how many
    recompute."""
    _swap_classes(module, {RecomputedFeedForward: FeedForward})
    return _swap_classes(module, {FeedForward: RecomputedFeedForward}, skip) if on else 0


def keep_less_for_backward(module: torch.nn.Module) -> int:
    """In place: every plain ``nn.Conv2d``, ``GEGLU`` and eligible ``ResnetBlock2D`` in ``module`` becomes its lean
    twin. Returns how many."""
    return _swap_classes(module, _LEAN)


def restore(module: torch.nn.Module) -> int:
    """Undo ``keep_less_for_backward`` (the benchmarks measure both). Returns how many layers changed back."""
    return _swap_classes(module, {lean: base for base, lean in _LEAN.items()})
