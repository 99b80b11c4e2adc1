"""flashstep: serve and train distilled one-step and few-step text-to-image diffusion models."""

__version__ = "0.1.0"
