"""``kacl study``: the ablation grid as one resumable command, with its two controls.

On any prepared workspace ``WS`` (phantoms or NIH), per training seed::

    WS/study/<name>/seed-S/base/        round 0 (pretrain) + cam --round 0, shared by the cells
    WS/study/<name>/seed-S/<setting>/   one sub-workspace per setting: contrast rounds + eval

Settings (:data:`SETTINGS`): ``none`` (classification only), ``augment`` (SimCLR),
``radiomics`` (the method), ``radiomics-nofeedback``, ``oracle`` (positive control: GT-box
radiomics where an image has a box) and ``shuffled`` (negative control: another image's
radiomics). Every cell starts from its seed's round-0 checkpoint (a paired design).

Sharing, never copying, the images: a sub-workspace's ``store.h5`` is a small HDF5 file whose
``/images`` is an *external link* to ``WS/store.h5`` (and ``/cams/round-0`` to the seed base's
maps), so its own Grad-CAM maps of later rounds land in its own file while the pixels exist
once. ``catalog.duckdb`` (small) is copied from the seed base; ``checkpoints/round-0`` is a
symlink to the base's.

Resumable: a cell is set up in ``<setting>.tmp`` and renamed when complete; its ``cell.json``
says ``done`` (with results) or ``failed`` (with the error). A re-run skips done cells,
re-runs failed ones, and continues unfinished ones through the stages' own resume (finished
rounds skipped, training from its last finished epoch), so ``kill -9`` loses at most an epoch.

The result: per setting and seed the test headline, and paired differences against ``none``
pooled over seeds (:func:`kacl_cli.stages.evaluate.paired.pooled_bootstrap`: test images and
seeds resampled), with the decision rule (:func:`decide`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kacl_cli.errors import InputError, KaclError
from kacl_cli.workspace import Workspace, json_default

SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"positives": "none"},
    "augment": {"positives": "augment"},
    "radiomics": {"positives": "radiomics"},
    "radiomics-nofeedback": {"positives": "radiomics", "feedback": False},
    "oracle": {"positives": "radiomics", "positive_roi": "oracle"},
    "shuffled": {"positives": "radiomics", "shuffle_positives": True},
    # The positive choice (issue 14: defaults chosen by measurement), paired against the same
    # round 0 and the same `none` as the method's default rule above.
    "radiomics-labelled": {"positives": "radiomics", "positive_roi": "labelled"},
    "radiomics-labelled-lung": {"positives": "radiomics", "positive_roi": "labelled",
                                "normal_positive": "lung"},
}
# The grid of the issue; the positive-choice settings run when named in --settings.
DEFAULT_SETTINGS = ("none", "augment", "radiomics", "radiomics-nofeedback", "oracle", "shuffled")
REFERENCE = "none"
SHUFFLED = "shuffled"  # the negative control: also the reference of the knowledge effect
CELL_FILE = "cell.json"
Note = Callable[[str], None]


@dataclass
class StudyConfig:
    """What a study trains; the same config is required to continue a study directory."""

    name: str = "default"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    backbone: str = "tiny"
    pretrain_epochs: int = 8
    pretrain_lr: float = 2e-3
    augment: bool = True  # round 0's augmentation (the rounds inherit it)
    rounds: int = 2
    epochs_per_round: int = 2
    lr: float = 2e-4
    lam: float | None = None
    batch_size: int = 32
    label_fraction: float = 1.0
    positive_roi: str = "predicted"  # of the radiomics settings (oracle has its own)
    normal_positive: str = "skip"
    radiomics_backend: str = "fast"
    radiomics_params: str | None = None  # --radiomics-params of the radiomics cells
    device: str = "cpu"
    workers: int = 0
    n_boot: int = 1000

    def validate(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(SETTINGS)}")
        if REFERENCE not in self.settings:
            raise InputError(f"the settings must include the reference {REFERENCE!r}")
        if not self.seeds:
            raise InputError("--seeds: at least one seed")
        if not 0 < self.label_fraction <= 1:
            raise InputError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.rounds < 1 or self.epochs_per_round < 1 or self.pretrain_epochs < 1:
            raise InputError("--rounds, --epochs-per-round and --pretrain-epochs must be >= 1")

    def identity(self) -> dict[str, Any]:
        """What must match to continue a study (seeds, settings, boot and device may grow
        or change)."""
        d = asdict(self)
        for k in ("seeds", "settings", "device", "workers", "n_boot"):
            d.pop(k)
        params = d.pop("radiomics_params")
        if params is not None:  # absent at the default: earlier studies keep their identity
            from kacl_cli.stages.contrast.config import radiomics_settings_hash

            d["radiomics_params"] = radiomics_settings_hash(params)
        return d


# -- sub-workspaces sharing one store --------------------------------------------------------
def link_store(dest: Path, images_from: Path, cams_round0_from: Path | None = None) -> None:
    """Write ``dest/store.h5`` whose images (and round-0 maps) are links into other stores."""
    import h5py

    dest.mkdir(parents=True, exist_ok=True)
    with h5py.File(dest / "store.h5", "w") as f:
        f["images"] = h5py.ExternalLink(os.path.relpath(images_from, dest), "/images")
        if cams_round0_from is not None:
            f["cams/round-0"] = h5py.ExternalLink(os.path.relpath(cams_round0_from, dest),
                                                  "/cams/round-0")


def copy_catalog(src: Workspace, dest: Path) -> None:
    for suffix in ("", ".wal"):
        p = Path(str(src.catalog.path) + suffix)
        if p.exists():
            shutil.copy2(p, dest / (src.catalog.path.name + suffix))


def _atomic_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")  # processes may share a study dir
    tmp.write_text(json.dumps(doc, indent=2, default=json_default))
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Study:
    """One study directory under a prepared workspace."""

    def __init__(self, ws: Workspace, cfg: StudyConfig, note: Note):
        self.ws, self.cfg, self.note = ws, cfg, note
        self.root = ws.root / "study" / cfg.name

    def check_identity(self) -> None:
        path = self.root / "study.json"
        old = _read_json(path)
        ident = self.cfg.identity()
        if old is not None and old.get("identity") != ident:
            diff = sorted(k for k in ident if old.get("identity", {}).get(k) != ident[k])
            raise InputError(
                f"study {self.cfg.name!r} in {self.root} was started with other settings "
                f"({', '.join(diff)}); use another --name or the same settings")
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_json(path, {"identity": ident})

    # -- round 0 -------------------------------------------------------------------------
    def base(self, seed: int) -> Workspace:
        """The seed's round 0 and its round-0 maps (resumed or skipped by the stages)."""
        from kacl_cli.stages import pretrain
        from kacl_cli.stages.cam.stage import run_cam_stage
        from kacl_cli.training.config import TrainConfig

        d = self.root / f"seed-{seed}" / "base"
        if not (d / "catalog.duckdb").exists():
            tmp = d.with_name("base.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            link_store(tmp, self.ws.store.path)
            copy_catalog(self.ws, tmp)
            tmp.replace(d)
        base = Workspace(d)
        size = base.store.image_size()
        tcfg = TrainConfig(epochs=self.cfg.pretrain_epochs, batch_size=self.cfg.batch_size,
                           lr=self.cfg.pretrain_lr, image_size=size, seed=seed,
                           augment=self.cfg.augment,
                           device=self.cfg.device, workers=self.cfg.workers)
        t0 = time.perf_counter()
        pretrain.run(base, pretrain.PretrainConfig(
            backbone=self.cfg.backbone, init="none", train=tcfg,
            label_fraction=self.cfg.label_fraction), note=self.note)
        run_cam_stage(base, 0, split=None, device=self.cfg.device)
        self.note(f"study seed {seed}: round 0 ready ({time.perf_counter() - t0:.0f} s)")
        return base

    # -- cells ---------------------------------------------------------------------------
    def cell_dir(self, seed: int, setting: str) -> Path:
        return self.root / f"seed-{seed}" / setting

    def cell_state(self, seed: int, setting: str) -> dict[str, Any] | None:
        return _read_json(self.cell_dir(seed, setting) / CELL_FILE)

    def unfinished(self, seed: int) -> list[str]:
        """The seed's settings whose cell is not done (missing, failed or interrupted)."""
        return [s for s in self.cfg.settings
                if (self.cell_state(seed, s) or {}).get("status") != "done"]

    def make_cell(self, base: Workspace, seed: int, setting: str) -> Workspace:
        d = self.cell_dir(seed, setting)
        if not (d / "catalog.duckdb").exists():
            tmp = d.with_name(setting + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            link_store(tmp, self.ws.store.path, base.store.path)
            copy_catalog(base, tmp)
            (tmp / "checkpoints").mkdir()
            os.symlink(os.path.relpath(base.checkpoint_dir(0), tmp / "checkpoints"),
                       tmp / "checkpoints" / "round-0")
            tmp.replace(d)
        return Workspace(d)

    def contrast_config(self, seed: int, setting: str):
        from kacl_cli.stages.contrast.config import ContrastConfig

        c = self.cfg
        extra: dict[str, Any] = dict(SETTINGS[setting])
        if extra.get("positives") == "radiomics":
            extra.setdefault("positive_roi", c.positive_roi)
            extra.setdefault("normal_positive", c.normal_positive)
            extra["radiomics_params"] = c.radiomics_params
        if c.lam is not None:
            extra["lam"] = c.lam
        return ContrastConfig(rounds=c.rounds, epochs_per_round=c.epochs_per_round, lr=c.lr,
                              radiomics_backend=c.radiomics_backend, batch_size=c.batch_size,
                              seed=seed, device=c.device, workers=c.workers,
                              label_fraction=c.label_fraction, **extra)

    def run_cell(self, base: Workspace, seed: int, setting: str) -> dict[str, Any]:
        from kacl_cli.stages.contrast.stage import run_contrast
        from kacl_cli.stages.evaluate.stage import headline

        t0 = time.perf_counter()
        ws = self.make_cell(base, seed, setting)
        res = run_contrast(ws, self.contrast_config(seed, setting), note=lambda _t: None)
        h = headline(ws, self.cfg.rounds, "test")
        last = res["rounds"][-1]
        return {"status": "done", "seconds": round(time.perf_counter() - t0, 1),
                "mean_auc": h.get("mean_auc"), "mean_loc_acc": h.get("mean_loc_acc"),
                "val_mean_auc": last.get("val_mean_auc"),
                "contrastive_loss": last.get("contrastive_loss"),
                "train_with_positive": last.get("train_with_positive")}

    def run(self, fail: Callable[[int, str], None] | None = None,
            jobs: int = 1) -> dict[str, Any]:
        """Run every unfinished cell (seed-major), then the table.

        ``jobs`` > 1: the seeds run in that many child processes at once
        (:meth:`_run_seeds_in_processes`), and this process only prints the table.
        """
        self.cfg.validate()
        self.ws.require()
        self.check_identity()
        t_all = time.perf_counter()
        broken: list[int] = []
        if jobs > 1 and len(self.cfg.seeds) > 1:
            broken = self._run_seeds_in_processes(jobs)
        else:
            self._run_seeds(fail)
        doc = self.table()
        doc["seed_processes_failed"] = broken  # their unfinished cells show as missing
        doc["seconds_this_call"] = round(time.perf_counter() - t_all, 1)
        _atomic_json(self.root / "result.json", doc)
        return doc

    def _run_seeds_in_processes(self, jobs: int) -> list[int]:
        """One child process per seed, ``jobs`` at a time (``python -m kacl_cli.stages.study``).

        Why processes and seeds: a seed's cells depend on its round 0, seeds on nothing, and on
        the CPU two single-threaded trainings side by side beat two two-threaded ones (the
        tiny net at 128 px: 45 against 32 images/s per process, docs/contrast.md). Each child
        gets ``OMP_NUM_THREADS`` = cores // jobs unless the caller set it, writes its log to
        ``seed-S.log``, holds the seed's lock (a second process on the same seed stops with
        "busy") and dies with this process (kill -9 here leaves no orphan training).
        Returns the seeds whose process exited non-zero.
        """
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        env["KACL_NO_PROGRESS"] = "1"
        pending = list(self.cfg.seeds)
        running: dict[int, tuple[subprocess.Popen[bytes], Any]] = {}
        broken: list[int] = []
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    seed = pending.pop(0)
                    spec = self.root / f"seed-{seed}.job.json"
                    _atomic_json(spec, {"workspace": str(self.ws.root),
                                        "config": {**asdict(self.cfg), "seeds": [seed]}})
                    log = open(self.root / f"seed-{seed}.log", "ab")  # noqa: SIM115
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "kacl_cli.stages.study", str(spec)],
                        stdout=log, stderr=subprocess.STDOUT, env=env,
                        preexec_fn=_die_with_parent)
                    running[seed] = (proc, log)
                    self.note(f"study seed {seed}: started in process {proc.pid} "
                              f"(log {self.root / f'seed-{seed}.log'})")
                for seed, (proc, log) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del running[seed]
                    if proc.returncode != 0:
                        broken.append(seed)
                    self.note(f"study seed {seed}: " + ("done" if proc.returncode == 0 else
                              f"exit {proc.returncode}; see seed-{seed}.log"))
                time.sleep(0.5)
            return sorted(broken)
        finally:
            for proc, log in running.values():
                proc.terminate()
                proc.wait()
                log.close()

    def _run_seeds(self, fail: Callable[[int, str], None] | None) -> None:
        """The seeds in this process, each under its own lock (``seed-S/.kacl.lock``): two
        processes on one seed would train the same cells into the same folders."""
        from kacl_cli.lock import workspace_lock

        for seed in self.cfg.seeds:
            seed_dir = self.root / f"seed-{seed}"
            seed_dir.mkdir(parents=True, exist_ok=True)
            with workspace_lock(seed_dir, f"kacl study --name {self.cfg.name} (seed {seed})"):
                self._run_seed(seed, fail)

    def _run_seed(self, seed: int, fail: Callable[[int, str], None] | None) -> None:
        from kacl_cli.stages.evaluate.stage import headline

        todo = self.unfinished(seed)
        r0 = _read_json(self.root / f"seed-{seed}" / "round0.json")
        if not todo and r0:
            return
        try:
            base = self.base(seed)
            if r0 is None:
                h0 = headline(base, 0, "test")
                _atomic_json(self.root / f"seed-{seed}" / "round0.json",
                             {"status": "done", **h0})
        except Exception as exc:  # the whole seed fails; its cells show as failed
            self.note(f"study seed {seed}: round 0 failed: {exc}")
            for s in todo:
                self._record_failure(seed, s, f"round 0: {exc}")
            return
        for setting in todo:
            self.note(f"study seed {seed}: {setting} ...")
            try:
                if fail is not None:
                    fail(seed, setting)  # tests: a simulated failure
                state = self.run_cell(base, seed, setting)
            except Exception as exc:
                self.note(f"study seed {seed}: {setting} FAILED: {exc}")
                self._record_failure(seed, setting, f"{type(exc).__name__}: {exc}",
                                     traceback.format_exc(limit=4))
                continue
            _atomic_json(self.cell_dir(seed, setting) / CELL_FILE, state)
            shutil.rmtree(self.cell_dir(seed, setting).with_name(setting + ".failed"),
                          ignore_errors=True)
            self.note(f"study seed {seed}: {setting} test AUC {state['mean_auc']:.4f} "
                      f"loc {state['mean_loc_acc']:.4f} ({state['seconds']:.0f} s)")

    def _record_failure(self, seed: int, setting: str, error: str, tb: str = "") -> None:
        d = self.cell_dir(seed, setting)
        if not d.exists():
            d = d.with_name(setting + ".failed")
            d.mkdir(parents=True, exist_ok=True)
        _atomic_json(d / CELL_FILE, {"status": "failed", "error": error, "traceback": tb})

    # -- the table -------------------------------------------------------------------------
    def table(self) -> dict[str, Any]:
        from kacl_cli.stages.evaluate.data import load_eval_data
        from kacl_cli.stages.evaluate.linear_probe import mean_auc, probe_eval

        cells: dict[str, dict[int, dict[str, Any]]] = {}
        for setting in self.cfg.settings:
            for seed in self.cfg.seeds:
                st = self.cell_state(seed, setting)
                if st is None:
                    failed = _read_json(self.cell_dir(seed, setting).with_name(
                        setting + ".failed") / CELL_FILE)
                    st = failed or {"status": "missing"}
                cells.setdefault(setting, {})[seed] = st
        round0 = {s: _read_json(self.root / f"seed-{s}" / "round0.json") or {}
                  for s in self.cfg.seeds}
        def loaded(setting: str) -> dict[int, Any]:
            """Test-split eval data of a setting's done cells (each cell read once)."""
            return {s: load_eval_data(Workspace(self.cell_dir(s, setting)), self.cfg.rounds,
                                      "test")
                    for s in self.cfg.seeds
                    if cells.get(setting, {}).get(s, {}).get("status") == "done"}

        def probed(setting: str, data: dict[int, Any]) -> dict[int, Any]:
            """The same cells under the linear probe (evaluate/linear_probe.py; cached)."""
            return {s: probe_eval(Workspace(self.cell_dir(s, setting)), self.cfg.rounds,
                                  self.cfg.label_fraction, device=self.cfg.device, data=d)
                    for s, d in data.items()}

        ref_data = loaded(REFERENCE)
        shuffled_data = loaded(SHUFFLED)
        known = {REFERENCE: (ref_data, probed(REFERENCE, ref_data)),
                 SHUFFLED: (shuffled_data, probed(SHUFFLED, shuffled_data))}
        ref_probe, shuffled_probe = known[REFERENCE][1], known[SHUFFLED][1]
        rows = []
        for setting in self.cfg.settings:
            per = cells[setting]
            done = [s for s in self.cfg.seeds if per[s].get("status") == "done"]
            failed = [s for s in self.cfg.seeds if per[s].get("status") == "failed"]
            row: dict[str, Any] = {
                "setting": setting, "seeds_done": done, "seeds_failed": failed,
                "seeds_missing": [s for s in self.cfg.seeds if s not in done + failed],
                "mean_auc": _mean([per[s].get("mean_auc") for s in done]),
                "mean_loc_acc": _mean([per[s].get("mean_loc_acc") for s in done]),
                "seconds": _mean([per[s].get("seconds") for s in done]),
            }
            if setting in known:
                data, probe = known[setting]
            else:
                data = loaded(setting)
                probe = probed(setting, data)
            row["probe_auc"] = _mean([mean_auc(probe[s]) for s in done])
            both = [s for s in done if s in ref_data]
            complete = not failed and len(both) == len(self.cfg.seeds)
            row["complete"] = complete
            if setting != REFERENCE and both:
                row["vs_none"] = self._versus(data, ref_data, probe, ref_probe, both)
                if setting != SHUFFLED and shuffled_data:
                    # The knowledge effect net of the contrastive term itself: the same
                    # machinery with the image's own radiomics against another image's.
                    paired = [s for s in done if s in shuffled_data]
                    if paired:
                        row["vs_shuffled"] = self._versus(data, shuffled_data, probe,
                                                          shuffled_probe, paired)
            rows.append(row)
        r0_auc = _mean([round0[s].get("mean_auc") for s in self.cfg.seeds])
        r0_loc = _mean([round0[s].get("mean_loc_acc") for s in self.cfg.seeds])
        bases = [self.root / f"seed-{s}" / "base" for s in self.cfg.seeds if round0[s]]
        r0_probe = _mean([mean_auc(probe_eval(Workspace(b), 0, self.cfg.label_fraction,
                                              device=self.cfg.device)) for b in bases])
        doc = {"study": str(self.root), "config": asdict(self.cfg), "rows": rows,
               "round0": {"mean_auc": r0_auc, "mean_loc_acc": r0_loc, "probe_auc": r0_probe},
               "cells": {k: {str(s): v for s, v in d.items()} for k, d in cells.items()}}
        # The paper claims both; each metric gets its own controls and verdict. "decision"
        # (mean AUC) stays the headline for scripts written before the per-metric verdicts.
        doc["decisions"] = {m: decide(doc, m) for m in DECISION_METRICS}
        doc["decision"] = doc["decisions"]["mean_auc"]
        return doc

    def _versus(self, data: dict[int, Any], ref: dict[int, Any], probe: dict[int, Any],
                ref_probe: dict[int, Any], seeds: list[int]) -> dict[str, Any]:
        """Pooled paired differences, the linear probe's mean AUC (``probe_auc``) included."""
        from kacl_cli.stages.evaluate.paired import pair_eval, pooled_bootstrap

        out = pooled_bootstrap([pair_eval(data[s], ref[s]) for s in seeds], self.cfg.n_boot,
                               seed=0)
        out["probe_auc"] = pooled_bootstrap(
            [pair_eval(probe[s], ref_probe[s]) for s in seeds], self.cfg.n_boot,
            seed=0)["mean_auc"]
        return out


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


