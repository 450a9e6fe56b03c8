"""Grad-CAM throughput for all 14 findings: one batched forward vs. a per-class loop.

The loop is what the ``grad-cam`` package does for 14 targets: per finding, one forward and one
``backward()`` (parameter gradients included, the package zeroes and recomputes them), with
hooks capturing the target layer's activations and gradients. The batched path is
``kacl_cli.stages.cam.gradcam.batched_gradcam``: one no-grad forward and one einsum
(GAP + linear head).
Both run the same randomly initialised model on the same batch; the table also reports the
largest absolute difference between their maps and the time of the map -> box step.

On a CPU the loop runs only ``--loop-classes`` (3) findings and its time is scaled to 14:
each finding costs it the same forward + backward, and the shared 2-core machine would
otherwise spend minutes per backbone.

Usage: .venv/bin/python -m benchmarks.cam_bench [--backbones resnet18,densenet121]
       [--size 224] [--batch 8] [--device cpu|cuda] [--threads 2] [--repeats 3]
       [--loop-classes 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kacl_cli.device import resolve_device
from kacl_cli.findings import FINDINGS
from kacl_cli.models.image_net import build_image_net
from kacl_cli.stages.cam.gradcam import batched_gradcam, maps_to_boxes


def package_style_loop(model: nn.Module, x: torch.Tensor, classes: range) -> torch.Tensor:
    """Per class: forward, zero_grad, backward; weights = spatial mean of the hooked grads."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        store["act"] = output
        output.register_hook(lambda grad: store.__setitem__("grad", grad))

    handle = model.features.register_forward_hook(keep)
    maps = []
    try:
        for c in classes:
            model.zero_grad(set_to_none=True)
            logits = model(x)
            logits[:, c].sum().backward()
            alpha = store["grad"].mean(dim=(2, 3), keepdim=True)
            maps.append(torch.relu((alpha * store["act"].detach()).sum(dim=1)))
    finally:
        handle.remove()
    return torch.stack(maps, dim=1)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(backbone: str, size: int, batch: int, device: torch.device, repeats: int,
          loop_classes: int) -> dict:
    torch.manual_seed(0)
    model = build_image_net(backbone, n_classes=len(FINDINGS), init="none").to(device).eval()
    x = torch.randn(batch, 1, size, size, device=device)
    batched_gradcam(model, x)  # warm-up (allocator, cuDNN autotune, lazy init)
    t_fast, (_, fast) = _timed(lambda: batched_gradcam(model, x), device, repeats)
    # Every class costs the loop the same forward + backward, so on a shared CPU we time
    # `loop_classes` of them and scale to all 14 (--loop-classes 14 runs them all).
    k = max(1, min(loop_classes, len(FINDINGS)))
    loop_repeats = 1 if device.type == "cpu" else repeats
    package_style_loop(model, x[:1], range(1))  # warm-up of the backward path
    t_part, slow = _timed(lambda: package_style_loop(model, x, range(k)), device, loop_repeats)
    t_loop = t_part * len(FINDINGS) / k
    maps16 = fast.to(torch.float16).cpu().numpy()
    t0 = time.perf_counter()
    maps_to_boxes(maps16.reshape((-1,) + maps16.shape[2:]), 0.5)
    t_boxes = time.perf_counter() - t0
    return {
        "backbone": backbone, "size": size, "batch": batch,
        "map": "x".join(str(v) for v in fast.shape[-2:]),
        "batched_s": t_fast, "loop_s": t_loop, "speedup": t_loop / t_fast,
        "batched_ips": batch / t_fast, "loop_ips": batch / t_loop,
        "boxes_ms_per_img": 1000 * t_boxes / batch,
        "loop_classes": k,
        "max_abs_diff": float((fast[:, :k] - slow).abs().max()),
        "max_map": float(fast.abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet18,densenet121")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the batched path")
    ap.add_argument("--loop-classes", type=int, default=3,
                    help="classes the loop really runs (its time is scaled to 14)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"# cam_bench: {len(FINDINGS)} findings, device {device}, "
          f"{args.threads} CPU threads, torch {torch.__version__}; loop time = "
          f"{min(args.loop_classes, len(FINDINGS))} classes run, scaled to {len(FINDINGS)}; "
          "max|diff| over those classes")
    header = ("backbone", "px", "batch", "map", "batched s", "loop s", "speedup",
              "batched img/s", "loop img/s", "boxes ms/img", "max|diff|", "max map")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for backbone in args.backbones.split(","):
        r = bench(backbone.strip(), args.size, args.batch, device, args.repeats,
                  args.loop_classes)
        print(f"{r['backbone']} | {r['size']} | {r['batch']} | {r['map']} | "
              f"{r['batched_s']:.3f} | {r['loop_s']:.2f} | {r['speedup']:.1f}x | "
              f"{r['batched_ips']:.1f} | {r['loop_ips']:.2f} | {r['boxes_ms_per_img']:.2f} | "
              f"{r['max_abs_diff']:.1e} | {r['max_map']:.1e}", flush=True)


if __name__ == "__main__":
    main()
