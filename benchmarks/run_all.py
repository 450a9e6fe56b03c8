"""`make bench`: run every benchmark in turn with its default (2-core friendly) settings.

Each benchmark is also runnable on its own (`python -m benchmarks.<name> --help`), with larger
settings or `--device cuda` on a GPU machine. Results print as tables on stdout.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

BENCHMARKS = [
    "prepare_bench",
    "train_bench",
    "cam_bench",
    "radiomics_pyrad_bench",
    "radiomics_bench",
    "fixed_cost",
    "scaling_bench",
    "evaluate_bench",
    "catalog_insert_bench",
    "ablation_bench",
]


def main() -> int:
    only = sys.argv[1:]
    failed = []
    for name in BENCHMARKS:
        if only and name not in only:
            continue
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"== {name}: not present, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        print(f"== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
