"""Bulk inserts into the DuckDB catalog: ``catalog.insert_columns``/``insert_rows`` against the
hand-written ways they replaced (executemany, multi-row VALUES, register + INSERT ... SELECT,
typed unnest parameters), on the shapes the stages write.

Each case is timed best-of-``--repeat`` into a fresh file catalog (delete between repeats).

Usage: .venv/bin/python -m benchmarks.catalog_insert_bench [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np

from kacl_cli.catalog import Catalog, insert_columns, insert_rows


def _best(con: duckdb.DuckDBPyConnection, table: str, fn: Callable[[], object],
          repeat: int) -> float:
    times = []
    for _ in range(repeat):
        con.execute(f"DELETE FROM {table}")
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalog(Path(tmp) / "catalog.duckdb")
        cat.init()
        con = duckdb.connect(str(cat.path))
        rows: list[tuple[str, int, str, float, float]] = []

        def case(name: str, table: str, n: int, old_name: str, old: Callable[[], object],
                 new: Callable[[], object]) -> None:
            t_old = _best(con, table, old, args.repeat)
            t_new = _best(con, table, new, args.repeat)
            rows.append((name, n, old_name, t_old, t_new))

        n = 256 * 14  # one cam chunk: 256 images x 14 findings
        cam = {"round": np.zeros(n, np.int32),
               "image_id": np.array([f"i{i // 14}" for i in range(n)], object),
               "finding": np.array([f"f{i % 14}" for i in range(n)], object),
               "probability": rng.random(n)}
        for k in ("x", "y", "w", "h", "peak", "mass"):
            cam[k] = np.ma.masked_invalid(np.where(rng.random(n) < 0.2, np.nan, rng.random(n)))
        cam["reason"] = np.array([None] * n, object)

        def cam_old() -> None:
            con.register("chunk", cam)
            con.execute("INSERT OR REPLACE INTO cam_boxes SELECT round, image_id, finding, "
                        "probability, x, y, w, h, peak, mass, reason FROM chunk")

        case("cam_boxes chunk", "cam_boxes", n, "register+SELECT", cam_old,
             lambda: insert_columns(con, "cam_boxes", cam, replace=True))

        metrics = [(1, "test", "auc", f"f{i % 14}", 0.5 if i % 2 else None,
                    float(i) if i % 9 else float("nan"), 0.1, 0.9, i, "r") for i in range(2000)]

        def metrics_old() -> None:
            for s in range(0, len(metrics), 500):
                part = metrics[s:s + 500]
                marks = "(" + ", ".join("?" * 10) + ")"
                con.execute("INSERT INTO metrics VALUES " + ", ".join([marks] * len(part)),
                            [v for r in part for v in r])

        case("metrics", "metrics", len(metrics), "multi-row VALUES", metrics_old,
             lambda: insert_rows(con, "metrics", metrics))

        m = 1000
        feats = [rng.random(100).astype(np.float32).tolist() for _ in range(m)]
        ids = [f"i{i}" for i in range(m)]

        def rad_old() -> None:
            con.execute(
                "INSERT OR REPLACE INTO radiomics SELECT ?, u.i, u.f, ?, ?, u.x, u.n, u.r FROM "
                "(SELECT unnest(?::VARCHAR[]) AS i, unnest(?::VARCHAR[]) AS f, "
                "unnest(?::FLOAT[][]) AS x, unnest(?::INTEGER[]) AS n, "
                "unnest(?::VARCHAR[]) AS r) u",
                [1, "fast", "h", ids, ["Mass"] * m, feats, [0] * m, [None] * m])

        case("radiomics x100 features", "radiomics", m, "unnest params", rad_old,
             lambda: insert_columns(con, "radiomics", {
                 "round": [1] * m, "image_id": ids, "finding": ["Mass"] * m,
                 "backend": ["fast"] * m, "settings_hash": ["h"] * m, "features": feats,
                 "n_nonfinite": [0] * m, "reason": [None] * m}, replace=True))

        at = dt.datetime.now()
        errors = [("run", "radiomics", f"i{i}", "empty ROI", at) for i in range(200)]
        case("errors", "errors", len(errors), "executemany",
             lambda: con.executemany("INSERT INTO errors VALUES (?, ?, ?, ?, ?)", errors),
             lambda: insert_rows(con, "errors", errors))
        stats = [(1, "h", j, 0.5, 1.0, 10) for j in range(100)]
        case("radiomics_stats", "radiomics_stats", len(stats), "executemany",
             lambda: con.executemany("INSERT INTO radiomics_stats VALUES (?, ?, ?, ?, ?, ?)",
                                     stats),
             lambda: insert_rows(con, "radiomics_stats", stats))
        con.close()

    print(f"{'case':<24} {'rows':>6}  {'replaced way':<18} {'old ms':>8} {'new ms':>8} "
          f"{'speed-up':>8}")
    for name, n_rows, old_name, t_old, t_new in rows:
        print(f"{name:<24} {n_rows:>6}  {old_name:<18} {t_old:>8.1f} {t_new:>8.1f} "
              f"{t_old / t_new:>7.1f}x")


if __name__ == "__main__":
    main()
