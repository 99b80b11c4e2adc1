"""LoRA adapters on a copy of the teacher's UNet: the score of the student's own samples.

SwiftBrush's LoRA teacher and DMD's fake score are the same object: the frozen teacher plus a
trainable PEFT LoRA, which computes exactly the teacher while its adapters are off.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig

from flashstep.training.distill import Teacher

# Every linear layer of the transformer blocks (attention, feed-forward, projections in and out)
# plus the ResNets' time-embedding projections, so the LoRA teacher has capacity beyond attention
# on a UNet this small: 0.33M trainable parameters at rank 16 against the UNet's 3.3M. Adding
# the ResNet convs (conv1, conv2) doubles that and costs ~15% more per step.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "time_emb_proj",
)


def lora_teacher(teacher: Teacher, rank: int, targets: Sequence[str]) -> torch.nn.Module:
    """A copy of the teacher's UNet with a PEFT LoRA; only the LoRA weights train.

    The LoRA's up-projections start at zero (PEFT's default), so it starts equal to the teacher
    and the first VSD gradient is zero until the LoRA has seen the student's samples.
    """

    unet = copy.deepcopy(teacher.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    return unet


@contextmanager
def adapters_off(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block the LoRA teacher computes exactly the frozen teacher."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_weights(unet: torch.nn.Module) -> torch.nn.Module:
    """A module that holds (shares, not copies) only the LoRA parameters, for the train state."""
    holder = torch.nn.Module()
    for name, p in unet.named_parameters():
        if "lora_" in name:
            holder.register_parameter(name.replace(".", "__"), p)
    return holder


# ----- the training loop -----
