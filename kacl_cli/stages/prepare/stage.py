"""``prepare``'s engine: an NIH folder (real, or phantoms written in the same layout) -> workspace.

Flow: read and validate the CSVs (nothing is written when they are malformed) -> assign splits
over *all* CSV rows (so a patient's split never depends on what is downloaded) -> decode and
resize the images present, in worker processes, in CSV order -> the main process commits every
chunk: pixels into ``store.h5`` first (written and flushed), then that chunk's ``images``,
``labels`` and ``gt_boxes`` rows in one catalog transaction.

Why that order resumes exactly: a chunk is "done" only once its catalog rows exist, and those
are committed after its pixels. A killed run leaves at most pixels past the catalog's last row;
the re-run skips image ids already in the catalog, starts writing at ``max(row) + 1`` and so
overwrites (and trims) those orphan rows. Same CSV order + same skip set = the same rows as an
uninterrupted run.

Missing vs error: a CSV row whose image file is absent is "missing" (partial downloads are
normal; counted, not an error). A file that exists but cannot be decoded (corrupt, zero-byte,
not an image) is an ``errors`` row with the reason; everything else is still ingested.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kacl_cli.catalog import insert_rows
from kacl_cli.errors import InputError, KaclError, UsageError
from kacl_cli.findings import FINDINGS
from kacl_cli.parallel import process_pool
from kacl_cli.progress import bar
from kacl_cli.sharding.parts import Shard, file_lock, run_part
from kacl_cli.stages.prepare import nih, phantoms
from kacl_cli.stages.prepare.ahead import Feed, Job, pick, positions
from kacl_cli.stages.prepare.nih import Decoded, decode_job
from kacl_cli.stages.prepare.parts import HOOKS, take_items
from kacl_cli.store import DEFAULT_IMAGE_COMPRESSION, IMAGE_COMPRESSIONS, Chunk
from kacl_cli.workspace import StageRun, Workspace, config_hash, stable_json

STAGE = "prepare"
DATASET_KEY = "prepare_dataset"  # meta row: what the workspace's images are (see _claim)
DEFAULT_CHUNK = 256  # images per commit: fewer commits cost less CPU beside the decoders
STORE_BATCH = 32  # decoded images per store write: the last chunk's writes mostly overlap decoding
VAL_FRACTION = 0.1

ChunkHook = Callable[[int, str], None]
"""Test hook: called with (chunk index, "stored" | "committed") after each step of a chunk."""


# -- decoding ------------------------------------------------------------------------------
class Decoders:
    """The decode pool, started in a background thread as soon as prepare knows it will work.

    Starting workers takes a few hundred ms; meanwhile the main process parses the CSVs and
    does its catalog bookkeeping, so on small runs the start-up is not added to the wall time.
    ``ahead``: jobs to start decoding as soon as the pool is up (:mod:`.ahead`).
    """

    def __init__(self, workers: int, ahead: list[Job] | None = None):
        self.workers = workers
        self._pool: Any = None
        self._ahead_jobs = ahead
        self._ahead: Feed | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self._pool = decode_pool(self.workers)
            if self._ahead_jobs:
                size = self._ahead_jobs[0][2]
                self._ahead = self.feed(self._ahead_jobs, ahead_window(self.workers, size))
        except BaseException as exc:  # re-raised in the main thread by get()
            self._error = exc

    def get(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._pool

    def feed(self, jobs: list[Job], window: int | None = None) -> Feed:
        """``jobs`` decoding in the pool, in order (:class:`.ahead.Feed`); ``window``
        results at most in flight (default: 16 per worker)."""
        size = jobs[0][2] if jobs else 0
        return Feed(self._pool, decode_job, jobs, window or self.workers * 16,
                    slot_bytes=size * size + SLOT_MARGIN)

    def take_ahead(self) -> Feed | None:
        """The stream started ahead (once; None when there is none)."""
        self.get()
        feed, self._ahead = self._ahead, None
        return feed

    def close(self) -> None:
        self._thread.join()
        if self._ahead is not None:
            self._ahead.stop()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> Decoders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A chunk may exceed the raw pixels (LZF of noise, HDF5's headers); beyond this it takes the pipe.
SLOT_MARGIN = 4096


def ahead_window(workers: int, size: int) -> int:
    """Results the stream started ahead may hold: enough that the decoders keep going through
    the label parse and the catalog bookkeeping (seconds) rather than stalling after 16 per
    worker, within ~64 MB of decoded pixels."""
    return max(workers * 16, min(256, (64 << 20) // (size * size)))


def _decoded_stream(jobs: list[Job], decoders: Decoders | None) -> Iterator[Decoded]:
    """Decoded images in job order: in-process, or through ``decoders`` (see :func:`decode_pool`),
    from the stream they started ahead when it holds these jobs in this order."""
    ahead = decoders.take_ahead() if decoders is not None else None
    if ahead is not None:
        picks = positions(ahead.jobs, jobs)
        if picks is not None:
            yield from pick(ahead, picks)
            return
        ahead.stop()
    if decoders is None or len(jobs) < 2:
        for job in jobs:
            yield decode_job(job)
        return
    yield from decoders.feed(jobs)


def decode_pool(workers: int) -> Any:
    """The decoders' process pool (:func:`kacl_cli.parallel.process_pool`), preloading only
    the light decode module."""
    return process_pool(workers, preload=("kacl_cli.stages.prepare.nih",))


# -- workspace bookkeeping -----------------------------------------------------------------
DERIVED_TABLES = ("cam_boxes", "rois", "radiomics", "radiomics_stats", "box_supervision",
                  "metrics")

def wipe_images(ws: Workspace) -> None:
    """Remove every prepared image (``--force``): store file and image/label/box rows.

    The whole store goes, not just ``/images``: Grad-CAM maps in it are indexed by row and
    would silently belong to other images afterwards. For the same reason every table derived
    from the images (CAM boxes, ROIs, radiomics, metrics, box supervision) is emptied, so the
    downstream stages recompute instead of skipping on rows of the old data. Checkpoints stay:
    pretrain's data fingerprint decides whether they still fit.
    """
    if ws.store.path.exists():
        ws.store.path.unlink()
    if ws.catalog.path.exists():
        with ws.catalog.connect() as con:
            con.execute("BEGIN")
            for table in ("images", "labels", "gt_boxes") + DERIVED_TABLES:
                con.execute(f"DELETE FROM {table}")
            con.execute("DELETE FROM meta WHERE key = ? OR key LIKE 'cam:%'", [DATASET_KEY])
            con.execute("COMMIT")


def _claim(ws: Workspace, identity: dict[str, Any]) -> None:
    """Record what dataset this workspace holds; refuse to mix two datasets in one store.

    Resuming, or adding images of a growing download, keeps the identity (it excludes the image
    listing and --limit); another folder, size, split or label file needs ``--force``.
    """
    want = stable_json(identity)
    with ws.catalog.connect() as con:
        row = con.execute("SELECT value FROM meta WHERE key = ?", [DATASET_KEY]).fetchone()
        n = con.execute("SELECT count(*) FROM images").fetchone()[0]
        if row is not None and row[0] != want and n > 0:
            have = json.loads(row[0])
            diff = sorted(k for k in set(have) | set(identity) if have.get(k) != identity.get(k))
            raise KaclError(
                f"workspace {ws.root} already holds {n} images prepared with other settings "
                f"({', '.join(diff)} differ); use --force to rebuild it, or another --workspace"
            )
        if row is None and n > 0:
            raise KaclError(f"workspace {ws.root} holds {n} images of unknown origin; "
                            "use --force to rebuild it, or another --workspace")
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [DATASET_KEY, want])


def dataset_fingerprint(ws: Workspace) -> str:
    """A short hash of what ``prepare`` put in this workspace (settings + image count).

    For downstream stages' input fingerprints: it changes when the data is rebuilt (``--force``)
    or grows, so their finished runs are then no longer skipped.
    """
    rows = ws.catalog.query("SELECT value FROM meta WHERE key = ?", [DATASET_KEY])
    n = ws.catalog.count("images")
    return hashlib.sha256(f"{rows[0][0] if rows else ''}|{n}".encode()).hexdigest()[:16]


def _commit_rows(ws: Workspace, images: list[tuple], labels: list[tuple],
                 boxes: list[tuple]) -> None:
    """One transaction per chunk: a chunk is either fully in the catalog or not at all."""
    with ws.catalog.connect() as con:
        con.execute("BEGIN")
        for table, rows in (("images", images), ("labels", labels), ("gt_boxes", boxes)):
            insert_rows(con, table, rows)
        con.execute("COMMIT")


# -- the ingest ----------------------------------------------------------------------------
def ingest_release(
    ws: Workspace,
    release: nih.NihRelease,
    run: StageRun,
    *,
    size: int,
    split: str = "official",
    seed: int = 0,
    limit: int | None = None,
    decoders: Decoders | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: ChunkHook | None = None,
    shard: Shard | None = None,
    compression: str | None = None,
) -> dict[str, Any]:
    """Ingest the images of ``release`` present on disk into ``ws`` (resumable; see module).

    ``decoders``: a started worker pool, or None to decode in this process.
    ``compression``: of a new store's images (default ``store.DEFAULT_IMAGE_COMPRESSION``);
    an existing store keeps its own, and asking for another is refused.
    ``shard``: only that shard's images (:mod:`kacl_cli.stages.prepare.parts`; ``ws`` is then
    its part).
    """
    t0 = time.perf_counter()
    if split == "official" and not release.has_official_split:
        raise InputError(
            f"{release.root}: no train_val_list.txt/test_list.txt for the official split; "
            "add them or use --split random"
        )
    table = release.labels
    index = table.index
    present_rows = sorted(index[name] for name in release.images if name in index)
    missing = len(table) - len(present_rows)
    unlisted = len(release.images) - len(present_rows)  # ids are unique: the rest is unlisted
    over_limit = 0
    if limit is not None and len(present_rows) > limit:
        over_limit = len(present_rows) - limit
        present_rows = present_rows[:limit]
    present = table.entries(present_rows)
    # Splits over all CSV rows, computed for the patients ingested (see nih.patient_splits).
    test_patients = (table.patients_of(release.test)
                     if split == "official" and release.test is not None else None)
    splits = nih.patient_splits(table.patient_ids, split, seed, test_patients=test_patients,
                                val_fraction=VAL_FRACTION,
                                only={e.patient_id for e in present})
    if shard is not None:  # one slice of what an unsharded run ingests; splits stay global
        if shard.index >= len(present):  # the count is known only now, after the survey
            raise UsageError(f"--shard {shard.label}: shard {shard.index} of {len(present)} "
                             "images would be empty (n at most the number of images)")
        present = take_items(ws, present, shard)

    with ws.catalog.connect(read_only=True) as con:
        done = {r[0] for r in con.execute("SELECT image_id FROM images").fetchall()}
        max_row = con.execute("SELECT max(row) FROM images").fetchone()[0]
    ws.catalog.release()  # the catalog stays readable by others while the images decode
    next_row = 0 if max_row is None else int(max_row) + 1
    stored = ws.store.n_rows()
    if stored < next_row:
        raise KaclError(f"store {ws.store.path} has {stored} images but the catalog expects "
                        f"{next_row}; run `kacl prepare --force` to rebuild")
    if stored > next_row:  # orphan pixels of a killed run: trim them now
        if next_row == 0:
            ws.store.path.unlink()  # nothing committed (maybe even another --size): start over
        else:
            ws.store.write_images(next_row, np.empty((0, size, size), np.uint8), size)
    compression = store_compression(ws, compression)

    todo = [e for e in present if e.image_id not in done]
    already = len(present) - len(todo)
    jobs: list[Job] = [(i, str(release.images[e.image_id]), size, compression)
                       for i, e in enumerate(todo)]
    ingested = failed = 0
    chunk_index = 0
    buf: list[tuple[nih.Entry, Decoded]] = []
    unstored: list[Chunk] = []  # encoded pixels of this chunk not in the store yet
    n_stored = 0  # pixels of this chunk already in it

    def store() -> None:
        """Write the chunk's pending pixels (a few at a time, while the next ones decode:
        not all at its commit, after the last decode)."""
        nonlocal n_stored
        if unstored:
            _store_images(ws, next_row + n_stored, unstored, size, compression, next_row)
            n_stored += len(unstored)
            unstored.clear()

    def commit(last: bool) -> None:
        nonlocal next_row, ingested, failed, chunk_index, n_stored
        good = [(e, d) for e, d in buf if d.chunk is not None]
        bad = [(e.image_id, d.reason or "unreadable") for e, d in buf if d.chunk is None]
        if good:
            store()
            if on_chunk:
                on_chunk(chunk_index, "stored")
            img_rows, lab_rows, box_rows = [], [], []
            box_errors: list[tuple[str | None, str]] = []
            for k, (e, d) in enumerate(good):
                img_rows.append(_image_row(e, d, next_row + k, splits[e.patient_id],
                                           str(release.images[e.image_id])))
                has = set(e.findings)
                lab_rows.append((e.image_id, *[f in has for f in FINDINGS], not has))
                kept, refused = nih.check_boxes(release.boxes.get(e.image_id, ()), d.width,
                                                d.height, e.findings)
                box_rows += [(e.image_id, b.finding, b.x, b.y, b.w, b.h) for b in kept]
                box_errors += [(f"{e.image_id} box {b.finding}", why) for b, why in refused]
            _commit_rows(ws, img_rows, lab_rows, box_rows)
            run.errors(box_errors)  # the images stay; only their bad boxes are left out
            if on_chunk:
                on_chunk(chunk_index, "committed")
        run.errors(bad)
        if not last:  # let go of the catalog while the next chunk decodes
            ws.catalog.release()
        next_row += len(good)
        ingested += len(good)
        failed += len(bad)
        chunk_index += 1
        n_stored = 0
        buf.clear()

    with bar(len(todo), "prepare") as pb:
        for d in _decoded_stream(jobs, decoders):
            buf.append((todo[d.index], d))
            pb.update(1)
            if d.chunk is not None:
                unstored.append(d.chunk)
                if len(unstored) >= STORE_BATCH:
                    store()
            if len(buf) >= chunk_size:
                commit(last=d.index == len(todo) - 1)
        if buf:
            commit(last=True)

    seconds = time.perf_counter() - t0
    with ws.catalog.connect(read_only=True) as con:
        counts = dict(con.execute("SELECT split, count(*) FROM images GROUP BY split").fetchall())
        n_boxes, n_box_images = con.execute(
            "SELECT count(*), count(DISTINCT image_id) FROM gt_boxes").fetchone()
    return {
        "source": str(release.root),
        "labels_file": release.labels_file.name,
        "size": size,
        "compression": compression,
        "split": split,
        "csv_rows": len(release.labels),
        "missing": missing,
        "unlisted": unlisted,
        "over_limit": over_limit,
        "ingested": ingested,
        "skipped_existing": already,
        "failed": failed,
        "images": int(sum(counts.values())),
        "train": int(counts.get("train", 0)),
        "val": int(counts.get("val", 0)),
        "test": int(counts.get("test", 0)),
        "gt_boxes": int(n_boxes),
        "images_with_boxes": int(n_box_images),
        "seconds": round(seconds, 2),
        "images_per_s": round(ingested / seconds, 1) if seconds > 0 else None,
    }


def store_compression(ws: Workspace, asked: str | None) -> str:
    """The image compression this ingest writes: the store's own when it has images, else
    ``asked`` (or the default). Asking an existing store for another is a one-line error:
    mixed chunks would be read as garbage."""
    have = ws.store.images_compression()
    if have is not None and asked is not None and asked != have:
        raise InputError(f"the store's images are compressed with {have!r}, not {asked!r}; "
                         f"leave out --compression or rebuild with --force")
    return have or asked or DEFAULT_IMAGE_COMPRESSION


def _store_images(ws: Workspace, row: int, chunks: list[Chunk], size: int, compression: str,
                  committed: int) -> None:
    """``Store.write_chunks``, with a full disk said in one line."""
    try:
        ws.store.write_chunks(row, chunks, size, compression)
    except OSError as exc:
        if not _disk_full(exc):
            raise
        raise KaclError(f"disk full while writing {ws.store.path.name} ({committed} "
                        "images committed; free space and re-run to resume)") from None


def _disk_full(exc: OSError) -> bool:
    """ENOSPC, also where h5py only names it in the message (its errno is often None)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)