DECISION_RULE = (
    "per metric (mean test AUC of the model; localization accuracy over T(IoU) 0.1-0.7; mean "
    "test AUC of a linear probe refit on the labelled training images), pooled over seeds: "
    "the benchmark is valid iff oracle - none > 0 with its 95% CI above 0 (it can detect useful "
    "knowledge) and shuffled - none has a CI containing 0 (image-unspecific radiomics do not "
    "fake an effect); only then: radiomics helps if radiomics - none has its CI above 0, hurts "
    "if below, otherwise no detectable effect")
# The paper's two claims, classification and localization, and the probe that tells better
# features from a head that kept up with them (evaluate/linear_probe.py).
DECISION_METRICS = ("mean_auc", "loc_acc", "probe_auc")


def decide(doc: dict[str, Any], metric: str = "mean_auc") -> dict[str, Any]:
    """Apply :data:`DECISION_RULE` to a study document."""
    from kacl_cli.stages.evaluate.paired import excludes_zero

    rows = {r["setting"]: r for r in doc["rows"]}

    def ci(name: str) -> list[float] | None:
        r = rows.get(name)
        if not r or "vs_none" not in r or not r.get("complete"):
            return None
        return r["vs_none"][metric]["ci"]

    out: dict[str, Any] = {"rule": DECISION_RULE, "metric": metric}
    o, s, r = ci("oracle"), ci("shuffled"), ci("radiomics")
    if o is None or s is None:
        out.update(valid=None, verdict="incomplete: oracle and shuffled need every seed done")
        return out
    positive_ok = o[0] > 0
    negative_ok = not excludes_zero(s)
    out.update(positive_control=positive_ok, negative_control=negative_ok,
               valid=positive_ok and negative_ok)
    if not out["valid"]:
        why = [] if positive_ok else ["oracle - none is not above 0"]
        why += [] if negative_ok else ["shuffled - none excludes 0"]
        out["verdict"] = "benchmark NOT valid (" + "; ".join(why) + "): change the benchmark"
    elif r is None:
        out["verdict"] = "valid benchmark; radiomics incomplete"
    elif r[0] > 0:
        out["verdict"] = "valid benchmark: radiomics positives help (CI above 0)"
    elif r[1] < 0:
        out["verdict"] = "valid benchmark: radiomics positives hurt (CI below 0)"
    else:
        out["verdict"] = "valid benchmark: no detectable effect of radiomics positives"
    return out


def run_study(ws: Workspace, cfg: StudyConfig, note: Note, jobs: int = 1) -> dict[str, Any]:
    try:
        return Study(ws, cfg, note).run(jobs=jobs)
    except OSError as exc:
        raise KaclError(f"study: {exc}") from None


def _die_with_parent() -> None:
    """In a study's child process: SIGTERM when the parent dies (Linux ``prctl``), so a killed
    study leaves no training behind to collide with its re-run; elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(spec_path: str) -> int:
    """A seed of ``study --jobs``: the cells of one seed, notes on stderr (its log)."""
    from kacl_cli.errors import KaclError

    spec = json.loads(Path(spec_path).read_text())
    study = Study(Workspace(spec["workspace"]), StudyConfig(**spec["config"]),
                  lambda t: print(t, file=sys.stderr, flush=True))
    try:
        study.cfg.validate()
        study._run_seeds(None)
    except KaclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if any(study.unfinished(seed) for seed in study.cfg.seeds) else 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
