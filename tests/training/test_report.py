"""The ShapesBench report's tables, rendered from evaluation rows."""

from dataclasses import asdict

from training.report import Row, markdown


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
