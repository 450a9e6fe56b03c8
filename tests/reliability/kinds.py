# ruff: noqa: E501  (the matrix reads best as one kind per line)
"""The bad inputs of the reliability matrix (issue 15): one :class:`Kind` per way to misuse kacl.

Each kind builds its input in a scratch folder and names the command line to run, the exit
code wanted and a piece of the one stderr line. ``test_matrix.py`` runs them through the real
CLI; ``docs/reliability.md`` lists them.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class Env:
    """Where a kind works: ``ws`` (a copy of the base workspace, or a fresh path for prepare
    kinds), ``release`` (a copy of the NIH-layout phantom folder), ``tmp`` (scratch)."""

    ws: Path
    release: Path
    tmp: Path
    monkeypatch: object = None


@dataclass
class Kind:
    name: str
    base: str  # "full": prepared + pretrained + cam + radiomics; "release": prepare kinds
    build: Callable[[Env], list[str]]  # -> the argv after `kacl`
    code: int
    says: str  # a piece of the one stderr line ("" = no stderr wanted, exit 0)
    changes: frozenset[str] = field(default_factory=frozenset)  # tables allowed to change
    bad_ids: tuple[str, ...] = ()  # prepare kinds: images that may be left out
    holds: bool = False  # already held before issue 15
    logged: str = ""  # a piece of the reason of an `errors` row the run must have written

    @property
    def command(self) -> str:
        return self.name.split("-")[0]


# -- files -----------------------------------------------------------------------------------
def png(path: Path, arr: np.ndarray | None = None, mode: str | None = None) -> Path:
    if arr is None:
        yy, xx = np.mgrid[0:64, 0:64]
        arr = (127 + 120 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    im.save(path)
    return path


def dicom(path: Path, window_width: float | None = None, pixels: bool = True,
          photometric: str = "MONOCHROME2") -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = 48, 40
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if window_width is not None:
        ds.WindowCenter = 100
        ds.WindowWidth = window_width
    if pixels:
        ds.PixelData = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) % 4000).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def checkpoint_copy(env: Env, **meta_changes: object) -> Path:
    """A copy of the workspace's round-0 checkpoint with crafted meta.json values."""
    dest = env.tmp / "ckpt"
    shutil.copytree(env.ws / "checkpoints" / "round-0", dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta.update(meta_changes)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def pickled_checkpoint(env: Env) -> Path:
    dest = env.tmp / "pickled"
    shutil.copytree(env.ws / "checkpoints" / "round-0", dest)
    torch.save({"w": torch.zeros(2)}, dest / "model.safetensors")  # a pickle, not safetensors
    return dest


def params(env: Env, text: str) -> str:
    return str(write(env.tmp / "params.yaml", text))


# -- the release (NIH layout) ----------------------------------------------------------------
LABELS = "Data_Entry_2017_v2020.csv"
BOXES = "BBox_List_2017.csv"


def label_lines(env: Env) -> list[str]:
    return (env.release / LABELS).read_text().splitlines(keepends=True)


def edit_label_row(env: Env, k: int, column: int, value: str) -> str:
    """Set column ``column`` of data row ``k`` (0-based after the header); its image id."""
    lines = label_lines(env)
    cells = lines[k + 1].rstrip("\n").split(",")
    cells[column] = value
    lines[k + 1] = ",".join(cells) + "\n"
    (env.release / LABELS).write_text("".join(lines))
    return cells[0]


def short_row(env: Env) -> list[str]:
    """Data row 3 loses its last four columns."""
    lines = label_lines(env)
    lines[3] = ",".join(lines[3].split(",")[:7]) + "\n"
    (env.release / LABELS).write_text("".join(lines))
    return prepare_nih(env)


def first_image(env: Env, labelled: str | None = None) -> str:
    """An image id of the release (with finding ``labelled`` when given)."""
    for line in label_lines(env)[1:]:
        cells = line.split(",")
        if labelled is None or labelled in cells[1].split("|"):
            return cells[0]
    raise AssertionError(f"no image labelled {labelled}")


def add_box(env: Env, image_id: str, finding: str, x: str, y: str, w: str, h: str) -> None:
    with open(env.release / BOXES, "a") as f:
        f.write(f"{image_id},{finding},{x},{y},{w},{h}\n")


def replace_image(env: Env, make: Callable[[Path], object]) -> list[str]:
    image_id = first_image(env)
    path = env.release / "images" / image_id
    path.unlink()
    make(path)
    return prepare_nih(env)


def prepare_nih(env: Env) -> list[str]:
    return ["prepare", "--nih-dir", str(env.release), "--size", "64", "--workers", "1",
            "-w", str(env.ws)]


def fill_disk(env: Env) -> list[str]:
    from kacl_cli.store import Store

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    env.monkeypatch.setattr(Store, "write_images", full)  # type: ignore[attr-defined]
    env.monkeypatch.setattr(Store, "write_chunks", full)  # type: ignore[attr-defined]
    return prepare_nih(env)


def read_only_lock(env: Env, args: list[str]) -> list[str]:
    """The workspace's file system is read-only (root ignores chmod, so the OS call fails)."""
    import kacl_cli.lock as lock

    real = lock.os.open

    def refuse(path, flags, *a):
        if str(path).endswith(lock.LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a)

    env.monkeypatch.setattr(lock.os, "open", refuse)  # type: ignore[attr-defined]
    return args


def read_only_catalog(env: Env) -> list[str]:
    """DuckDB cannot open the catalog for writing: a read-only file system, not a busy one."""
    import types

    import duckdb

    import kacl_cli.catalog as catalog

    def connect(path, read_only=False):
        raise duckdb.IOException(f'IO Error: Cannot open file "{path}": Read-only file system')

    fake = types.SimpleNamespace(connect=connect, IOException=duckdb.IOException)
    env.monkeypatch.setattr(catalog, "duckdb", fake)  # type: ignore[attr-defined]
    return prepare_nih(env)


def dollar_id(env: Env) -> list[str]:
    """Rename a test image with a GT box to an id holding matplotlib math."""
    import duckdb

    con = duckdb.connect(str(env.ws / "catalog.duckdb"))
    old = con.execute("SELECT g.image_id FROM gt_boxes g JOIN images i USING (image_id) "
                      "WHERE i.split = 'test' LIMIT 1").fetchone()[0]
    new = "$\\frac{1}{0}^$_000.png"
    for table in ("images", "labels", "gt_boxes", "cam_boxes", "rois", "radiomics"):
        con.execute(f"UPDATE {table} SET image_id = ? WHERE image_id = ?", [new, old])
    con.close()
    return ["evaluate", "--round", "0", "--bootstrap", "5", "--overlays", "40", "--device",
            "cpu", "-w", str(env.ws)]


def w(env: Env, *args: str) -> list[str]:
    return [*args, "-w", str(env.ws)]


def K(name: str, base: str, build: Callable[[Env], list[str]], code: int, says: str,
      **kw: object) -> Kind:
    return Kind(name, base, build, code, says, **kw)  # type: ignore[arg-type]


RAD = frozenset({"radiomics", "rois"})
EVAL = frozenset({"metrics"})

KINDS: list[Kind] = [
    # -- predict (read-only) ----------------------------------------------------------------
    K("predict-corrupt", "full", lambda e: w(e, "predict", str(write(e.tmp / "c.png", b"\x89PNG garbage"))), 1, "unreadable image", holds=True),
    K("predict-zero-byte", "full", lambda e: w(e, "predict", str(write(e.tmp / "z.png", b""))), 1, "zero-byte", holds=True),
    K("predict-missing-file", "full", lambda e: w(e, "predict", str(e.tmp / "nope.png")), 1, "no such file", holds=True),
    K("predict-directory", "full", lambda e: w(e, "predict", str(e.tmp)), 1, "is a directory", holds=True),
    K("predict-text-file", "full", lambda e: w(e, "predict", str(write(e.tmp / "t.png", "hello"))), 1, "unreadable image", holds=True),
    K("predict-markup-name", "full", lambda e: w(e, "predict", str(e.tmp / "x[/]y.png")), 1, "x[/]y.png: no such file"),
    K("predict-bracket-name", "full", lambda e: w(e, "predict", str(write(e.tmp / "scan[b]2.png", b"bad"))), 1, "scan[b]2.png"),
    K("predict-pixel-cap", "full", lambda e: w(e, "predict", "--max-pixels", "100", str(png(e.tmp / "ok.png"))), 1, "pixel cap"),
    K("predict-huge-png", "full", lambda e: w(e, "predict", str(png(e.tmp / "huge.png", np.zeros((8000, 8000), np.uint8)))), 1, "pixel cap"),
    K("predict-dicom-window-0", "full", lambda e: w(e, "predict", str(dicom(e.tmp / "w0.dcm", window_width=0))), 1, "w0.dcm"),
    K("predict-dicom-no-pixels", "full", lambda e: w(e, "predict", str(dicom(e.tmp / "np.dcm", pixels=False))), 1, "unreadable DICOM", holds=True),
    K("predict-dicom-monochrome1", "full", lambda e: w(e, "predict", str(dicom(e.tmp / "m1.dcm", photometric="MONOCHROME1"))), 0, "", holds=True),
    K("predict-dicom-window", "full", lambda e: w(e, "predict", str(dicom(e.tmp / "ww.dcm", window_width=400))), 0, "", holds=True),
    K("predict-rgba", "full", lambda e: w(e, "predict", str(png(e.tmp / "a.png", mode="RGBA"))), 0, "", holds=True),
    K("predict-16bit", "full", lambda e: w(e, "predict", str(png(e.tmp / "s.png", (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)))), 0, "", holds=True),
    K("predict-cmyk", "full", lambda e: w(e, "predict", str(png(e.tmp / "c.jpg", mode="CMYK"))), 0, "", holds=True),
    K("predict-palette", "full", lambda e: w(e, "predict", str(png(e.tmp / "p.png", mode="P"))), 0, "", holds=True),
    K("predict-one-bad-of-three", "full", lambda e: w(e, "predict", str(png(e.tmp / "g1.png")), str(dicom(e.tmp / "bad.dcm", window_width=0)), str(png(e.tmp / "g2.png"))), 1, "bad.dcm"),
    K("predict-overlay-is-file", "full", lambda e: w(e, "predict", "--overlay", str(write(e.tmp / "f", "x")), str(png(e.tmp / "ok.png"))), 2, "--overlay"),
    K("predict-threshold-nan", "full", lambda e: w(e, "predict", "--threshold", "nan", str(png(e.tmp / "ok.png"))), 2, "--threshold"),
    K("predict-round-and-checkpoint", "full", lambda e: w(e, "predict", "--round", "0", "--checkpoint", str(e.tmp), str(png(e.tmp / "ok.png"))), 2, "not both", holds=True),
    K("predict-pickled-checkpoint", "full", lambda e: w(e, "predict", "--checkpoint", str(pickled_checkpoint(e)), str(png(e.tmp / "ok.png"))), 1, "unreadable tensors", holds=True),
    K("predict-meta-in-chans-abc", "full", lambda e: w(e, "predict", "--checkpoint", str(checkpoint_copy(e, in_chans="abc")), str(png(e.tmp / "ok.png"))), 1, "in_chans"),
    K("predict-meta-normalisation-x", "full", lambda e: w(e, "predict", "--checkpoint", str(checkpoint_copy(e, normalisation="x")), str(png(e.tmp / "ok.png"))), 1, "normalisation"),
    K("predict-meta-image-size-0", "full", lambda e: w(e, "predict", "--checkpoint", str(checkpoint_copy(e, image_size=0)), str(png(e.tmp / "ok.png"))), 1, "image_size"),
    K("predict-meta-not-json", "full", lambda e: w(e, "predict", "--checkpoint", str(write(checkpoint_copy(e) / "meta.json", "{nope").parent), str(png(e.tmp / "ok.png"))), 1, "not valid JSON", holds=True),
    K("predict-meta-foreign-kind", "full", lambda e: w(e, "predict", "--checkpoint", str(checkpoint_copy(e, kind="other")), str(png(e.tmp / "ok.png"))), 1, "not a kacl checkpoint", holds=True),
    K("predict-checkpoint-missing", "full", lambda e: w(e, "predict", "--checkpoint", str(e.tmp / "none"), str(png(e.tmp / "ok.png"))), 1, "no checkpoint", holds=True),
    # -- pretrain -----------------------------------------------------------------------------
    K("pretrain-lr-negative", "full", lambda e: w(e, "pretrain", "--lr", "-1"), 2, "--lr"),
    K("pretrain-lr-nan", "full", lambda e: w(e, "pretrain", "--lr", "nan"), 2, "finite"),
    K("pretrain-backbone-bogus", "full", lambda e: w(e, "pretrain", "--backbone", "bogus"), 2, "--backbone"),
    K("pretrain-loss-bogus", "full", lambda e: w(e, "pretrain", "--loss", "bogus"), 2, "--loss", holds=True),
    K("pretrain-focal-alpha-2", "full", lambda e: w(e, "pretrain", "--focal-alpha", "2"), 2, "--focal-alpha"),
    K("pretrain-epochs-0", "full", lambda e: w(e, "pretrain", "--epochs", "0"), 2, "--epochs", holds=True),
    K("pretrain-init-missing", "full", lambda e: w(e, "pretrain", "--backbone", "tiny", "--device", "cpu", "--init", str(e.tmp / "none.pt")), 1, "none.pt", holds=True),
    K("pretrain-init-pickle", "full", lambda e: w(e, "pretrain", "--backbone", "tiny", "--device", "cpu", "--init", str(pickled_checkpoint(e) / "model.safetensors")), 1, "model.safetensors", holds=True),
    K("pretrain-image-size-too-big", "full", lambda e: w(e, "pretrain", "--backbone", "tiny", "--device", "cpu", "--image-size", "512"), 1, "larger than", holds=True),
    K("pretrain-workspace-is-file", "full", lambda e: ["pretrain", "-w", str(write(e.tmp / "wsfile", "x"))], 1, "is a file"),
    K("pretrain-workspace-empty", "full", lambda e: ["pretrain", "-w", str(e.tmp / "nothing")], 1, "kacl prepare", holds=True),
    # -- cam ----------------------------------------------------------------------------------
    K("cam-split-bogus", "full", lambda e: w(e, "cam", "--split", "bogus"), 2, "--split"),
    K("cam-threshold-0", "full", lambda e: w(e, "cam", "--threshold", "0"), 2, "--threshold", holds=True),
    K("cam-round-missing", "full", lambda e: w(e, "cam", "--round", "7", "--device", "cpu"), 1, "round", holds=True),
    K("cam-shard-3-of-2", "full", lambda e: w(e, "cam", "--shard", "3/2"), 2, "--shard", holds=True),
    K("cam-shard-text", "full", lambda e: w(e, "cam", "--shard", "abc"), 2, "--shard", holds=True),
    K("cam-batch-size-0", "full", lambda e: w(e, "cam", "--batch-size", "0"), 2, "--batch-size", holds=True),
    K("cam-workspace-is-file", "full", lambda e: ["cam", "-w", str(write(e.tmp / "wsfile", "x"))], 1, "is a file"),
    # -- radiomics ----------------------------------------------------------------------------
    K("radiomics-shard-3-of-2", "full", lambda e: w(e, "radiomics", "--shard", "3/2"), 2, "--shard"),
    K("radiomics-shard-1-of-0", "full", lambda e: w(e, "radiomics", "--shard", "1/0"), 2, "--shard"),
    K("radiomics-bin-width-tiny", "full", lambda e: w(e, "radiomics", "--params", params(e, "setting:\n  binWidth: 0.0001\n")), 1, "bins"),
    K("radiomics-bin-width-negative", "full", lambda e: w(e, "radiomics", "--params", params(e, "setting:\n  binWidth: -1\n")), 1, "binWidth"),
    K("radiomics-bin-count-huge", "full", lambda e: w(e, "radiomics", "--params", params(e, "setting:\n  binCount: 100000\n")), 1, "bins"),
    K("radiomics-params-not-yaml", "full", lambda e: w(e, "radiomics", "--params", params(e, "setting: [unclosed\n")), 1, "params.yaml", holds=True),
    K("radiomics-params-a-list", "full", lambda e: w(e, "radiomics", "--params", params(e, "- 1\n- 2\n")), 1, "params.yaml", holds=True),
    K("radiomics-params-unknown-key", "full", lambda e: w(e, "radiomics", "--params", params(e, "setting:\n  binWidht: 25\n")), 1, "unknown", holds=True),
    K("radiomics-params-missing", "full", lambda e: w(e, "radiomics", "--params", str(e.tmp / "none.yaml")), 1, "none.yaml", holds=True),
    K("radiomics-every-roi-fails", "full", lambda e: w(e, "radiomics", "--params", params(e, "setting:\n  minimumROIDimensions: 3\n  binWidth: 25\n")), 1, "every one of", changes=RAD),
    K("radiomics-min-prob-nan", "full", lambda e: w(e, "radiomics", "--min-prob", "nan"), 2, "finite"),
    K("radiomics-backend-bogus", "full", lambda e: w(e, "radiomics", "--backend", "bogus"), 2, "--backend", holds=True),
    K("radiomics-roi-bogus", "full", lambda e: w(e, "radiomics", "--roi", "bogus"), 2, "--roi", holds=True),
    K("radiomics-round-without-cam", "full", lambda e: w(e, "radiomics", "--round", "9"), 1, "9", holds=True),
    # -- contrast -----------------------------------------------------------------------------
    K("contrast-temperature-0", "full", lambda e: w(e, "contrast", "--temperature", "0"), 2, "--temperature"),
    K("contrast-lr-nan", "full", lambda e: w(e, "contrast", "--lr", "nan"), 2, "finite"),
    K("contrast-lambda-negative", "full", lambda e: w(e, "contrast", "--lambda", "-1"), 2, "--lambda"),
    # -- evaluate -----------------------------------------------------------------------------
    K("evaluate-out-is-file", "full", lambda e: w(e, "evaluate", "--out", str(write(e.tmp / "f", "x"))), 2, "--out"),
    K("evaluate-round-text", "full", lambda e: w(e, "evaluate", "--round", "soon"), 2, "--round", holds=True),
    K("evaluate-dollar-image-id", "full", dollar_id, 0, "", changes=EVAL),
    K("evaluate-workspace-is-file", "full", lambda e: ["evaluate", "-w", str(write(e.tmp / "wsfile", "x"))], 1, "kacl prepare", holds=True),
    # -- merge --------------------------------------------------------------------------------
    K("merge-round-negative", "full", lambda e: w(e, "merge", "--round", "-1"), 2, "--round", holds=True),
    # -- prepare: images ----------------------------------------------------------------------
    K("prepare-corrupt-png", "release", lambda e: replace_image(e, lambda p: write(p, b"\x89PNG\r\n\x1a\n broken")), 0, "could not be read", holds=True, logged="unreadable"),
    K("prepare-zero-byte", "release", lambda e: replace_image(e, lambda p: write(p, b"")), 0, "could not be read", holds=True),
    K("prepare-text-as-png", "release", lambda e: replace_image(e, lambda p: write(p, "not an image")), 0, "could not be read", holds=True),
    K("prepare-rgba", "release", lambda e: replace_image(e, lambda p: png(p, mode="RGBA")), 0, "", holds=True),
    K("prepare-16bit", "release", lambda e: replace_image(e, lambda p: png(p, (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))), 0, "", holds=True),
    K("prepare-cmyk", "release", lambda e: replace_image(e, lambda p: Image.new("CMYK", (64, 64), (0, 0, 0, 90)).save(p, format="JPEG")), 0, "", holds=True),
    K("prepare-palette", "release", lambda e: replace_image(e, lambda p: png(p, mode="P")), 0, "", holds=True),
    K("prepare-pixel-cap", "release", lambda e: [*replace_image(e, lambda p: png(p, np.zeros((300, 300), np.uint8))), "--max-pixels", "80000"], 0, "could not be read", logged="pixel cap"),
    # -- prepare: CSV numbers and text --------------------------------------------------------
    K("prepare-age-huge", "release", lambda e: (edit_label_row(e, 2, 4, "99999999999"), prepare_nih(e))[1], 1, "out of range"),
    K("prepare-age-negative", "release", lambda e: (edit_label_row(e, 2, 4, "-5"), prepare_nih(e))[1], 1, "Patient Age"),
    K("prepare-width-negative", "release", lambda e: (edit_label_row(e, 2, 7, "-64"), prepare_nih(e))[1], 1, "OriginalImage Width"),
    K("prepare-spacing-zero", "release", lambda e: (edit_label_row(e, 2, 9, "0"), prepare_nih(e))[1], 1, "pixel spacing x"),
    K("prepare-spacing-nan", "release", lambda e: (edit_label_row(e, 2, 9, "nan"), prepare_nih(e))[1], 1, "not finite", holds=True),
    K("prepare-csv-markup", "release", lambda e: (edit_label_row(e, 2, 1, "Ma[/]ss"), prepare_nih(e))[1], 1, "Ma[/]ss"),
    K("prepare-csv-short-row", "release", short_row, 1, "columns", holds=True),
    K("prepare-csv-not-utf8", "release", lambda e: (write(e.release / LABELS, (e.release / LABELS).read_bytes() + b"\xff\xfe,\xff\n"), prepare_nih(e))[1], 1, "UTF-8", holds=True),
    K("prepare-csv-duplicate-id", "release", lambda e: (write(e.release / LABELS, "".join(label_lines(e) + [label_lines(e)[1]])), prepare_nih(e))[1], 1, "duplicate Image Index", holds=True),
    K("prepare-csv-unknown-finding", "release", lambda e: (edit_label_row(e, 2, 1, "Tumour"), prepare_nih(e))[1], 1, "unknown finding", holds=True),
    # -- prepare: ground-truth boxes ----------------------------------------------------------
    K("prepare-box-outside", "release", lambda e: (add_box(e, first_image(e, "Mass"), "Mass", "5000", "5000", "10", "10"), prepare_nih(e))[1], 0, "", logged="outside"),
    K("prepare-box-negative-corner", "release", lambda e: (add_box(e, first_image(e, "Mass"), "Mass", "-500", "-500", "10", "10"), prepare_nih(e))[1], 0, "", logged="outside"),
    K("prepare-box-huge", "release", lambda e: (add_box(e, first_image(e, "Mass"), "Mass", "1", "1", "1e300", "1e300"), prepare_nih(e))[1], 0, "", logged="far larger"),
    K("prepare-box-nan", "release", lambda e: (add_box(e, first_image(e, "Mass"), "Mass", "nan", "1", "5", "5"), prepare_nih(e))[1], 0, "", logged="non-finite"),
    K("prepare-box-zero-width", "release", lambda e: (add_box(e, first_image(e, "Mass"), "Mass", "1", "1", "0", "5"), prepare_nih(e))[1], 0, "", logged="no area"),
    K("prepare-box-unlabelled", "release", lambda e: (add_box(e, first_image(e, "No Finding"), "Mass", "1", "1", "5", "5"), prepare_nih(e))[1], 0, "", logged="not labelled"),
    K("prepare-box-text", "release", lambda e: (add_box(e, first_image(e), "Mass", "one", "1", "5", "5"), prepare_nih(e))[1], 1, "not a number", holds=True),
    # -- prepare: options and the file system -------------------------------------------------
    K("prepare-shard-500-of-1000", "release", lambda e: ["prepare", "--synthetic", "24", "--size", "64", "--shard", "500/1000", "-w", str(e.ws)], 2, "--shard"),
    K("prepare-nih-shard-past-the-images", "release", lambda e: ["prepare", "--nih-dir", str(e.release), "--size", "64", "--workers", "1", "--shard", "500/1000", "-w", str(e.ws)], 2, "--shard"),
    K("prepare-shard-3-of-2", "release", lambda e: ["prepare", "--synthetic", "24", "--shard", "3/2", "-w", str(e.ws)], 2, "--shard", holds=True),
    K("prepare-size-8", "release", lambda e: ["prepare", "--synthetic", "24", "--size", "8", "-w", str(e.ws)], 2, "--size"),
    K("prepare-difficulty-nan", "release", lambda e: ["prepare", "--synthetic", "24", "--difficulty", "nan", "-w", str(e.ws)], 2, "finite"),
    K("prepare-no-source", "release", lambda e: ["prepare", "-w", str(e.ws)], 2, "exactly one", holds=True),
    K("prepare-nih-dir-missing", "release", lambda e: ["prepare", "--nih-dir", str(e.tmp / "none"), "-w", str(e.ws)], 1, "no such directory", holds=True),
    K("prepare-workspace-is-file", "release", lambda e: [*prepare_nih(e)[:-1], str(write(e.tmp / "wsfile", "x"))], 1, "is a file"),
    K("prepare-read-only-catalog", "release", read_only_catalog, 1, "Read-only file system"),
    K("pretrain-read-only-workspace", "full", lambda e: read_only_lock(e, w(e, "pretrain", "--backbone", "tiny")), 1, "read-only file system"),
    K("cam-read-only-workspace", "full", lambda e: read_only_lock(e, w(e, "cam", "--device", "cpu")), 1, "read-only file system"),
    K("prepare-disk-full", "release", fill_disk, 1, "disk full while writing store.h5 (0 images committed"),
]
