"""Reading the NIH ChestX-ray14 release the way users actually have it on disk.

What is accepted (see docs/data.md):
- images flat in ``DIR/images/*.png`` (what the official ``images_0NN.tar.gz`` unpack to), or
  the widely used mirror layout ``DIR/images_001/images/ .. DIR/images_012/images/`` (also
  ``DIR/images_0NN/*.png``); any mix of those;
- labels in ``Data_Entry_2017_v2020.csv`` (preferred: the 2020 relabelling) or the original
  ``Data_Entry_2017.csv`` (same columns plus a trailing empty one);
- ``BBox_List_2017.csv`` (header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``; rows of six
  fields; ``Infiltrate`` means Infiltration), optional;
- ``train_val_list.txt`` / ``test_list.txt`` (the official patient-level split), optional.

The CSVs are parsed strictly: a row we cannot read stops ``prepare`` with ``file:line: why``
before anything is written, because silently dropping label rows would bias every metric.
Images, on the other hand, are expected to be partly missing (people download a few of the
twelve archives): a CSV row without its PNG is counted as "missing", never an error.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from kacl_cli.errors import InputError
from kacl_cli.findings import FINDINGS, NO_FINDING, normalise_finding
from kacl_cli.imageio import load_for_store
from kacl_cli.stages.prepare import labels
from kacl_cli.store import Chunk, encode_image

LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_FILE = "BBox_List_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Columns of Data_Entry_2017*.csv, by position (the header splits "OriginalImage[Width,Height]"
# into two cells, so names are useless; positions are what both revisions share).
N_ENTRY_COLUMNS = 11
LABEL_HEADER = ("Image Index", "Finding Labels")  # the first two names, case-insensitive
N_BBOX_COLUMNS = 6


@dataclass(slots=True)
class Entry:
    """One row of the label file."""

    image_id: str
    findings: tuple[str, ...]  # canonical names, FINDINGS order; empty = "No Finding"
    follow_up: int | None
    patient_id: str
    age: int | None
    sex: str | None
    view_position: str | None
    csv_width: int | None  # the CSV's (pre-resize) original size; informational only
    csv_height: int | None
    spacing_x: float | None
    spacing_y: float | None
    line: int  # 1-based line in the CSV, for messages


@dataclass(frozen=True)
class Box:
    finding: str
    x: float
    y: float
    w: float
    h: float


@dataclass
class NihRelease:
    """Everything ``prepare`` needs from one NIH folder, already validated."""

    root: Path
    labels_file: Path
    labels: LabelTable
    boxes: dict[str, list[Box]]
    bbox_file: Path | None
    train_val_text: str | None  # train_val_list.txt, read (so a bad file fails early)
    test: set[str] | None
    images: dict[str, Path]  # file name -> path, over every supported layout
    file_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def has_official_split(self) -> bool:
        return self.train_val_text is not None and self.test is not None

    @functools.cached_property
    def train_val(self) -> set[str] | None:
        """The ids of ``train_val_list.txt``. The split needs only the test list (every other
        patient is train or val), so these 86k ids are made a set only when asked for."""
        return None if self.train_val_text is None else _ids(self.train_val_text)

    @property
    def entries(self) -> list[Entry]:
        """Every label row as an :class:`Entry` (slow on the full file: ``prepare`` uses
        :attr:`labels`)."""
        return self.labels.entries(range(len(self.labels)))


# -- small parsers -------------------------------------------------------------------------
def _err(path: Path, line: int, msg: str) -> InputError:
    return InputError(f"{path}:{line}: {msg}")


def _int(value: str, path: Path, line: int, what: str, *, allow_empty: bool) -> int | None:
    if value.isdigit():  # the common case, 100k times per file: skip the general path
        return int(value)
    v = value.strip()
    if not v:
        if allow_empty:
            return None
        raise _err(path, line, f"empty {what}")
    # Ages in some copies of the original file read like "058Y".
    if what == "Patient Age" and v[-1:] in ("Y", "y"):
        v = v[:-1]
    try:
        f = float(v)
    except ValueError:
        raise _err(path, line, f"{what} {value!r} is not a number") from None
    if not f.is_integer():
        raise _err(path, line, f"{what} {value!r} is not a whole number")
    return int(f)


# Plausible ranges of the label file's numbers, checked at parse time (a 12-digit age used to
# fail in the database insert, mid-run; a negative width gave a negative pixel spacing).
RANGES: dict[str, tuple[float, float]] = {
    "Follow-up #": (0, 100_000),
    "Patient Age": (0, 150),
    "OriginalImage Width": (1, 100_000),
    "OriginalImage Height": (1, 100_000),
    "pixel spacing x": (1e-4, 10.0),  # mm per pixel; NIH's are ~0.14-0.17
    "pixel spacing y": (1e-4, 10.0),
}


def _ranged(value: float | None, path: Path, line: int, what: str) -> float | None:
    """``value`` when it is empty or inside :data:`RANGES`; else a one-line refusal."""
    if value is None:
        return None
    lo, hi = RANGES[what]
    if not lo <= value <= hi:
        raise _err(path, line, f"{what} {value:g} is out of range ({lo:g}..{hi:g})")
    return value


def check_boxes(boxes: Iterable[Box], width: int, height: int,
                findings: Iterable[str]) -> tuple[list[Box], list[tuple[Box, str]]]:
    """Split an image's GT boxes into usable ones and (box, reason) for the errors table.

    Refused: non-finite or non-positive values, a box not overlapping the decoded image (a
    box that only sticks out is kept: the NIH list has a few), an exact duplicate, and a box
    of a finding the image is not labelled with (it would be an evaluation pair the
    classifier is not asked about).
    """
    labelled = set(findings)
    good: list[Box] = []
    bad: list[tuple[Box, str]] = []
    seen: set[tuple[str, float, float, float, float]] = set()
    for b in boxes:
        values = (b.x, b.y, b.w, b.h)
        key = (b.finding, *values)
        if not all(math.isfinite(v) for v in values):
            bad.append((b, "box has a non-finite value"))
        elif b.w <= 0 or b.h <= 0:
            bad.append((b, f"box has no area (w={b.w:g}, h={b.h:g})"))
        elif b.x >= width or b.y >= height or b.x + b.w <= 0 or b.y + b.h <= 0:
            bad.append((b, f"box ({b.x:g}, {b.y:g}, {b.w:g}, {b.h:g}) lies outside the "
                           f"{width} x {height} image"))
        elif b.w > 2 * width or b.h > 2 * height:
            bad.append((b, f"box {b.w:g} x {b.h:g} is far larger than the {width} x {height} "
                           "image"))
        elif b.finding not in labelled:
            bad.append((b, f"box of {b.finding}, but the image is not labelled {b.finding}"))
        elif key in seen:
            bad.append((b, "duplicate box"))
        else:
            seen.add(key)
            good.append(b)
    return good, bad


def _float(value: str, path: Path, line: int, what: str, *, allow_empty: bool) -> float | None:
    try:
        f = float(value)
    except ValueError:
        if not value.strip():
            if allow_empty:
                return None
            raise _err(path, line, f"empty {what}") from None
        raise _err(path, line, f"{what} {value!r} is not a number") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise _err(path, line, f"{what} {value!r} is not finite")
    return f


def _number(value: str, path: Path, line: int, what: str) -> float:
    """A float that may be non-finite (refused later, per box); text is refused now."""
    try:
        return float(value)
    except ValueError:
        raise _err(path, line, f"{what} {value!r} is not a number") from None


def _rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of a CSV, turning csv/encoding failures into a located error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise _err(path, reader.line_num, f"unreadable CSV row ({exc})") from None
                yield reader.line_num, row
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _check_extra_empty(row: list[str], n: int, path: Path, line: int) -> None:
    if len(row) < n:
        raise _err(path, line, f"expected {n} columns, found {len(row)}")
    extra = [c for c in row[n:] if c.strip()]
    if extra:
        raise _err(path, line, f"expected {n} columns, found {len(row)} (extra: {extra[0]!r})")


def parse_labels(value: str, path: Path, line: int) -> tuple[str, ...]:
    """'A|B' -> canonical findings in FINDINGS order; 'No Finding' -> ()."""
    parts = [p.strip() for p in value.split("|") if p.strip()]
    if not parts:
        raise _err(path, line, "empty Finding Labels")
    if parts == [NO_FINDING]:
        return ()
    found = set()
    for p in parts:
        if p == NO_FINDING:
            raise _err(path, line, f"'No Finding' combined with findings in {value!r}")
        try:
            found.add(normalise_finding(p))
        except KeyError:
            raise _err(path, line, f"unknown finding {p!r} in Finding Labels") from None
    return tuple(f for f in FINDINGS if f in found)


def _records(path: Path, header: tuple[str, str], kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of the data rows of an NIH CSV whose first two header names are
    ``header`` (case-insensitive); blank lines carry nothing (e.g. a trailing newline pair)."""
    header_seen = False
    for line, row in _rows(path):
        if not any(row):
            continue
        if header_seen:
            yield line, row
        elif [c.strip().lower() for c in row[:2]] == [h.lower() for h in header]:
            header_seen = True
        else:
            raise _err(path, line, f"not an NIH {kind} file (header must start with "
                                   f"'{header[0]},{header[1]}')")
    if not header_seen:
        raise InputError(f"{path}: empty {kind} file")


