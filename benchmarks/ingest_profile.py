"""Where `prepare`'s time goes on real PNGs, one process: decode, resize, HDF5 write, catalog.

Each part is timed on the same files in one run (the NIH sample's 95 PNGs, repeated to
``--n``), so the shares are comparable whatever the machine's load:

- decode: ``imageio.read_gray`` (PIL open + load + conversion to 8-bit gray);
- resize: ``imageio.resize_square`` to the store size;
- HDF5: ``Store.write_images`` of 256-image chunks (``--compression``: none, the default
  store, or lzf);
- catalog: ``prepare``'s per-chunk transaction, measured as a whole ``prepare`` run with one
  worker minus the parts above (CSV parse, splits, pool start-up, catalog opens, commits).

Run: ``python -m benchmarks.ingest_profile --nih ../shared/nih-sample --size 256``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kacl_cli.imageio import read_gray, resize_square
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nih", type=Path, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compression", default="none", choices=("none", "lzf"))
    args = ap.parse_args()
    os.environ.setdefault("KACL_NO_PROGRESS", "1")
    files = sorted((args.nih / "images").glob("*.png"))
    print(f"ingest_profile: {len(files)} PNGs, store {args.size} px ({args.compression}), load "
          f"{os.getloadavg()[0]:.1f}")
    for r in range(args.repeats):
        t = time.perf_counter()
        decoded = [read_gray(f).pixels for f in files]
        t_decode = time.perf_counter() - t
        t = time.perf_counter()
        small = np.stack([resize_square(p, args.size) for p in decoded])
        t_resize = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            ws = Workspace(Path(tmp) / "h5")
            ws.init()
            t = time.perf_counter()
            for start in range(0, len(small), 256):
                ws.store.write_images(start, small[start:start + 256], args.size,
                                      args.compression)
            t_h5 = time.perf_counter() - t
            ws2 = Workspace(Path(tmp) / "ws")
            t = time.perf_counter()
            ingest.prepare_nih(ws2, args.nih, size=args.size, workers=1,
                               compression=args.compression)
            t_prepare = time.perf_counter() - t
        rest = t_prepare - t_decode - t_resize - t_h5
        parts = {"decode": t_decode, "resize": t_resize, "hdf5": t_h5, "rest": rest}
        share = "  ".join(f"{k} {100 * v / t_prepare:4.0f}%" for k, v in parts.items())
        raw = len(files) / (t_decode + t_resize)
        rate = len(files) / t_prepare
        print(f"run {r + 1}: prepare (1 worker) {rate:6.1f} img/s, raw decode + resize "
              f"{raw:6.1f} img/s, ratio {rate / raw:.2f}; of prepare's time: {share}",
              flush=True)


if __name__ == "__main__":
    main()
