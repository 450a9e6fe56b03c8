"""A fast first pass over ``Data_Entry_2017*.csv`` that proves every row valid, in DuckDB.

Why: ``prepare`` reads the whole label file (112,120 rows) on every run, because a patient's
split is decided over all rows, whatever part of the release is downloaded. The strict row
parser (:func:`kacl_cli.stages.prepare.nih.read_data_entry`) spends about 2 s of Python per
call on the 2-core machine; on the 95-image sample that was most of ``prepare``. Here DuckDB's
CSV reader tokenises the file and checks every row with vectorised SQL, and Python only gets
what the ingest needs for all rows (image and patient ids) plus the raw text lines, so the few
rows that are ingested can be turned into entries by the strict parser's own row code.

All or nothing: :func:`scan` accepts only a *subset* of what the strict parser accepts (ASCII
text, no quotes, no blank lines, plain digits, spacing strictly inside its range, ...), and on
that subset the two agree by construction. On anything else, including every malformed file,
it returns None and the caller runs the strict parser, which then gives its usual
``file:line: why`` (so error messages are the strict parser's, unchanged).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

from kacl_cli.findings import FINDINGS, NO_FINDING

# One regular expression per line (RE2, linear time) decides the whole row; it matches a
# *subset* of what the strict parser accepts, on which both give the same values:
# ids without spaces or commas (strip() keeps them as they are); plain digits within each
# number's range (the ranges written as digit patterns, so no float rounding decides a
# border case); 11 fields, or 12 with an empty last one (the original file's). Finding Labels
# are canonical names joined by "|" (or "No Finding" alone). Every field is far below the csv
# module's 131,072-character limit.
_ID = r"[!-+\--~]+"  # printable ASCII but space and comma
assert all(re.fullmatch(r"\w+", f) for f in FINDINGS)  # no regex syntax in the names
_FINDING = "(" + "|".join(FINDINGS) + ")"
_SPACING = r"(0*[1-9](\.[0-9]+)?|0*\.0{0,2}[1-9][0-9]*)"  # 0.001 <= x < 10 (range 1e-4..10)
_COUNT = r"0*[1-9][0-9]{0,4}"  # 1..99999 (OriginalImage Width/Height: 1..100000)
ROW_PATTERN = (
    rf"^{_ID},"  # Image Index
    rf"({NO_FINDING}|{_FINDING}([|]{_FINDING})*),"  # Finding Labels
    r"(0*[0-9]{1,5})?,"  # Follow-up #: 0..99999 or empty (the strict parser: any whole)
    rf"{_ID},"  # Patient ID
    r"(0*([0-9]{1,2}|1[0-4][0-9]|150)[Yy]?)?,"  # Patient Age: 0..150, "058Y", or empty
    r"[^,]*,[^,]*,"  # Patient Gender, View Position: free text
    rf"({_COUNT})?,({_COUNT})?,"  # OriginalImage Width, Height
    rf"({_SPACING})?,{_SPACING},?$"  # pixel spacing x (may be empty), y
)
MAX_LINE = 3000
# Whole lines (\x01 never occurs in a label file: if it does, DuckDB sees two columns and the
# query fails, which means the strict path). Only a verdict comes back: the ids are cut from
# the lines in Python, which costs less than fetching 112k strings from DuckDB.
_QUERY = (
    f"SELECT count(*), coalesce(bool_and(length(l) <= {MAX_LINE} "
    f"AND regexp_full_match(l, '{ROW_PATTERN}')), true) "
    "FROM read_csv(?, header = false, skip = 1, auto_detect = false, delim = '\x01', "
    "quote = '', escape = '', columns = {'l': 'VARCHAR'})"
)


@dataclass
class LabelScan:
    """Every row of a label file the fast path proved valid (row k is line k + 2)."""

    image_ids: list[str]
    lines: list[str]  # the file's text lines without line ends; lines[0] is the header


def scan(path: Path, header: tuple[str, str]) -> LabelScan | None:
    """The fast path's reading of ``path``, or None when the strict parser must decide.

    ``header``: the first two header names, compared as the strict parser does.
    """
    if any(c in str(path) for c in "*?[{"):
        return None  # DuckDB would read these as a glob pattern
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None  # the strict parser words the error
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    # Plain ASCII without quotes or NULs: the csv module then splits each line on commas, as
    # DuckDB does, and UTF-8 decoding cannot fail.
    if not data.isascii() or b'"' in data or b"\x00" in data or b"\x01" in data:
        return None
    text = data.decode("ascii")
    if "\r" in text:  # CRLF is fine; a lone CR is a line end only to the csv module
        if text.count("\r") != text.count("\r\n"):
            return None
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) < 2 or "" in lines:  # blank lines shift line numbers: strict path
        return None
    first = lines[0].split(",")
    if [c.strip().lower() for c in first[:2]] != [h.lower() for h in header]:
        return None
    import duckdb  # lazily: worker processes import this package without needing it

    try:
        with duckdb.connect() as con:
            n_rows, all_ok = con.execute(_QUERY, [str(path)]).fetchone()  # type: ignore[misc]
    except duckdb.Error:
        return None  # e.g. a row with too many fields
    if n_rows != len(lines) - 1 or not all_ok:
        return None
    return LabelScan([line.partition(",")[0] for line in lines[1:]], lines)
