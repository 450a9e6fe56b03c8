"""The one training loop, shared by ``pretrain`` (round 0) and ``contrast`` (rounds >= 1).

``fit`` runs epochs of an :class:`Objective` over a model, keeps the epoch with the best
validation mean AUC, and writes ``checkpoints/round-K`` at the end. After every epoch it saves
the full training state (model, objective, optimizer, scheduler, scaler, RNG, history, best
weights) to ``checkpoints/round-K.partial/state.pt`` (plain tensors and numbers, loaded with
``torch.load(weights_only=True)``), so a killed run continues from its last finished epoch.

Reproducibility: the sample order is a permutation seeded by (seed, epoch), each item's
augmentation by (seed, epoch, index), and the global torch RNG is re-seeded per epoch; on the
CPU deterministic kernels are requested. Hence a resumed CPU run ends with the same weights
as an uninterrupted one, whatever the number of DataLoader workers.

Validation mean AUC: sklearn ``roc_auc_score`` per finding, averaged over the findings whose
val labels have both classes (a finding with only negatives has no AUC); ties and runs where
no finding qualifies fall back to the lower val loss.

On CUDA: autocast (bf16 where supported, else fp16 with a GradScaler), channels-last memory
format, cudnn autotuning. Under torchrun the model + objective are DDP-wrapped and the train
split is sharded (see :mod:`kacl_cli.training.distributed`); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kacl_cli import progress
from kacl_cli.device import resolve_device
from kacl_cli.errors import KaclError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import IMAGE_PREFIX, OBJECTIVE_PREFIX, preprocess, save_checkpoint
from kacl_cli.models.losses import Objective
from kacl_cli.training import batches, callbacks, distributed
from kacl_cli.training.config import TrainConfig
from kacl_cli.workspace import config_hash

STATE_FILE = "state.pt"
class TrainStep(nn.Module):
    """Model + objective as one module, so one DDP wrapper syncs both sets of gradients."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return self.objective(self.model, batch)


# -- metrics -------------------------------------------------------------------------------
def mean_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[float, dict[str, float]]:
    """Mean ROC AUC over findings with both classes present (NaN when none has)."""
    from sklearn.metrics import roc_auc_score

    per: dict[str, float] = {}
    for j, name in enumerate(FINDINGS[: labels.shape[1]]):
        y = labels[:, j]
        if y.min() != y.max():
            per[name] = float(roc_auc_score(y, probs[:, j]))
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def _score(auc: float, loss: float) -> tuple[float, float]:
    """Sort key of an epoch: higher AUC first, then lower val loss."""
    return (auc if math.isfinite(auc) else -math.inf, -loss if math.isfinite(loss) else -math.inf)


# -- helpers -------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random in a worker from torch's per-worker seed (itself from the base seed)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def partial_dir(ws, round_: int) -> Path:
    return ws.checkpoints / f"round-{round_}.partial"


def _save_partial(directory: Path, state: dict[str, Any]) -> None:
    """Atomically replace the resume state (write a temp file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)


def _load_partial(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file is discarded, never trusted
        progress_note(f"ignoring unreadable resume state {path} ({type(exc).__name__})")
        return None


def progress_note(text: str) -> None:
    """One line on stderr (kept quiet with KACL_NO_PROGRESS, like the bars)."""
    if progress.enabled():
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


def _amp(device: torch.device, cfg: TrainConfig):
    """(autocast context factory, GradScaler or None) for this device."""
    if device.type != "cuda" or not cfg.amp:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


@contextlib.contextmanager
def _determinism(device: torch.device):
    """Deterministic kernels on the CPU; cudnn autotuning (speed over bit-exactness) on CUDA."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, *,
            sampler=None, drop_last: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=drop_last,
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,  # re-created per epoch so workers see set_epoch()
    )


