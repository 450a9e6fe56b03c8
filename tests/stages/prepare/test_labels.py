"""The label file's fast path (labels.scan + nih.LabelTable) against the strict parser, the
splits computed for the ingested patients only, and decoding ahead (ahead.py).

The fast path must give exactly the strict parser's entries on every file it accepts, and
hand every other file (each malformed one included) to the strict parser, whose message then
stands unchanged."""

from __future__ import annotations

import multiprocessing.pool
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kacl_cli.errors import InputError
from kacl_cli.stages.prepare import ahead, labels, nih
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.stages.prepare.nih import Decoded
from kacl_cli.workspace import Workspace

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.143\n",
    "00000001_001.png,Emphysema|Cardiomegaly,1,1,58,M,PA,2894,2729,0.143,0.143\n",
    "00000002_000.png,No Finding,000,00002,058Y,F,AP,2500,2048,0.171,0.168\n",
    "00000003_000.png,Pleural_Thickening|Mass|Mass,,0,,,,,,,0.1\n",
    "00000004_000.png,Hernia,99999,p-4,150,M ,AP,99999,1,9.5,0.001\n",
    "00000005_000.png,Nodule,3,5,0,F,PA,1,99999,1,3.25\n",
]


def write(tmp_path: Path, text: str, name: str = "Data_Entry_2017_v2020.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode())
    return p


def both(p: Path) -> tuple[nih.LabelTable, list[nih.Entry]]:
    table = nih.read_label_table(p)
    return table, table.entries(range(len(table)))


@pytest.mark.parametrize("variant", ["v2020", "crlf", "bom", "original-2017", "no-final-newline"])
def test_fast_path_gives_exactly_the_strict_parsers_entries(tmp_path: Path, variant: str) -> None:
    text = HEADER + "".join(ROWS)
    if variant == "crlf":
        text = text.replace("\n", "\r\n")
    elif variant == "bom":
        text = "\ufeff" + text
    elif variant == "original-2017":
        text = "".join(line.rstrip("\n") + ",\n" for line in text.splitlines(keepends=True))
    elif variant == "no-final-newline":
        text = text.rstrip("\n")
    p = write(tmp_path, text)
    assert labels.scan(p, nih.LABEL_HEADER) is not None  # these all take the fast path
    table, entries = both(p)
    assert entries == nih.read_data_entry(p)
    assert list(table.patient_ids) == [e.patient_id for e in entries]
    assert table.patient_ids[-1] == entries[-1].patient_id and table.patient_ids[1:3] == [
        e.patient_id for e in entries[1:3]]
    assert table.entries([4, 2]) == [entries[4], entries[2]]
    assert table.index["00000002_000.png"] == 2 and entries[2].line == 4


@pytest.mark.parametrize("row", [
    "00000009_000.png,Mass,0,9,40,F,PA,2500,2048,10,0.1\n",  # spacing 10: on the range's end
    "00000009_000.png,Mass,0,9,40,F,PA,2500,2048,1e-3,0.1\n",  # valid, but not plain digits
    "00000009_000.png,Mass | Nodule,0,9,40,F,PA,2500,2048,0.1,0.1\n",  # valid, with spaces
    " 00000009_000.png ,Mass,0,9,4.0,F,PA,2500,2048,0.1,0.1,  \n",  # spaces, a blank extra
    "00000009_000.png,Mass,0,9,40,F,PA,2500,2048,0.1,\n",  # empty spacing y
    "00000009_000.png,Mass,0,9,40,F,PA,2500,2048,0.1,0.1,,\n",  # two blank extra fields
    "00000009_000.png,Mass,123456,9,40,F,PA,2500,2048,0.1,0.1\n",  # a 6-digit follow-up
    '"00000009_000.png",Mass,0,9,40,F,PA,2500,2048,0.1,0.1\n',  # quotes
    "00000009_000.png,Mass,0,9,40,F,PA,2500,2048,0.1,0.1\n\n",  # a blank line
    "00000009_000.png,Mass,0,9,40,F,Pé,2500,2048,0.1,0.1\n",  # not ASCII
])
def test_unusual_but_valid_rows_take_the_strict_path_and_agree(tmp_path: Path, row: str) -> None:
    p = write(tmp_path, HEADER + "".join(ROWS) + row)
    assert labels.scan(p, nih.LABEL_HEADER) is None
    table, entries = both(p)
    assert table.parsed is not None and entries == nih.read_data_entry(p)


@pytest.mark.parametrize("row", [
    "00000009_000.png,Cardiomegaly,0,1,57,M,PA,2682\n",
    "00000009_000.png,Cardiomegaly,0,1,old,M,PA,2682,2749,0.143,0.143\n",
    "00000009_000.png,Broken Bone,0,1,57,M,PA,2682,2749,0.143,0.143\n",
    "00000009_000.png,No Finding|Mass,0,1,57,M,PA,2682,2749,0.143,0.143\n",
    "00000009_000.png,Mass,0,1,57,M,PA,2682,2749,0.143,0.143,surprise\n",
    ",Mass,0,1,57,M,PA,2682,2749,0.143,0.143\n",
    "00000009_000.png,Mass,0,1,151,M,PA,2682,2749,0.143,0.143\n",
    "00000009_000.png,Mass,0,1,57,M,PA,0,2749,0.143,0.143\n",
    "00000009_000.png,Mass,0,1,57,M,PA,2682,2749,0,0.143\n",
    "00000009_000.png,Mass,0,1,57,M,PA,2682,2749,abc,0.143\n",
    "00000009_000.png,Mass,0,,57,M,PA,2682,2749,0.1,0.143\n",
    ROWS[0],  # a duplicate Image Index
])
def test_malformed_rows_give_the_strict_parsers_message(tmp_path: Path, row: str) -> None:
    p = write(tmp_path, HEADER + "".join(ROWS) + row)
    with pytest.raises(InputError) as strict:
        nih.read_data_entry(p)
    with pytest.raises(InputError) as fast:
        nih.read_label_table(p)
    assert str(fast.value) == str(strict.value) and f"{p}:{len(ROWS) + 2}:" in str(fast.value)


def test_foreign_header_and_empty_file_give_the_strict_parsers_message(tmp_path: Path) -> None:
    for name, text in (("a.csv", "name,label\nx.png,Mass\n"), ("b.csv", "\n\n")):
        p = write(tmp_path, text, name)
        with pytest.raises(InputError) as strict:
            nih.read_data_entry(p)
        with pytest.raises(InputError) as fast:
            nih.read_label_table(p)
        assert str(fast.value) == str(strict.value)
    header_only = write(tmp_path, HEADER, "c.csv")
    assert len(nih.read_label_table(header_only)) == 0 == len(nih.read_data_entry(header_only))


@pytest.mark.nih
def test_the_full_real_label_file_takes_the_fast_path_with_equal_entries(
        nih_sample: Path) -> None:
    p = nih_sample / "Data_Entry_2017_v2020.csv"
    table, entries = both(p)
    assert table.lines is not None and len(entries) == 112_120
    assert entries == nih.read_data_entry(p)


# -- splits for the ingested patients ---------------------------------------------------------
def _rows(n_patients: int, per: int = 2) -> tuple[list[str], list[str]]:
    ids = [f"{p:08d}_{k:03d}.png" for p in range(n_patients) for k in range(per)]
    return ids, [str(int(i[:8])) for i in ids]


@pytest.mark.parametrize(("mode", "n_patients"), [("official", 500), ("random", 500),
                                                  ("official", 3), ("random", 3)])
def test_patient_splits_for_some_patients_match_the_full_assignment(mode: str,
                                                                   n_patients: int) -> None:
    ids, patients = _rows(n_patients)
    entries = [nih.Entry(i, (), 0, p, None, None, None, None, None, None, None, k + 2)
               for k, (i, p) in enumerate(zip(ids, patients, strict=True))]
    test_ids = set(ids[::5])
    full = nih.assign_splits(entries, mode, 7, test_ids=test_ids)
    test_patients = {e.patient_id for e in entries if e.image_id in test_ids}
    some = set(patients[::3])
    got = nih.patient_splits(patients, mode, 7, test_patients=test_patients, only=some)
    assert set(got) == some
    assert all(got[e.patient_id] == full[e.image_id] for e in entries if e.patient_id in some)


# -- decoding ahead ---------------------------------------------------------------------------
def test_positions_finds_jobs_in_order_or_gives_up() -> None:
    ahead_jobs = [(0, "a", 8, "none"), (1, "b", 8, "none"), (2, "c", 8, "none"),
                  (3, "d", 8, "none")]
    assert ahead.positions(ahead_jobs, [(0, "b", 8, "none"), (1, "d", 8, "none")]) == [1, 3]
    assert ahead.positions(ahead_jobs, []) == []
    assert ahead.positions(ahead_jobs, [(0, "d", 8, "none"), (1, "b", 8, "none")]) is None
    assert ahead.positions(ahead_jobs, [(0, "e", 8, "none")]) is None  # not decoded ahead
    assert ahead.positions(ahead_jobs, [(0, "b", 16, "none")]) is None  # another size
    assert ahead.positions(ahead_jobs, [(0, "b", 8, "lzf")]) is None  # another encoding


def _fake_decode(job: tuple[int, str, int]) -> Decoded:
    return Decoded(job[0], None, len(job[1]), job[2], job[1])


def test_pick_reindexes_the_wanted_results_and_drops_the_rest() -> None:
    jobs = [(k, "x" * (k + 1), 8) for k in range(40)]
    with multiprocessing.pool.ThreadPool(2) as pool:
        feed = ahead.Feed(pool, _fake_decode, jobs, window=4)
        got = list(ahead.pick(feed, [3, 10, 39]))
    assert [(d.index, d.reason) for d in got] == [(0, "x" * 4), (1, "x" * 11), (2, "x" * 40)]


def _fake_chunk(job: tuple[int, str, int, str]) -> Decoded:
    data = bytes([job[0] % 251]) * len(job[1])
    return Decoded(job[0], None if job[1] == "bad" else (job[0] % 2, data), 1, 1, None)


def test_feed_brings_chunks_back_through_the_ring_unchanged(tmp_path: Path) -> None:
    """A window of 3 slots of 8 bytes serves 40 results in order: every chunk comes back
    byte for byte (an oversized one through the pipe, a failed one as None), although each
    slot is reused a dozen times; the ring's file is gone after the feed."""
    paths = ["x" * (1 + k % 8) for k in range(40)]
    paths[5], paths[9] = "y" * 20, "bad"  # 20 bytes do not fit a slot
    jobs = [(k, p, 8, "none") for k, p in enumerate(paths)]
    with multiprocessing.pool.ThreadPool(2) as pool:
        feed = ahead.Feed(pool, _fake_chunk, jobs, window=3, slot_bytes=8)
        ring = feed._ring
        assert ring is not None and Path(ring.path).exists()
        got = list(feed)
    assert [d.chunk for d in got] == [_fake_chunk(j).chunk for j in jobs]
    assert not Path(ring.path).exists()


def test_a_killed_runs_ring_file_is_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    stale = Path(folder) / f"{ahead.SLOT_PREFIX}{dead.pid}-test"
    stale.write_bytes(b"x")
    mine = ahead.Slots(2, 4)
    try:
        assert not stale.exists() and Path(mine.path).exists()
        assert Path(mine.path).stat().st_size == 8
    finally:
        mine.close()


@pytest.mark.parametrize(("order", "limit"), [("sorted", 4), ("reversed", None)])
def test_decoding_ahead_ingests_what_one_process_does(tmp_path: Path, order: str,
                                                      limit: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """2 workers (decoding ahead in name order; a label file in another order makes the
    ingest feed its own jobs) give the same rows and pixels as 1 process."""
    picked: list[list[int]] = []
    monkeypatch.setattr(ingest, "pick", lambda feed, picks: (
        picked.append(picks), ahead.pick(feed, picks))[1])
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    names = [f"{p:08d}_000.png" for p in range(1, 7)]
    rng = np.random.default_rng(0)
    for name in names + ["00000000_000.png"]:  # the first file is not in the label file
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(
            root / "images" / name)
    rows = [f"{n},Mass,0,{k + 1},40,F,PA,64,64,0.1,0.1\n" for k, n in enumerate(names)]
    (root / "Data_Entry_2017_v2020.csv").write_text(
        HEADER + "".join(rows[::-1] if order == "reversed" else rows))
    got = []
    for workers in (1, 2):
        ws = Workspace(tmp_path / f"ws{workers}")
        s = ingest.prepare_nih(ws, root, size=32, workers=workers, split="random", limit=limit)
        assert s["ingested"] == (limit or 6) and s["unlisted"] == 1
        got.append((ws.catalog.query("SELECT image_id, row, patient_id, split FROM images "
                                     "ORDER BY row"),
                    ws.store.read_images(list(range(s["ingested"]))).tolist()))
    assert got[0] == got[1]
    assert picked == ([[1, 2, 3, 4]] if order == "sorted" else [])  # the stream served them
