"""The judge-feature perceptual loss, the stand-in for LPIPS (whose weights cannot be downloaded here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashstep.training.distill import Teacher
from flashstep.training.judge import Judge


class JudgePerceptual:
    """Perceptual distance on the judge's penultimate features of decoded images (LPIPS stand-in).

    With `colour_weight`, plus the squared error of the two images' colours pooled to 16 x 16: a
    one-step student's wrong colours are mostly neighbouring hues (orange for red, blue for
    purple), a small step in the VAE's latents and in the judge's pooled features alike.
    Gradients flow through the frozen VAE decoder and judge into the student's latents.
    """

    def __init__(self, teacher: Teacher, judge: Judge, colour_weight: float = 0.0) -> None:
        self.vae = teacher.vae
        self.judge = judge.eval().requires_grad_(False)
        self.colour_weight = colour_weight

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.judge(images)[0], dim=-1)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            want_images = self._decode(target)
            want = self._features(want_images)
        images = self._decode(pred)
        loss = (self._features(images) - want).pow(2).sum(-1).mean()
        if self.colour_weight:
            size = images.shape[-1] // 16
            loss = loss + self.colour_weight * F.mse_loss(F.avg_pool2d(images, size), F.avg_pool2d(want_images, size))
        return loss
