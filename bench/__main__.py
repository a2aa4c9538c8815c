"""``make bench``: run every benchmark, store its results, regenerate BENCHMARKS.md's table."""

from __future__ import annotations

import importlib
import sys
import time

from bench import report

BENCHMARKS = [
    "bench.cluster_startup",
    "bench.serving",
    "bench.shipped",
    "bench.embeddings",
    "bench.training_loop",
    "bench.training_scale",
    "bench.jobs",
    "bench.llm",
    "bench.finetune",
    "bench.faults",
]


def main() -> int:
    only = sys.argv[1:]  # `python -m bench serving` runs one
    for name in BENCHMARKS:
        if only and name.rsplit(".", 1)[-1] not in only:
            continue
        print(f"running {name} ...", flush=True)
        started = time.monotonic()
        rows = importlib.import_module(name).run()
        took = time.monotonic() - started
        path = report.save(name.rsplit(".", 1)[-1], rows, duration_s=took)
        for row in rows:
            print(
                f"  {row['figure']}: {row['ours']:.3g}{row['unit']} vs {row['reference']:.3g}"
                f"{row['unit']} ({row['reference_name']}) = {row['ratio']:.2f}x"
            )
        print(f"  wrote {path} ({took:.0f} s)")
    report.regenerate_table()
    print("updated BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
