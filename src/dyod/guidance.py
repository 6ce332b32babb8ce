"""Conditioning the frozen UNet on text: prompt encoding as in diffusers' pipelines, and classifier-free guidance."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states [B, L, D] for prompts, padded to the tokenizer's max length (diffusers' encode_prompt)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = text_encoder.device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(device) if use_mask else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


class GuidedDenoiser:
    """``model(x_t, t)`` for the samplers: the UNet with classifier-free guidance, one batched call per step.

    ε̃ = ε(x_t, ∅) + w·(ε(x_t, c*) - ε(x_t, ∅)); guidance is off when w <= 1, as in diffusers."""

    def __init__(self, unet, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float):
        self.unet = unet
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.calls = 0  # UNet forward passes (a guided step counts once: it is one batched call)
        self._context: torch.Tensor | None = None
        self._context_batch = 0

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1.0 and self.uncond is not None

    def context(self, batch: int) -> torch.Tensor:
        """The text condition for a batch of ``batch`` images: [uncond; cond] with guidance, else cond.

        Built once per batch size and reused at every step (one fixed tensor, which CUDA graphs also want)."""
        if self._context is None or self._context_batch != batch:
            dtype = self.unet.dtype
            cond = self.cond.expand(batch, -1, -1) if self.cond.shape[0] == 1 else self.cond
            if self.do_guidance:
                uncond = self.uncond.expand(batch, -1, -1) if self.uncond.shape[0] == 1 else self.uncond
                cond = torch.cat([uncond, cond])
            self._context, self._context_batch = cond.to(dtype).contiguous(), batch
        return self._context

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        dtype = self.unet.dtype
        context = self.context(x.shape[0])
        if not self.do_guidance:
            return self.unet(x.to(dtype), t, encoder_hidden_states=context).sample.float()
        out = self.unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context).sample.float()
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)
