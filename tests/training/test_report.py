"""The ShapesBench report's tables, rendered from evaluation rows."""

from dataclasses import asdict
from pathlib import Path

import pytest

from flashstep.training.report import (
    REPORT_JSON,
    Row,
    fill_block,
    load_results,
    main,
    markdown,
    models_table,
    render_markdown,
)

REPO = Path(__file__).resolve().parents[2]


def _row(row: Row, **values) -> dict:
    return {"row": asdict(row), "label": row.label, **values}


def test_quality_table_splits_adherence_into_shape_color_and_position():
    rows = [
        _row(Row("quality", "shapes-teacher", 25), unet_evals_per_image=50, seconds_per_image=0.11,
             adherence=0.446, adherence_heldout=0.283, fd=1038.2, diversity=0.73,
             attribute_accuracy={"background": 1.0, "color": 0.879, "position": 0.221, "shape": 0.726, "size": 0.97}),
        _row(Row("quality", "shapes-instaflow", 1), unet_evals_per_image=1, seconds_per_image=0.01,
             adherence=0.3, adherence_heldout=None, fd=1100.0, diversity=0.7),
        _row(Row("quality", "shapes-2rf", 2), missing=True),
    ]
    lines = markdown(rows, seeds=4).splitlines()
    teacher = next(line for line in lines if line.startswith("| shapes-teacher@25 "))
    assert teacher.endswith("| 0.446 | 0.283 | 1038 | 0.730 | 0.73 / 0.88 / 0.22 |")
    instaflow = next(line for line in lines if line.startswith("| shapes-instaflow@1 "))
    assert instaflow.endswith("| - | 1100 | 0.700 | - / - / - |")  # an older row without the split
    header = next(line for line in lines if line.startswith("| model |"))
    missing = next(line for line in lines if line.startswith("| shapes-2rf@2 "))
    assert header.count("|") == teacher.count("|") == missing.count("|")


def test_hybrid_table_sets_each_hybrid_beside_the_same_model_alone_and_the_teacher():
    rows = [
        _row(Row("quality", "shapes-teacher", 25), unet_evals_per_image=50, seconds_per_image=0.04,
             adherence=0.93, adherence_heldout=0.76, fd=358.0, diversity=0.921),
        _row(Row("quality", "shapes-hypersd", 4), unet_evals_per_image=4, seconds_per_image=0.005,
             adherence=0.95, adherence_heldout=0.79, fd=196.0, diversity=0.928),
        _row(Row("quality", "shapes-hypersd", 8), unet_evals_per_image=8, seconds_per_image=0.008,
             adherence=0.96, adherence_heldout=0.77, fd=249.0, diversity=0.867),
        _row(Row("hybrid", "shapes-hypersd", 8, hybrid=True), unet_evals_per_image=8, adherence=0.968, fd=284.4,
             diversity=0.872),
        _row(Row("hybrid", "shapes-2rf", 2, hybrid=True), unet_evals_per_image=2, adherence=0.394, fd=545.0,
             diversity=0.905),
    ]
    lines = markdown(rows, seeds=16).splitlines()
    header = next(line for line in lines if line.startswith("| hybrid (teacher takes step 1) |"))
    assert header.endswith("| diversity | diversity alone | teacher@25 diversity |")
    hybrid8 = next(line for line in lines if line.startswith("| shapes-hypersd@8 hybrid "))
    assert hybrid8 == "| shapes-hypersd@8 hybrid | 8 | 0.968 | 284 | 0.872 | 0.867 | 0.921 |"  # @8 alone, not @4
    without_alone = next(line for line in lines if line.startswith("| shapes-2rf@2 hybrid "))
    assert without_alone.endswith("| 0.905 | - | 0.921 |")  # no 2rf@2 row was evaluated
    assert header.count("|") == hybrid8.count("|") == without_alone.count("|")


def test_models_table_names_each_model_once_with_what_made_it_and_each_step_count_on_its_own_row():
    rows = [
        _row(Row("quality", "shapes-hypersd", 2), family="hypersd", seeds_per_prompt=16, unet_evals_per_image=2,
             seconds_per_image=0.0037, adherence=0.861, adherence_heldout=0.658, fd=194.2, diversity=0.967),
        _row(Row("quality", "shapes-hypersd", 4), family="hypersd", seeds_per_prompt=16, unet_evals_per_image=4,
             seconds_per_image=0.0058, adherence=0.953, adherence_heldout=0.796, fd=196.0, diversity=0.928),
        _row(Row("quality", "shapes-2rf", 2), missing=True),
        _row(Row("hybrid", "shapes-hypersd", 2, hybrid=True), family="hypersd", seeds_per_prompt=16,
             unet_evals_per_image=2, adherence=0.785, fd=294.0, diversity=0.948),
    ]
    lines = models_table(rows).splitlines()
    first = next(line for line in lines if line.startswith("| `shapes-hypersd` | hypersd | TSCD LoRA"))
    assert first.endswith("| 2 | 2 | 0.861 | 0.658 | 194 | 0.967 | 0.0037 |")
    assert "| | | | 4 | 4 | 0.953 | 0.796 | 196 | 0.928 | 0.0058 |" in lines
    assert not any("hybrid" in line for line in lines)  # the quality rows only
    missing = next(line for line in lines if line.startswith("| `shapes-2rf` "))
    assert "not installed" in missing and missing.count("|") == first.count("|") == lines[0].count("|")
    assert "16 seeds a prompt" in lines[-1] and "flashstep report --seeds 16" in lines[-1]


def test_a_block_between_markers_is_replaced_and_the_text_around_it_kept():
    text = "intro\n<!-- models-table:start -->\nold\n<!-- models-table:end -->\noutro\n"
    assert fill_block(text, "models-table", "new\n") == (
        "intro\n<!-- models-table:start -->\nnew\n<!-- models-table:end -->\noutro\n"
    )
    with pytest.raises(ValueError, match="shapesbench-tables"):
        fill_block(text, "shapesbench-tables", "x\n")


@pytest.mark.parametrize("document", ["README.md", "docs/shapesbench.md"])
def test_the_checked_in_documents_show_what_the_checked_in_report_renders(document):
    """README's model table and the ShapesBench doc's tables can never drift from shapesbench.json:
    after a new `flashstep report`, run `python -m flashstep.training.report --update README.md docs/shapesbench.md`."""
    text = (REPO / document).read_text()
    assert "<!-- " in text and ":start -->" in text, f"{document} holds no generated block"
    assert render_markdown(text, load_results(REPORT_JSON)) == text


def test_main_check_fails_on_a_stale_file_and_update_fixes_it(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text("<!-- models-table:start -->\nold\n<!-- models-table:end -->\n")
    assert main(["--check", str(stale)]) == 1
    assert "old" in stale.read_text()  # --check writes nothing
    assert main(["--update", str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0
    assert "| `shapes-teacher` | teacher |" in stale.read_text()
