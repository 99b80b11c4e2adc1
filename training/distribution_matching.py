"""Distribution matching (DMD's generator gradient) for a one-step student that also regresses pairs.

Why: a one-step student that only regresses the teacher's ODE endpoints learns the map on the
pairs' noises and no further; on fresh noise its images drift off the teacher's distribution
(on shapes: neighbouring hues, purple drawn blue, orange drawn yellow). A distribution-matching
gradient (DMD, Yin et al. 2023, arXiv:2311.18828, eq. 7-8; DMD2, arXiv:2405.14867, keeps it and
adds the two time-scale rule) needs no pairs, so it can act on any noise: noise the student's
sample x to a random t, ask where the guided teacher
(the "real" score) and where a model of the student's own samples (the "fake" score) would
denoise it, and move x from the second towards the first. DMD1 pairs it with a regression loss,
as here: the regression keeps the ODE coupling (and diversity), the matching term the modes.

- real score: the frozen teacher with classifier-free guidance at `guidance` (one batched call);
- fake score: the SwiftBrush LoRA teacher (`training.lora.lora_teacher`), conditional only
  as in DMD2, fitted by epsilon-MSE on the student's detached samples `fake_updates` times per
  student step; it starts equal to the teacher, so the first `fake_warmup` steps only fit it
  (otherwise the first gradients would be the bare guidance direction);
- the gradient on x is `(x0_fake - x0_real) / mean|x - x0_real|` per sample (DMD eq. 8's
  normalisation, which makes its size independent of t), applied through
  `0.5 * mse(x, (x - grad).detach())`.

The real and fake scores share one module: the real one is the LoRA teacher with its adapters off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashstep.training.distill import Teacher, add_noise, cfg_eps, unet_eps
from flashstep.training.lora import LORA_TARGETS, adapters_off, lora_teacher, lora_weights


@dataclass(frozen=True)
class DistributionMatchingConfig:
    weight: float = 1.0  # against the L2 regression (weight 1): DMD1 uses 1 for matching, 0.25 for regression
    guidance: float = 4.0  # the real score's CFG: the scale the teacher pairs were sampled at
    t_range: tuple[int, int] = (20, 980)  # inclusive, as SwiftBrush and DMD2
    fake_updates: int = 2  # LoRA steps per student step (DMD2: 5, with no regression to anchor the student)
    fake_warmup: int = 100  # student steps that only fit the fake score
    lora_rank: int = 16
    lora_lr: float = 1e-3
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.fake_updates < 1:
            raise ValueError(
                f"fake_updates must be >= 1 (the fake score must follow the student), got {self.fake_updates}"
            )
        if self.guidance < 0:
            raise ValueError(f"`guidance` (the real score's CFG scale) must be >= 0 but is {self.guidance}")
        if not 0 <= self.t_range[0] <= self.t_range[1] < 1000:
            raise ValueError(f"t_range must lie in [0, 999] and be ordered, got {self.t_range}")


def dmd_grad(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD eq. 7-8: (x0_fake - x0_real), divided per sample by mean |x - x0_real|."""
    norm = (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x0_fake - x0_real) / norm


def predicted_x0(xt: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), abar_t (B,) per sample."""
    a = abar_t.view(-1, 1, 1, 1)
    return (xt - (1 - a).sqrt() * eps) / a.sqrt()


class DistributionMatching:
    """The matching loss on a student's samples, and the fake score that follows them."""

    def __init__(self, teacher: Teacher, cfg: DistributionMatchingConfig) -> None:
        self.cfg = cfg
        self.abar = teacher.alphas_cumprod
        self.uncond = teacher.empty_prompt_embeds
        self.scores = lora_teacher(teacher, cfg.lora_rank, LORA_TARGETS)
        self.params = [p for p in self.scores.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lora_lr, weight_decay=0.0)

    def state(self) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
        """Modules and optimizers to save with the train state, so a resumed run keeps its fake score."""
        return {"fake_score": lora_weights(self.scores)}, {"fake_score": self.opt}

    def _noised(
        self, x: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, noise) at t ~ U[t_range] per sample."""
        lo, hi = self.cfg.t_range
        t = torch.randint(lo, hi + 1, (x.shape[0],), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        return add_noise(x, noise, self.abar[t]), t, noise

    def loss(self, x: torch.Tensor, embeds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """0.5 * mse(x, x - grad): its gradient w.r.t. x is the normalised DMD gradient / x.numel()."""
        xt, t, _ = self._noised(x.detach(), gen)
        with torch.no_grad():
            with adapters_off(self.scores):
                eps_real = cfg_eps(
                    self.scores, xt, t, embeds, self.uncond.expand_as(embeds), self.cfg.guidance
                )
            eps_fake = unet_eps(self.scores, xt, t, embeds)
            abar_t = self.abar[t]
            grad = dmd_grad(
                x.detach(), predicted_x0(xt, eps_real, abar_t), predicted_x0(xt, eps_fake, abar_t)
            )
        return 0.5 * F.mse_loss(x, (x - grad).detach())

    def fit(self, x: torch.Tensor, embeds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """`fake_updates` epsilon-MSE steps of the fake score on detached samples; returns the last loss."""
        x = x.detach()
        loss = torch.tensor(float("nan"))
        for _ in range(self.cfg.fake_updates):  # the same samples, fresh t and noise each time
            xt, t, noise = self._noised(x, gen)
            loss = F.mse_loss(unet_eps(self.scores, xt, t, embeds), noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
        return loss.detach()