def read_data_entry(path: Path) -> list[Entry]:
    """Parse ``Data_Entry_2017*.csv`` strictly (see module docstring).

    The reference parser: ``prepare`` reads through :func:`read_label_table`, whose fast path
    must agree with this on every file it accepts, and which falls back to this on the rest.
    Label strings are parsed once per distinct combination, and numbers take a fast path.
    """
    path = Path(path)
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    label_cache: dict[str, tuple[str, ...]] = {}
    for line, row in _records(path, LABEL_HEADER, "label"):
        if len(row) != N_ENTRY_COLUMNS:
            _check_extra_empty(row, N_ENTRY_COLUMNS, path, line)
        image_id = row[0].strip()
        if not image_id:
            raise _err(path, line, "empty Image Index")
        if image_id in seen:
            raise _err(path, line, f"duplicate Image Index {image_id!r} (first on line "
                                   f"{seen[image_id]})")
        seen[image_id] = line
        entries.append(_entry(row, image_id, path, line, label_cache))
    return entries


def _entry(row: list[str], image_id: str, path: Path, line: int,
           label_cache: dict[str, tuple[str, ...]]) -> Entry:
    """One label row (already checked for its column count and id) as an :class:`Entry`."""
    patient = _patient(row[3], path, line)
    findings = label_cache.get(row[1])
    if findings is None:
        findings = label_cache[row[1]] = parse_labels(row[1], path, line)
    return Entry(
        image_id,
        findings,
        _int(row[2], path, line, "Follow-up #", allow_empty=True),  # type: ignore[arg-type]
        patient,
        _ranged(_int(row[4], path, line, "Patient Age", allow_empty=True), path, line,
                "Patient Age"),
        row[5].strip() or None,
        row[6].strip() or None,
        *(_ranged(_int(row[k], path, line, what, allow_empty=True), path, line, what)
          for k, what in ((7, "OriginalImage Width"), (8, "OriginalImage Height"))),
        *(_ranged(_float(row[k], path, line, what, allow_empty=True), path, line, what)
          for k, what in ((9, "pixel spacing x"), (10, "pixel spacing y"))),
        line,
    )


