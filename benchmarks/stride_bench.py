"""Cost of the stride-16 backbones against their stride-32 bases (CPU, small input).

    python -m benchmarks.stride_bench [--size 128] [--batch 2] [--repeats 3]

Per backbone: median seconds of one forward and of one forward + backward (training step
without the optimizer) on a random batch, and the Grad-CAM map size. Small sizes only: this
is the relative cost on 2 shared cores, not a throughput figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kacl_cli.models.image_net import build_image_net

PAIRS = (("resnet50", "resnet50-s16"), ("densenet121", "densenet121-s16"))


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 1, args.size, args.size)
    print(f"{args.batch} x {args.size} px, {args.threads} threads, median of {args.repeats}")
    for pair in PAIRS:
        base = None
        for name in pair:
            torch.manual_seed(0)
            model = build_image_net(name)

            def fwd(model=model) -> None:
                model.eval()
                with torch.no_grad():
                    model(x)

            def step(model=model) -> None:
                model.train()
                model.zero_grad()
                model(x).sum().backward()

            f, s = timeit(fwd, args.repeats), timeit(step, args.repeats)
            with torch.no_grad():
                hw = tuple(model.eval().features(x[:1]).shape[-2:])
            ratio = "" if base is None else f"  x{f / base[0]:.2f} fwd, x{s / base[1]:.2f} step"
            base = base or (f, s)
            print(f"{name:16s} map {hw[0]}x{hw[1]}  forward {f:.3f} s  fwd+bwd {s:.3f} s{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
