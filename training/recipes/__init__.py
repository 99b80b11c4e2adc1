"""The training recipes of the shapes world, one file each, and the registry that names them.

A recipe is a typed config dataclass plus a train function, built from the shared parts directly
under `training/`; no recipe imports another. `RECIPES` names each recipe's module and attributes
as strings, so listing them (`flashstep train --help`) imports neither torch nor any recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Recipe:
    """Where a recipe lives and what it exports; `load()` imports it."""

    module: str  # e.g. "flashstep.training.recipes.swiftbrush"
    config: str  # its config dataclass
    train: str  # its train function
    summary: str  # one line for `flashstep train --help`
    exports: tuple[str, ...] = ()  # model folder names a distillation recipe writes under `--out`

    def load(self) -> tuple[ModuleType, type, Callable[..., dict]]:
        """(module, config class, train function), imported now."""
        module = importlib.import_module(self.module)
        return module, getattr(module, self.config), getattr(module, self.train)


def _recipe(name: str, config: str, train: str, summary: str, exports: tuple[str, ...] = ()) -> Recipe:
    return Recipe(f"{__name__}.{name}", config, train, summary, exports)


# Stage name (as typed after `flashstep train`) -> recipe.
RECIPES: dict[str, Recipe] = {
    "judge": _recipe("judge", "JudgeTrainConfig", "train_judge", "the ShapesBench judge CNN"),
    "vae": _recipe("vae", "VAETrainConfig", "train_vae_recipe", "the VAE: joint training, then decoder-only"),
    "decoder": _recipe("decoder", "VAETrainConfig", "train_decoder_recipe", "refine an exported VAE's decoder"),
    "teacher": _recipe("teacher", "TeacherTrainConfig", "train_teacher", "the multi-step teacher, shapes-teacher"),
    "instaflow": _recipe("instaflow", "InstaFlowTrainConfig", "train_instaflow",
                         "reflow the teacher (shapes-2rf), then distil it to one step (shapes-instaflow)",
                         ("shapes-2rf", "shapes-instaflow")),
    "swiftbrush": _recipe("swiftbrush", "SwiftBrushTrainConfig", "train_swiftbrush",
                          "image-free one-step distillation by VSD (shapes-swiftbrush)", ("shapes-swiftbrush",)),
    "hypersd": _recipe("hypersd", "HyperSDTrainConfig", "train_hypersd",
                       "trajectory-segmented consistency distillation into a LoRA (shapes-hypersd)", ("shapes-hypersd",)),
    "instaflow-refine": _recipe("instaflow_refine", "InstaFlowTrainConfig", "refine_instaflow",
                                "continue an exported instaflow student"),
    "hypersd-refine": _recipe("hypersd_refine", "HyperSDRefineConfig", "refine_hypersd",
                              "score distillation (DMD) of an exported hypersd LoRA for one step"),
}  # fmt: skip