def _patient(value: str, path: Path, line: int) -> str:
    patient = value.strip()
    if not patient:
        raise _err(path, line, "empty Patient ID")
    if patient.isdigit():
        patient = str(int(patient))  # "00001" and "1" are the same patient
    return patient


class _LinePatients(Sequence[str]):
    """The patient of each row, cut from the fast path's lines when asked for: the splits
    usually need a few dozen (plus the test list's), not 112k."""

    def __init__(self, path: Path, lines: list[str]):
        self.path, self.lines = path, lines

    def __len__(self) -> int:
        return len(self.lines) - 1

    @overload
    def __getitem__(self, k: int) -> str: ...
    @overload
    def __getitem__(self, k: slice) -> list[str]: ...

    def __getitem__(self, k: int | slice) -> str | list[str]:
        if isinstance(k, slice):
            return self.at(range(*k.indices(len(self))))
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self.at([k % len(self)])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.at(range(len(self)))) if len(self) < 64 else (
            p for start in range(0, len(self), 64)
            for p in self.at(range(start, min(start + 64, len(self)))))

    def at(self, rows: Iterable[int]) -> list[str]:
        """The patients of ``rows`` (valid 0-based rows)."""
        lines, path = self.lines, self.path
        return [_patient(lines[k + 1].split(",", 4)[3], path, k + 2) for k in rows]


