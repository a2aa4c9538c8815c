"""Write ``bench/results/<name>.json`` with machine facts, and regenerate BENCHMARKS.md's table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> dict[str, Any]:
    """Facts that make figures comparable across runs."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ray": metadata.version("ray"),
        "torch": metadata.version("torch"),
        "commit": commit,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def median(values: list[float]) -> float:
    """The median, the figure every benchmark reports."""
    return float(statistics.median(values))


def save(name: str, rows: list[dict[str, Any]], duration_s: float | None = None) -> Path:
    """Store one benchmark's rows; each row has figure, ours, reference, ratio, target, unit."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    facts = {**machine(), "duration_s": None if duration_s is None else round(duration_s)}
    path.write_text(json.dumps({"machine": facts, "rows": rows}, indent=2) + "\n")
    return path


def regenerate_table() -> None:
    """Rebuild the table between the markers in BENCHMARKS.md from every results file."""
    lines = [
        "| benchmark | figure | aiaas | reference | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        for row in json.loads(path.read_text())["rows"]:
            target = row.get("target")
            # Times are better lower, throughputs higher: the row says which.
            higher = bool(row.get("higher_is_better"))
            met = (
                ""
                if target is None
                else (
                    "yes"
                    if (row["ratio"] >= target if higher else row["ratio"] <= target)
                    else "no"
                )
            )
            bound = "" if target is None else f"{'≥' if higher else '≤'} {target}×"
            lines.append(
                f"| {path.stem} | {row['figure']} | {row['ours']:.3g} {row['unit']} | "
                f"{row['reference']:.3g} {row['unit']} ({row['reference_name']}) | "
                f"{row['ratio']:.2f}× | {bound} | {met} |"
            )
    doc = ROOT / "BENCHMARKS.md"
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])
