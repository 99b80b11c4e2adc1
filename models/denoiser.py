"""`Denoiser`: one UNet plus one batch's conditioning, called by samplers as `model(x, t)`.

Samplers see only `x_t, t -> prediction` (epsilon for diffusion families, velocity for rectified
flow); everything a request adds lives here: classifier-free guidance (Ho & Salimans 2022,
uncond and cond rows concatenated into one UNet batch, `e = e_u + w (e_c - e_u)` per image),
NASA negatives (models/nasa.py), SDXL's added text/time conditioning, and the conversion of a
v-prediction UNet's output to epsilon. A `Denoiser` lives for one batch, so counting its UNet
calls is safe under concurrency.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from flashstep.models.nasa import nasa_context
from flashstep.models.schedule import NoiseSchedule


@dataclass
class Conditioning:
    """What one batch of B images is conditioned on. Optional parts are None when unused."""

    prompt_embeds: torch.Tensor  # (B, L, C) text-encoder states of the prompts
    pooled_embeds: torch.Tensor | None = None  # (B, P) SDXL pooled text embeddings
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL (orig h, orig w, crop top, crop left, h, w)
    uncond_embeds: torch.Tensor | None = None  # (B, L, C) negative or empty prompt, CFG only
    uncond_pooled: torch.Tensor | None = None  # (B, P) SDXL, CFG only
    guidance_scale: torch.Tensor | None = None  # (B,) CFG scale per image; None: no CFG
    nasa_embeds: torch.Tensor | None = None  # (B, L-, C) negative prompts for NASA
    nasa_alpha: tuple[float, ...] | None = None  # (B,) NASA strength per image

    @property
    def cfg(self) -> bool:
        return self.guidance_scale is not None


class Denoiser:
    """x_t, t -> epsilon (or flow velocity) for a batch, with CFG, NASA and SDXL conditioning applied.

    prediction: what `unet` outputs ("epsilon", "v_prediction" or "flow"); v is turned into
    epsilon (Salimans & Ho 2022, eps = sqrt(abar) v + sqrt(1 - abar) x) so every diffusion sampler
    works in epsilon. `evals` counts UNet forward passes per image (a CFG call counts two).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        cond: Conditioning,
        prediction: str,
        schedule: NoiseSchedule,
    ) -> None:
        self.unet = unet
        self.cond = cond
        self.prediction = prediction
        self.schedule = schedule
        self.evals = 0
        self._prepare()

    def _prepare(self) -> None:
        # The UNet batch: (2B, ...) as [uncond; cond] with CFG, else (B, ...).
        c = self.cond
        if c.cfg:
            self._embeds = torch.cat([c.uncond_embeds, c.prompt_embeds])
            pooled = None if c.pooled_embeds is None else torch.cat([c.uncond_pooled, c.pooled_embeds])
            time_ids = None if c.time_ids is None else torch.cat([c.time_ids, c.time_ids])
        else:
            self._embeds, pooled, time_ids = c.prompt_embeds, c.pooled_embeds, c.time_ids
        self._added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        self._nasa = None
        if c.nasa_embeds is not None and c.nasa_alpha is not None and any(c.nasa_alpha):
            if c.cfg:
                # The uncond half already is the negative prompt (classic CFG): no NASA there.
                self._nasa = (torch.cat([c.nasa_embeds, c.nasa_embeds]), (0.0,) * len(c.nasa_alpha) + c.nasa_alpha)
            else:
                self._nasa = (c.nasa_embeds, c.nasa_alpha)

    def _unet(self, x: torch.Tensor, t: float) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)  # (N,)
        ctx = nasa_context(*self._nasa) if self._nasa is not None else contextlib.nullcontext()
        with ctx:
            out = self.unet(x, timestep, encoder_hidden_states=self._embeds, added_cond_kwargs=self._added)
        return out.sample if hasattr(out, "sample") else out[0]

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """x (B, C, h, w) at timestep t -> prediction (B, C, h, w) in x's dtype."""
        c = self.cond
        if c.cfg:
            out_u, out_c = self._unet(torch.cat([x, x]), t).chunk(2)
            w = c.guidance_scale.to(out_c.dtype).view(-1, 1, 1, 1)
            out = out_u + w * (out_c - out_u)
            self.evals += 2
        else:
            out = self._unet(x, t)
            self.evals += 1
        if self.prediction == "v_prediction":
            alpha, sigma = self.schedule.alpha_sigma(t)
            out = alpha * out + sigma * x
        return out