@dataclass
class LabelTable:
    """The label file as columns: the ids of every row, an :class:`Entry` for rows asked for.

    Why columns: the splits need every row's patient, but ``prepare`` ingests only the rows
    whose image is on disk; building 112k entries for 95 images cost more than the images.
    Built by :func:`read_label_table`, from the fast path's raw lines or from the strict
    parser's entries.
    """

    path: Path
    image_ids: list[str]  # every row, file order
    patient_ids: Sequence[str]  # normalised ("00001" -> "1")
    lines: list[str] | None = None  # fast path: the file's lines, row k on lines[k + 1]
    parsed: list[Entry] | None = None  # strict path: every row already an Entry
    label_cache: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _index: dict[str, int] | None = None

    @classmethod
    def from_entries(cls, path: Path, entries: list[Entry]) -> LabelTable:
        return cls(Path(path), [e.image_id for e in entries], [e.patient_id for e in entries],
                   parsed=entries)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def index(self) -> dict[str, int]:
        """image id -> row."""
        if self._index is None:
            self._index = dict(zip(self.image_ids, range(len(self.image_ids)), strict=True))
        return self._index

    def patients_of(self, image_ids: Iterable[str]) -> set[str]:
        """The patients of those of ``image_ids`` that the file lists."""
        rows = set(map(self.index.get, image_ids))  # C loops: test_list.txt is 25k ids
        rows.discard(None)
        if isinstance(self.patient_ids, _LinePatients):
            return set(self.patient_ids.at(rows))  # type: ignore[arg-type]
        return set(map(self.patient_ids.__getitem__, rows))  # type: ignore[arg-type]

    def entries(self, rows: Iterable[int]) -> list[Entry]:
        """The :class:`Entry` of each row in ``rows`` (0-based, file order)."""
        if self.parsed is not None:
            return [self.parsed[k] for k in rows]
        assert self.lines is not None
        out = []
        for k in rows:
            row = self.lines[k + 1].split(",")
            if row[0] != self.image_ids[k]:  # the two readers disagree on the rows: a bug
                raise RuntimeError(f"{self.path}:{k + 2}: fast label reader out of step")
            out.append(_entry(row, row[0], self.path, k + 2, self.label_cache))
        return out



def read_label_table(path: Path) -> LabelTable:
    """Read and validate the label file as a :class:`LabelTable`.

    :func:`kacl_cli.stages.prepare.labels.scan` proves the usual file valid in DuckDB (about
    10x faster than the strict parser); anything it does not accept, including every malformed
    file, goes through :func:`read_data_entry`, whose error messages stay the only ones.
    """
    path = Path(path)
    found = labels.scan(path, LABEL_HEADER)
    if found is not None:
        table = LabelTable(path, found.image_ids, _LinePatients(path, found.lines),
                           lines=found.lines)
        if len(table.index) == len(table):  # else a duplicate id: the strict parser says where
            return table
    return LabelTable.from_entries(path, read_data_entry(path))


def read_bbox_list(path: Path) -> dict[str, list[Box]]:
    """Parse ``BBox_List_2017.csv``: image id -> boxes (original pixels, x/y top-left)."""
    path = Path(path)
    boxes: dict[str, list[Box]] = {}
    for line, row in _records(path, ("Image Index", "Finding Label"), "box"):
        _check_extra_empty(row, N_BBOX_COLUMNS, path, line)
        image_id = row[0].strip()
        if not image_id:
            raise _err(path, line, "empty Image Index")
        try:
            finding = normalise_finding(row[1])
        except KeyError:
            raise _err(path, line, f"unknown finding {row[1].strip()!r}") from None
        # Numbers only here; whether the box is usable (finite, positive, inside the image,
        # labelled, not a duplicate) is :func:`check_boxes`' job once the image is decoded:
        # a bad box is an errors row, not a refusal of the whole list.
        x, y, w, h = (
            _number(v, path, line, name)
            for v, name in zip(row[2:6], ("box x", "box y", "box w", "box h"), strict=True)
        )
        boxes.setdefault(image_id, []).append(Box(finding, x, y, w, h))  # type: ignore[arg-type]
    return boxes


def read_list(path: Path) -> set[str]:
    """One image id per line (``train_val_list.txt`` / ``test_list.txt``)."""
    return _ids(_read_list_text(path))


def _read_list_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def _ids(text: str) -> set[str]:
    ids = set(map(str.strip, text.splitlines()))  # = {s.strip() for s ... if s.strip()}
    ids.discard("")
    return ids


# -- the folder ----------------------------------------------------------------------------
def image_dirs(root: Path) -> list[Path]:
    """The image folders of every supported layout under ``root``, in a stable order."""
    root = Path(root)
    dirs = []
    if (root / "images").is_dir():
        dirs.append(root / "images")
    for d in sorted(root.glob("images_*")):
        if not d.is_dir():
            continue
        dirs.append(d / "images" if (d / "images").is_dir() else d)
    return dirs