@torch.no_grad()
def evaluate_split(model: nn.Module, objective: Objective, dataset: Dataset, meta: dict,
                   device: torch.device, batch_size: int, workers: int, autocast,
                   channels_last: bool = False, loader: Any = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels n x F, probabilities n x F, mean loss) of a model over a dataset.

    ``loader``: an iterable of batches over ``dataset`` to use instead of a new DataLoader
    (fit passes its persistent :class:`kacl_cli.training.batches.DeviceBatches`).
    """
    model.eval()
    labels, probs, loss_sum, n = [], [], 0.0, 0
    for batch in loader if loader is not None else _loader(dataset, batch_size, workers, device):
        batch = _to_device(batch, device)
        x = preprocess(batch["image"], meta)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch["image"] = x
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss = objective.validation_loss(model, batch, logits)
        loss_sum += float(loss) * len(x)
        n += len(x)
        labels.append(batch["labels"].cpu().numpy())
        probs.append(torch.sigmoid(logits).cpu().numpy())
    if not n:
        return np.zeros((0, len(FINDINGS))), np.zeros((0, len(FINDINGS))), float("nan")
    return np.concatenate(labels), np.concatenate(probs), loss_sum / n


def _write_epoch_row(ws, round_: int, stage: str, row: dict[str, Any]) -> None:
    with ws.catalog.connect() as con:
        con.execute(
            "INSERT OR REPLACE INTO epochs (round, stage, epoch, train_loss, cls_loss, "
            "contrastive_loss, val_loss, val_mean_auc, lr, seconds, images_per_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [round_, stage, row["epoch"], row["train_loss"], row.get("cls_loss"),
             row.get("contrastive_loss"), _finite(row["val_loss"]),
             _finite(row["val_mean_auc"]), row["lr"], row["seconds"], row["images_per_s"]],
        )


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


# -- the loop ------------------------------------------------------------------------------
def fit(
    *,
    ws,
    run,
    stage: str,
    round_: int,
    model: nn.Module,
    objective: Objective,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    meta: dict[str, Any],
    resume: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with ``objective``; write ``checkpoints/round-{round_}``; return a summary.

    ``meta`` is the checkpoint's meta.json (see :func:`kacl_cli.models.checkpoint.model_meta`);
    the loop adds ``metrics``. ``run`` (a StageRun or None) names the run in the meta and keys
    the resume state together with the config, so a changed config never resumes a stale state.
    """
    if len(train_set) == 0:
        raise KaclError("the train split is empty: nothing to train on")
    device = resolve_device(cfg.device)
    ctx = distributed.from_env()
    distributed.setup(ctx, device)
    writes = ws.writes and ctx.is_main
    state_key = config_hash(run.config if run is not None and getattr(run, "config", None)
                            else cfg.hashed())
    pdir = partial_dir(ws, round_)
    if not resume and writes and pdir.exists():
        shutil.rmtree(pdir)
    distributed.barrier(ctx)

    _seed_everything(cfg.seed)
    model.to(device)
    objective.to(device)
    # Channels-last on the CPU too: oneDNN's NHWC kernels trained the tiny net 1.6-1.7x faster
    # at 64 and 128 px, densenet121 1.1-1.2x, resnet18 the same (benchmarks/train_bench.py
    # --memory-format); never slower. Checkpoints are saved contiguous either way.
    channels_last = cfg.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_module = TrainStep(model, objective)
    trained = distributed.wrap(step_module, ctx, device)
    params = [p for p in step_module.parameters() if p.requires_grad]
    # An objective may group the parameters with their own learning rates (contrast's
    # --backbone-lr-scale: `param_groups(model, lr)`); otherwise one group at cfg.lr.
    groups_fn = getattr(objective, "param_groups", None)
    groups = groups_fn(model, cfg.lr) if callable(groups_fn) else params
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    sampler = distributed.train_sampler(train_set, ctx, cfg.seed)
    drop_last = len(sampler) > cfg.batch_size  # BatchNorm needs >1 sample; keep tiny sets whole
    steps_per_epoch = (len(sampler) // cfg.batch_size if drop_last
                       else math.ceil(len(sampler) / cfg.batch_size))
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, int(cfg.warmup_fraction * total_steps))
    )
    autocast, scaler = _amp(device, cfg)

    start_epoch, history, best = 0, [], None
    if resume:
        state = _load_partial(pdir)
        if state is not None and state.get("key") != state_key:
            progress_note(f"{pdir}: resume state is from another config; starting afresh")
            state = None
        if state is not None:
            step_module.load_state_dict(
                {**{f"model.{k}": v for k, v in state["model"].items()},
                 **{f"objective.{k}": v for k, v in state["objective"].items()}}
            )
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            start_epoch = int(state["epoch"])
            history = list(state["history"])
            best = state["best"]
            progress_note(f"{stage} round {round_}: resuming after epoch {start_epoch}")
    if start_epoch == 0 and writes:
        with ws.catalog.connect() as con:
            con.execute("DELETE FROM epochs WHERE round = ?", [round_])

    val_bs = cfg.val_batch_size or cfg.batch_size * 2
    val_part = distributed.shard_dataset(val_set, ctx) if val_set is not None else None
    train_batches = val_batches = None
    if cfg.data_path == "batched":
        train_batches = batches.device_batches(train_set, sampler, cfg.batch_size, device,
                                               cfg.workers, drop_last)
        if val_part is not None:
            val_batches = batches.device_batches(val_part, None, val_bs, device, cfg.workers)
    t_run = time.perf_counter()
    with _determinism(device):
        for epoch in range(start_epoch, cfg.epochs):
            # Every source of randomness restarts from (seed, epoch): resume == no interruption.
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            if train_batches is not None:
                train_batches.set_epoch(epoch)
                loader = train_batches
            else:
                loader = _loader(train_set, cfg.batch_size, cfg.workers, device,
                                 sampler=sampler, drop_last=drop_last,
                                 seed=cfg.seed * 7919 + epoch)
            model.train()
            objective.train()
            sums: dict[str, torch.Tensor] = {}
            n_seen = 0
            t0 = time.perf_counter()
            desc = f"{stage} r{round_} {epoch + 1}/{cfg.epochs}"
            with progress.bar(len(sampler), desc) as pb:
                for step, batch in enumerate(loader):
                    batch = _to_device(batch, device)
                    for key in ("image", "image2"):
                        if key in batch:
                            x = preprocess(batch[key], meta)
                            if channels_last:
                                x = x.contiguous(memory_format=torch.channels_last)
                            batch[key] = x
                    optimizer.zero_grad(set_to_none=True)
                    with autocast():
                        loss, parts = trained(batch)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    bs = len(batch["labels"])
                    n_seen += bs
                    for name, value in {"total": loss, **parts}.items():
                        v = value.detach().float() * bs
                        sums[name] = sums[name] + v if name in sums else v
                    pb.update(bs)
                    if step % 20 == 0 and pb.disable is False:
                        pb.set_postfix(loss=f"{float(loss.detach()):.4f}")
            train_s = time.perf_counter() - t0
            count = distributed.all_reduce_sum(torch.tensor(float(n_seen), device=device), ctx)
            means = {k: float(distributed.all_reduce_sum(v, ctx) / count) for k, v in sums.items()}
            if not all(math.isfinite(v) for v in means.values()):
                raise KaclError(
                    f"{stage} round {round_}: loss is not finite in epoch {epoch + 1} "
                    f"(try a lower --lr)"
                )
            distributed.sync_buffers(step_module, ctx)
            if val_set is not None and len(val_set):
                # Under torchrun each rank scores its slice of val; the predictions are
                # all-gathered, so every rank computes the same AUC and keeps the same epoch.
                y, p, val_loss = evaluate_split(model, objective, val_part, meta, device, val_bs,
                                                cfg.workers, autocast, channels_last,
                                                loader=val_batches)
                y, p, val_loss = distributed.gather_eval(y, p, val_loss, ctx)
                val_auc, per_auc = mean_auc(y, p)
            else:
                val_loss, val_auc, per_auc = float("nan"), float("nan"), {}
            row = {
                "epoch": epoch + 1,
                "train_loss": means["total"],
                "cls_loss": means.get("cls"),
                "contrastive_loss": means.get("contrastive"),
                "val_loss": val_loss,
                "val_mean_auc": val_auc,
                "lr": float(scheduler.get_last_lr()[0]),
                "seconds": time.perf_counter() - t0,
                "images_per_s": float(count) / max(train_s, 1e-9),
            }
            if "box" in means:  # the box term's share (ClassificationObjective.box_term)
                row["box_loss"] = means["box"]
            history.append(row)
            if writes:
                callbacks.epoch_end(stage, round_, row)  # e.g. --tensorboard
            key = _score(val_auc, val_loss) if val_set is not None and len(val_set) else (
                -math.inf, float(epoch))
            if best is None or tuple(key) > tuple(best["key"]):
                best = {"epoch": epoch + 1, "key": list(key), "model": _cpu_state(model),
                        "objective": _cpu_state(objective), "val_auc": per_auc}
            progress_note(
                f"{stage} round {round_} epoch {epoch + 1}/{cfg.epochs}: loss "
                f"{row['train_loss']:.4f} val loss {val_loss:.4f} val AUC {val_auc:.3f} "
                f"({row['images_per_s']:.0f} img/s)"
            )
            if writes:
                _write_epoch_row(ws, round_, stage, row)
                _save_partial(pdir, {
                    "key": state_key,
                    "epoch": epoch + 1,
                    "model": _cpu_state(model),
                    "objective": _cpu_state(objective),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "rng": torch.get_rng_state(),
                    "history": history,
                    "best": best,
                })
            distributed.barrier(ctx)

    assert best is not None
    best_row = history[best["epoch"] - 1]
    metrics = {
        "best_epoch": best["epoch"],
        "val_mean_auc": _finite(best_row["val_mean_auc"]),
        "val_loss": _finite(best_row["val_loss"]),
        "val_auc": best["val_auc"],
        "epochs": cfg.epochs,
        "history": history,
    }
    out_dir = ws.checkpoint_dir(round_)
    if writes:
        tensors = {IMAGE_PREFIX + k: v for k, v in best["model"].items()}
        tensors.update({OBJECTIVE_PREFIX + k: v for k, v in best["objective"].items()})
        save_checkpoint(out_dir, tensors, {
            **meta, "round": round_, "stage": stage, "metrics": metrics,
            "run_id": getattr(run, "run_id", None), "config": cfg.hashed(),
        })
        shutil.rmtree(pdir, ignore_errors=True)
    distributed.barrier(ctx)
    # The caller's model ends as the best epoch's weights (what the checkpoint holds).
    model.load_state_dict(best["model"])
    objective.load_state_dict(best["objective"])
    return {
        "round": round_,
        "stage": stage,
        "epochs": cfg.epochs,
        "best_epoch": best["epoch"],
        "val_mean_auc": metrics["val_mean_auc"],
        "val_loss": metrics["val_loss"],
        "train_loss": history[-1]["train_loss"],
        # the last epoch's box term (--box-loss-weight), when the batches carried boxes
        **({"box_loss": history[-1]["box_loss"]} if "box_loss" in history[-1] else {}),
        "train_images": len(train_set),
        "val_images": len(val_set) if val_set is not None else 0,
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
        # per epoch: the first one carries the start-up (first kernels, optimizer state)
        "epoch_images_per_s": [float(h["images_per_s"]) for h in history],
        "seconds": time.perf_counter() - t_run,
        "checkpoint": str(out_dir),
    }
