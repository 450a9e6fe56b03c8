"""Resolve ``--device auto|cpu|cuda|cuda:N`` into a torch device, with one-line errors.

Every stage that touches a model (pretrain, contrast, cam, predict) goes through here, so a
typo or a missing GPU is reported the same way everywhere instead of as a CUDA traceback.
"""

from __future__ import annotations

import os

import torch

from kacl_cli.errors import KaclError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU.

    Under ``torchrun`` the local rank's GPU is the natural choice for ``auto``/``cuda``
    (env ``LOCAL_RANK``), so every process of a DDP job gets its own device.
    """
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise KaclError(f"--device {spec}: CUDA is not available here (use --device cpu)")
        if text == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        index_s = text.split(":", 1)[1]
        if not index_s.isdigit():
            raise KaclError(f"--device {spec}: expected cuda:N with N a GPU index")
        index = int(index_s)
        if index >= torch.cuda.device_count():
            raise KaclError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return torch.device("cuda", index)
    raise KaclError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