def scan_images(root: Path) -> dict[str, Path]:
    """File name -> path of every image under the supported layouts (first one wins).

    ``os.scandir`` rather than ``glob``: the full release is 112k files and this runs on every
    invocation (it is part of the input fingerprint).
    """
    found: dict[str, Path] = {}
    for d in image_dirs(root):
        with os.scandir(d) as it:
            for e in it:
                if e.name.lower().endswith(IMAGE_SUFFIXES) and e.name not in found:
                    found[e.name] = Path(e.path)
    return found


def file_sha(path: Path) -> str:
    """Content hash of a (small) input file, for the input fingerprint."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def find_labels_file(root: Path) -> Path:
    for name in LABEL_FILES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise InputError(
        f"{root}: no label file ({' or '.join(LABEL_FILES)}); point --nih-dir at the folder "
        "that holds the NIH CSVs and images/"
    )


@dataclass
class Inputs:
    """The cheap survey of an NIH folder: which files are there, their hashes, the images.

    Enough for the input fingerprint, so a finished prepare is skipped without parsing 112k
    CSV rows.
    """

    root: Path
    labels_file: Path
    bbox_file: Path | None
    has_lists: bool
    file_hashes: dict[str, str]
    images: dict[str, Path]


def survey(root: Path) -> Inputs:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--nih-dir {root}: no such directory")
    labels_file = find_labels_file(root)
    hashes = {labels_file.name: file_sha(labels_file)}
    bbox_file = root / BBOX_FILE if (root / BBOX_FILE).is_file() else None
    if bbox_file is not None:
        hashes[bbox_file.name] = file_sha(bbox_file)
    has_lists = (root / TRAIN_VAL_LIST).is_file() and (root / TEST_LIST).is_file()
    if has_lists:
        hashes[TRAIN_VAL_LIST] = file_sha(root / TRAIN_VAL_LIST)
        hashes[TEST_LIST] = file_sha(root / TEST_LIST)
    return Inputs(root, labels_file, bbox_file, has_lists, hashes, scan_images(root))


def read_release(root: Path | Inputs) -> NihRelease:
    """Read and validate an NIH folder (labels, boxes, split lists, image listing)."""
    inputs = root if isinstance(root, Inputs) else survey(root)
    r = inputs.root
    table = read_label_table(inputs.labels_file)
    boxes = read_bbox_list(inputs.bbox_file) if inputs.bbox_file is not None else {}
    train_val = _read_list_text(r / TRAIN_VAL_LIST) if inputs.has_lists else None
    test = read_list(r / TEST_LIST) if inputs.has_lists else None
    return NihRelease(root=r, labels_file=inputs.labels_file, labels=table, boxes=boxes,
                      bbox_file=inputs.bbox_file, train_val_text=train_val, test=test,
                      images=inputs.images, file_hashes=inputs.file_hashes)


# -- splits --------------------------------------------------------------------------------
def patient_uniform(patient_id: str, seed: int) -> float:
    """A seeded number in [0, 1) per patient.

    Hash-based instead of shuffling the patient list: a patient's split then does not depend on
    which other patients happen to be downloaded (partial downloads, ``--limit``, adding
    archives later all keep every earlier image's split).
    """
    digest = hashlib.blake2b(f"{seed}:{patient_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_splits(
    entries: list[Entry],
    mode: str,
    seed: int,
    *,
    test_ids: set[str] | None = None,
    val_fraction: float = 0.1,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> dict[str, str]:
    """image_id -> train | val | test, with every patient in exactly one split.

    ``official``: a patient is in test if any of their images is in ``test_list.txt`` (the
    official lists are patient-disjoint, so this only matters for inconsistent copies); the
    other patients are train, and a seeded ``val_fraction`` of them is carved out as val.
    ``random``: seeded patient-level 70/10/20 (``fractions``).
    """
    test_patients = (None if test_ids is None
                     else {e.patient_id for e in entries if e.image_id in test_ids})
    by_patient = patient_splits([e.patient_id for e in entries], mode, seed,
                                test_patients=test_patients, val_fraction=val_fraction,
                                fractions=fractions)
    return {e.image_id: by_patient[e.patient_id] for e in entries}


def patient_splits(
    patient_ids: Sequence[str],
    mode: str,
    seed: int,
    *,
    test_patients: set[str] | None = None,
    val_fraction: float = 0.1,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    only: Iterable[str] | None = None,
) -> dict[str, str]:
    """patient -> split over the patients of ``patient_ids`` (every label row's, in file
    order), by the rules of :func:`assign_splits` (``test_patients``: those with an image in
    ``test_list.txt``).

    ``only``: return just these patients' splits. The rule is per patient, so the others are
    hashed only as far as needed to see that no split is empty; when one is (tiny files),
    every patient is, since filling it moves the patient nearest to its hash range.
    """
    split_of = _split_rule(mode, seed, test_patients, val_fraction, fractions)
    if only is not None and _no_split_empty(patient_ids, split_of, mode):
        return {p: split_of(p) for p in only}
    patients = dict.fromkeys(patient_ids)  # first-seen order: _fill_empty_splits' tie order
    by_patient = {p: split_of(p) for p in patients}
    _fill_empty_splits(by_patient, seed, mode, val_fraction, fractions)
    return by_patient if only is None else {p: by_patient[p] for p in only}


def _split_rule(mode: str, seed: int, test_patients: set[str] | None, val_fraction: float,
                fractions: tuple[float, float, float]) -> Callable[[str], str]:
    """patient -> split before :func:`_fill_empty_splits`."""
    if mode == "official":
        if test_patients is None:
            raise InputError("official split needs train_val_list.txt and test_list.txt "
                             "(use --split random)")

        def split_of(patient: str) -> str:
            if patient in test_patients:
                return "test"
            return "val" if patient_uniform(patient, seed) < val_fraction else "train"
    elif mode == "random":
        tr, va, _ = fractions

        def split_of(patient: str) -> str:
            u = patient_uniform(patient, seed)
            return "train" if u < tr else "val" if u < tr + va else "test"
    else:
        raise InputError(f"unknown split {mode!r}: expected official or random")
    return split_of


def _no_split_empty(patients: Iterable[str], split_of: Callable[[str], str], mode: str) -> bool:
    """Whether every split :func:`_fill_empty_splits` would fill already has a patient (it
    then changes nothing); stops at the first patient of the last one seen."""
    need = {"val"} if mode == "official" else {"val", "test"}
    for p in patients:
        need.discard(split_of(p))
        if not need:
            return True
    return False


def _fill_empty_splits(by_patient: dict[str, str], seed: int, mode: str,
                       val_fraction: float, fractions: tuple[float, float, float]) -> None:
    """On tiny files a hashed 10% can be nobody: move the patient nearest to the empty split's
    hash range there (from the largest split, which keeps at least one patient).

    Only ever triggers when a split is empty, so real-sized data keeps the pure hash rule.
    """
    if mode == "official":
        ranges = {"val": (0.0, val_fraction)}
        donors = ["train"]  # test comes from the official list, never moved
    else:
        tr, va, _ = fractions
        ranges = {"val": (tr, tr + va), "test": (tr + va, 1.0)}
        donors = ["train", "val", "test"]
    for split, (lo, hi) in ranges.items():
        if split in by_patient.values():
            continue
        groups = {d: [p for p, s in by_patient.items() if s == d] for d in donors if d != split}
        donor = max(groups, key=lambda d: len(groups[d]))
        if len(groups[donor]) < 2:
            continue
        dist = {p: max(lo - u, u - hi, 0.0)
                for p in groups[donor] for u in (patient_uniform(p, seed),)}
        by_patient[min(groups[donor], key=dist.__getitem__)] = split


# -- decoding (the unit of work of prepare's worker processes) -----------------------------
@dataclass
class Decoded:
    index: int
    chunk: Chunk | None  # the size x size pixels as the store keeps them (encode_image);
    # None when the file could not be read. Encoded here, in the worker: see encode_image.
    width: int  # of the decoded source image
    height: int
    reason: str | None


def decode_job(job: tuple[int, str, int, str]) -> Decoded:
    """Decode + resize + encode (for a store of that compression) one file; failures come
    back as a reason, never as an exception.

    Lives here (not in ingest) so worker processes import only this light module.
    """
    index, path, size, compression = job
    try:
        pixels, w, h = load_for_store(path, size)
    except InputError as exc:
        return Decoded(index, None, 0, 0, str(exc))
    except Exception as exc:  # a decoder bug on one odd file must not kill the whole ingest
        return Decoded(index, None, 0, 0, f"{path}: cannot decode ({type(exc).__name__}: {exc})")
    return Decoded(index, encode_image(pixels, compression), w, h, None)
