"""`flashstep train STAGE`: one subparser per recipe, carrying only that recipe's flags."""

import io
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest

from flashstep.cli import build_parser, main
from flashstep.cli.train import STAGE_FLAGS
from flashstep.training.recipes import RECIPES


def help_of(*argv: str) -> str:
    """The text `flashstep ARGV --help` prints (argparse exits 0 after printing it)."""
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as stopped:
        main([*argv, "--help"])
    assert stopped.value.code == 0
    return out.getvalue()


def flags_of(*argv: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_of(*argv))) - {"--help"}


def refusal(argv: list[str]) -> str:
    """The message of `flashstep ARGV`'s usage error; asserts it exits 2, argparse's code, with no traceback."""
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "Traceback" not in err.getvalue()
    return err.getvalue()


def test_every_recipe_has_a_stage_and_the_train_help_lists_them():
    assert set(STAGE_FLAGS) == set(RECIPES)
    text = help_of("train")
    for stage, recipe in RECIPES.items():
        assert stage in text
        assert recipe.summary.split(" (")[0][:30] in " ".join(text.split())


def test_a_stage_help_shows_only_that_stages_flags():
    assert "--tscd-weight" in flags_of("train", "hypersd-refine")
    assert "--tscd-weight" not in flags_of("train", "teacher")
    assert flags_of("train", "teacher") == {"--train-steps", "--runs", "--out", "--tiny", "--threads", "--vae"}
    assert flags_of("train", "judge") == {"--train-steps", "--out", "--threads"}
    swiftbrush = flags_of("train", "swiftbrush")
    assert {"--start-from", "--start-steps", "--anchor-weight", "--teacher"} <= swiftbrush
    assert not swiftbrush & {"--student", "--seed", "--bf16", "--pairs", "--dmd-weight", "--vae"}
    assert "--bf16" in flags_of("train", "instaflow") and "--bf16" not in flags_of("train", "hypersd")


def test_steps_is_never_a_training_length():
    for stage in RECIPES:
        flags = flags_of("train", stage)
        assert "--train-steps" in flags and "--steps" not in flags, stage


@pytest.mark.slow  # imports torch and the recipes
def test_train_steps_sets_the_training_length(monkeypatch):
    """`--train-steps N` reaches the config the recipe is called with (every length field of a distillation)."""
    from flashstep.cli import train

    seen = {}

    def fake_train(cfg, run_dir, *exports, teacher_dir):
        seen["cfg"] = cfg
        return {"seconds": 0}

    for stage in ("hypersd", "instaflow"):
        module, _, _ = RECIPES[stage].load()
        monkeypatch.setattr(module, RECIPES[stage].train, fake_train)
        assert main(["train", stage, "--train-steps", "7", "--runs", "unused", "--out", "unused"]) == 0
        lengths = {f: getattr(seen["cfg"], f) for f in train.STEP_FIELDS if hasattr(seen["cfg"], f)}
        assert lengths and all(v in (7, (7,) * 4) for v in lengths.values()), (stage, lengths)


def test_a_bad_value_exits_2_naming_the_field():
    message = refusal(["train", "hypersd-refine", "--student", "s", "--ema-decay", "1"])
    assert "flashstep train hypersd-refine: error:" in message
    assert "`ema_decay` must be in (0, 1) but is 1.0" in message
    message = refusal(["train", "instaflow-refine", "--student", "s", "--colour-weight", "-2"])
    assert "`colour_weight` must be >= 0 but is -2" in message


def test_a_flag_that_needs_another_exits_2():
    assert "--start-steps needs --start-from" in refusal(["train", "swiftbrush", "--start-steps", "3"])
    assert "--dmd-guidance needs --dmd-weight" in refusal(["train", "instaflow-refine", "--student", "s", "--dmd-guidance", "2"])


def test_a_flag_of_another_stage_is_refused():
    assert "unrecognized arguments: --tscd-weight" in refusal(["train", "teacher", "--tscd-weight", "1"])


def test_steps_on_generate_and_eval_are_sampling_steps():
    parser = build_parser()
    generate = parser.parse_args(["generate", "a red circle", "--steps", "3"])
    assert generate.steps == 3
    evaluate = parser.parse_args(["eval", "--prompts", "p.txt", "--steps", "2"])
    assert evaluate.steps == 2
    assert "sampling steps" in " ".join(help_of("generate").split())


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom flashstep.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['train', 'hypersd-refine', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_python_m_flashstep_is_the_same_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "flashstep", "train", "--help"], capture_output=True, text=True, check=True)
    assert "hypersd-refine" in out.stdout
