"""`flashstep train <recipe> --tiny` distils a teacher folder into servable exports from the command line."""

import pytest

from flashstep.cli import DISTILL_STAGES
from flashstep.cli import main as flashstep_main
from models.flashstep_config import FlashstepConfig
from models.outputs import GenerationRequest
from models.registry import load_engine


@pytest.mark.parametrize("stage", sorted(DISTILL_STAGES))
def test_train_recipe_from_the_command_line_exports_loadable_models(stage, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "models"
    argv = ["train", stage, "--tiny", "--teacher", str(tiny_teacher_dir), "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert flashstep_main(argv) == 0
    assert "seconds" in capsys.readouterr().out
    exports = DISTILL_STAGES[stage][3]
    for name in exports:
        config = FlashstepConfig.load(out / name)
        engine = load_engine(str(out / name), models_root=tiny_teacher_dir.parent)
        steps = config.default_steps
        result = engine.generate([GenerationRequest(prompt="a blue star", seed=1, num_inference_steps=steps)])
        assert result.images[0].size == (64, 64)


def test_train_teacher_on_a_given_vae_from_the_command_line(tiny_teacher_dir, tmp_path, capsys):
    """`--vae` trains a teacher on an existing VAE (e.g. the shipped one) instead of RUNS/vae/vae."""
    out = tmp_path / "teacher"
    argv = ["train", "teacher", "--tiny", "--steps", "2", "--vae", str(tiny_teacher_dir / "vae"), "--out", str(out)]
    assert flashstep_main([*argv, "--runs", str(tmp_path / "runs")]) == 0
    assert "final_loss" in capsys.readouterr().out
    assert FlashstepConfig.load(out).family == "teacher"
    result = load_engine(str(out)).generate([GenerationRequest(prompt="a blue star", seed=1, num_inference_steps=2)])
    assert result.images[0].size == (64, 64)
