"""What every benchmark run records: machine, date, commit, settings, figures; a table; a PNG.

    report = new_report("latency", settings)          # machine, date, git commit, settings
    report["figures"] = {...}
    path = write_report(report)                       # bench/results/latency.json
    print_table(rows, columns)                        # fixed-width table on stdout

Percentiles are nearest-rank on the sorted sample (no interpolation), so a p99 over 50 samples is
the largest one: small samples say so plainly instead of inventing precision. Plots use
matplotlib's Agg backend; without matplotlib the PNG is skipped with a note (the JSON and the
table are what the targets are read from).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile `q` in [0, 100] of a non-empty sample."""
    if not samples:
        raise ValueError("`samples` must hold at least one value but is empty")
    if not 0 <= q <= 100:
        raise ValueError(f"`q` must be in [0, 100] but is {q}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, p90, p95, p99, mean, min and count of a sample of seconds."""
    return {
        "median": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "mean": sum(samples) / len(samples),
        "min": min(samples),
        "n": len(samples),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict:
    """Where the figures were measured: CPU, cores, memory, torch, and the GPU's name when used."""
    import torch

    info = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_1m"] = os.getloadavg()[0]  # other work on the machine skews CPU figures
    except OSError:
        pass
    return info


def git_info() -> dict:
    """The commit the figures belong to, and whether the work tree had uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(status) if status is not None else None}


def new_report(name: str, settings: dict, device: str = "cpu") -> dict:
    """The common head of a results file; the caller adds its figures."""
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_info(),
        "machine": machine(device),
        "settings": settings,
    }


def write_report(report: dict, path: Path | None = None) -> Path:
    """Write `report` as indented JSON to `path` (default bench/results/<benchmark>.json)."""
    path = Path(path) if path is not None else RESULTS_DIR / f"{report['benchmark']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_cell(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str | None = None) -> str:
    """Print (and return) a fixed-width table; `columns` are (key, header, format spec)."""
    cells = [[format_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [] if title is None else [title]
    lines.append("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The same table as `print_table`, as GitHub markdown (for the README)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key), spec) for key, _, spec in columns) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG plot (pip install matplotlib)", flush=True)
        return None
    return plt


def save_figure(fig, path) -> None:
    """Lay out, write as PNG and free a figure: every bench plot ends the same way."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