def _image_row(e: nih.Entry, d: Decoded, row: int, split: str, path: str) -> tuple:
    """The ``images`` row; pixel spacing is converted to the decoded image's pixels.

    The CSV's spacing is per pixel of the *scanner's* image (OriginalImage[Width,Height], e.g.
    2500 x 2048); the released PNG was resized to 1024, so one PNG pixel is wider by
    csv_width / png_width. Unknown when the CSV lacks the size.
    """
    sx = sy = None
    if e.spacing_x is not None and e.csv_width:
        sx = e.spacing_x * e.csv_width / d.width
    if e.spacing_y is not None and e.csv_height:
        sy = e.spacing_y * e.csv_height / d.height
    return (e.image_id, row, e.patient_id, split, e.follow_up, e.view_position, e.age, e.sex,
            d.width, d.height, sx, sy, os.path.abspath(path))


def _checked(run: StageRun, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's summary; an exit-1 failure when the workspace ends up with no images."""
    summary["errors"] = run.n_errors
    if summary["images"] == 0:
        why = ("none of the images could be read (see the errors table)" if summary["failed"]
               else f"none of the {summary['csv_rows']} images listed in "
                    f"{summary['labels_file']} were found under {summary['source']}"
                    "/images or images_0NN/images")
        raise KaclError(f"nothing ingested: {why}")
    return summary


def _fingerprint(inputs: nih.Inputs) -> str:
    names = hashlib.sha256("\n".join(sorted(inputs.images)).encode()).hexdigest()[:16]
    return config_hash({"files": inputs.file_hashes, "n_images": len(inputs.images),
                        "names": names})


def prepare_nih(
    ws: Workspace,
    nih_dir: Path,
    *,
    size: int = 256,
    limit: int | None = None,
    workers: int = 1,
    split: str = "official",
    seed: int = 0,
    force: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: ChunkHook | None = None,
    shard: Shard | None = None,
    compression: str | None = None,
) -> dict[str, Any]:
    """``kacl prepare --nih-dir``: returns the summary (``skipped: True`` when already done).

    With ``shard``, only that shard's images, into a part of its own (``--force`` restarts
    the part); ``kacl merge`` folds the parts in (:mod:`kacl_cli.stages.prepare.parts`).
    """
    _check_size(size)
    _check_compression(compression)
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    whole = functools.partial(_nih_whole, nih_dir=nih_dir, size=size, limit=limit,
                              workers=workers, split=split, seed=seed, chunk_size=chunk_size,
                              on_chunk=on_chunk, shard=shard, compression=compression)
    if shard is not None:
        return run_part(ws, HOOKS, None, shard, functools.partial(whole, force=False),
                        force=force)
    return whole(ws, force=force)


def _nih_whole(ws: Workspace, *, nih_dir: Path, size: int, limit: int | None, workers: int,
               split: str, seed: int, force: bool, chunk_size: int,
               on_chunk: ChunkHook | None, shard: Shard | None,
               compression: str | None) -> dict[str, Any]:
    """``prepare --nih-dir`` on ``ws`` (the workspace, or a shard's part)."""
    root = Path(nih_dir).resolve()
    inputs = nih.survey(root)
    config = {"source": "nih", "nih_dir": str(root), "size": size, "split": split,
              "seed": seed, "limit": limit, "val_fraction": VAL_FRACTION}
    fingerprint = _fingerprint(inputs)
    if not force and ws.exists():  # skip before parsing 112k CSV rows
        done = ws.find_done(STAGE, None, config_hash(config), fingerprint)
        if done is not None:
            return {**done, "skipped": True}
    # A fresh (or --force) unsharded run ingests every listed image, in name order: start
    # decoding them now (see ahead.py). Not when resuming: most would be decoded for nothing.
    # With --limit, only the first names (and a margin for files the label file lacks).
    fresh = workers > 1 and shard is None and (force or not ws.exists())
    names = sorted(inputs.images)[: None if limit is None else limit + 64] if fresh else []
    # A fresh store is created with what was asked (--force wipes the old one first).
    new = compression or DEFAULT_IMAGE_COMPRESSION
    ahead = [(k, str(inputs.images[name]), size, new) for k, name in enumerate(names)] or None
    with _decoders(workers, ahead) as decoders:  # starts while the CSVs are parsed
        release = nih.read_release(inputs)  # validates the CSVs before anything is written
        identity = {k: config[k] for k in ("source", "nih_dir", "size", "split", "seed")}
        identity["labels"] = inputs.file_hashes
        return _run(ws, config, fingerprint, identity, force, lambda run: ingest_release(
            ws, release, run, size=size, split=split, seed=seed, limit=limit,
            decoders=decoders, chunk_size=chunk_size, on_chunk=on_chunk, shard=shard,
            compression=compression))


def _decoders(workers: int, ahead: list[Job] | None = None
              ) -> Decoders | contextlib.nullcontext:
    return Decoders(workers, ahead) if workers > 1 else contextlib.nullcontext()


def prepare_synthetic(
    ws: Workspace,
    n: int,
    size: int = 256,
    seed: int = 0,
    difficulty: float = phantoms.DEFAULT_DIFFICULTY,
    *,
    enrich: float = 0.0,
    workers: int = 1,
    force: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: ChunkHook | None = None,
    shard: Shard | None = None,
    phantom_root: Path | None = None,
    generator: int = 1,
    label_noise: float = 0.0,
    compression: str | None = None,
) -> dict[str, Any]:
    """``kacl prepare --synthetic N``: phantoms written as an NIH folder under ``WS/phantoms``
    (or ``phantom_root``), then ingested by the very same code as real data. Returns the
    summary.

    With ``shard``, only that shard's images, into a part of its own (``--force`` restarts
    the part). Shards share the workspace's phantom folder: the first to arrive generates it
    under a file lock, the others wait and reuse it.
    """
    _check_size(size)
    if n < 1:
        raise InputError("--synthetic needs at least 1 image")
    if not 0.0 <= difficulty <= 1.0:
        raise InputError(f"--difficulty must be in [0, 1], got {difficulty}")
    if not 0.0 <= enrich <= 1.0:
        raise InputError(f"--enrich must be in [0, 1], got {enrich}")
    if generator not in phantoms.GENERATOR_VERSIONS:
        raise InputError(f"--generator must be one of {sorted(phantoms.GENERATOR_VERSIONS)}, "
                         f"got {generator}")
    if not 0.0 <= label_noise <= 0.5:
        raise InputError(f"--label-noise must be in [0, 0.5], got {label_noise}")
    _check_compression(compression)
    whole = functools.partial(_synthetic_whole, n=n, size=size, seed=seed,
                              difficulty=difficulty, enrich=enrich, workers=workers,
                              chunk_size=chunk_size, on_chunk=on_chunk, shard=shard,
                              root=phantom_root or ws.root / "phantoms", generator=generator,
                              label_noise=label_noise, compression=compression)
    if shard is not None:
        return run_part(ws, HOOKS, None, shard, functools.partial(whole, force=False),
                        force=force)
    return whole(ws, force=force)


def _synthetic_whole(ws: Workspace, *, n: int, size: int, seed: int, difficulty: float,
                     enrich: float, workers: int, force: bool, chunk_size: int,
                     on_chunk: ChunkHook | None, shard: Shard | None, root: Path,
                     generator: int, label_noise: float,
                     compression: str | None) -> dict[str, Any]:
    """``prepare --synthetic`` on ``ws`` (the workspace, or a shard's part)."""
    config = {"source": "synthetic", "n": n, "size": size, "seed": seed,
              "difficulty": difficulty, "enrich": enrich,
              "generator": phantoms.GENERATOR_VERSIONS[generator], "val_fraction": VAL_FRACTION}
    if label_noise > 0:  # only when asked: older workspaces keep their config hash
        config["label_noise"] = label_noise

    def work(run: StageRun) -> dict[str, Any]:
        expect = {k: config[k] for k in ("n", "size", "seed", "difficulty", "enrich",
                                         "generator")}
        generated, t0 = 0, time.perf_counter()
        ws.catalog.release()  # generating takes minutes: leave the catalog to others
        with file_lock(root.with_name(root.name + ".lock")):
            if force or not phantoms.release_is_complete(root, expect):
                if root.exists():
                    shutil.rmtree(root)
                with bar(n, "phantoms") as pb:
                    phantoms.write_release(root, n, size, seed, difficulty, enrich, workers,
                                           progress=pb.update, version=generator)
                generated = n
        gen_seconds = round(time.perf_counter() - t0, 2)
        with _decoders(workers) as decoders:
            release = nih.read_release(root)
            summary = ingest_release(ws, release, run, size=size, split="official",
                                     seed=seed, decoders=decoders, chunk_size=chunk_size,
                                     on_chunk=on_chunk, shard=shard, compression=compression)
        summary.update(source="synthetic", phantom_dir=str(root), generated=generated,
                       generate_seconds=gen_seconds, difficulty=difficulty, enrich=enrich,
                       seed=seed, generator=config["generator"])
        if label_noise > 0 and shard is None:
            from kacl_cli.stages.contrast.weak import apply_label_noise

            summary.update(label_noise=label_noise, **apply_label_noise(ws, label_noise, seed))
        return summary

    return _run(ws, config, str(config["generator"]), dict(config), force, work)


def _check_compression(compression: str | None) -> None:
    if compression is not None and compression not in IMAGE_COMPRESSIONS:
        raise InputError(f"--compression must be one of {', '.join(IMAGE_COMPRESSIONS)}, "
                         f"got {compression!r}")


def _check_size(size: int) -> None:
    if not 16 <= size <= 4096:
        raise InputError(f"--size must be between 16 and 4096 pixels, got {size}")


def _run(ws: Workspace, config: dict[str, Any], fingerprint: str, identity: dict[str, Any],
         force: bool, work: Callable[[StageRun], dict[str, Any]]) -> dict[str, Any]:
    # One catalog connection for the bookkeeping before and after the images (each open costs
    # ~40 ms); ingest_release lets go of it while it decodes and between chunk commits.
    with ws.catalog.session():
        ws.init()
        with ws.stage_run(STAGE, config, fingerprint, force=force) as run:
            if run.skipped:
                return run.result()
            if force:
                wipe_images(ws)
            _claim(ws, identity)
            run.summary = _checked(run, work(run))
    return run.result()
