"""The DuckDB feature catalog: every table any stage reads or writes, in one schema.

DuckDB admits one writing process at a time and no readers beside it, so connections are
short-lived: a stage reads what it needs, works, then writes its results in one transaction.
That is what lets DataLoader workers, DDP ranks and sharded batch jobs coexist with it (only
rank 0 / the merge step ever writes).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from kacl_cli.errors import KaclError
from kacl_cli.findings import LABEL_COLUMNS

SCHEMA_VERSION = 1


def _q(name: str) -> str:
    """Quote an identifier (finding names contain spaces: "No Finding")."""
    return '"' + name.replace('"', '""') + '"'


LABEL_SQL = ", ".join(f"{_q(c)} BOOLEAN NOT NULL" for c in LABEL_COLUMNS)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
-- one row per ingested X-ray; `row` is its index in store.h5:/images
CREATE TABLE IF NOT EXISTS images (
    image_id VARCHAR PRIMARY KEY,
    row INTEGER NOT NULL UNIQUE,
    patient_id VARCHAR NOT NULL,
    split VARCHAR NOT NULL,            -- train | val | test
    follow_up INTEGER,
    view_position VARCHAR,
    age INTEGER,
    sex VARCHAR,
    orig_width INTEGER NOT NULL,       -- pixels of the source image
    orig_height INTEGER NOT NULL,
    spacing_x DOUBLE,                  -- mm per original pixel, when known
    spacing_y DOUBLE,
    source_path VARCHAR
);
-- image-level labels, one boolean column per finding plus "No Finding"
CREATE TABLE IF NOT EXISTS labels (image_id VARCHAR PRIMARY KEY, {LABEL_SQL});
-- ground-truth boxes in original pixel coordinates (x, y = top-left corner)
CREATE TABLE IF NOT EXISTS gt_boxes (
    image_id VARCHAR NOT NULL, finding VARCHAR NOT NULL,
    x DOUBLE NOT NULL, y DOUBLE NOT NULL, w DOUBLE NOT NULL, h DOUBLE NOT NULL
);
-- every stage invocation: what ran, with which config, on which inputs, and how it ended
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    stage VARCHAR NOT NULL,
    round INTEGER,
    shard VARCHAR,
    config_json VARCHAR NOT NULL,
    config_hash VARCHAR NOT NULL,
    input_fingerprint VARCHAR NOT NULL,
    status VARCHAR NOT NULL,           -- running | done | failed | interrupted
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    seconds DOUBLE,
    version VARCHAR NOT NULL,
    summary_json VARCHAR
);
-- bad input met by a stage: the item, and why (the good items around it are kept)
CREATE TABLE IF NOT EXISTS errors (
    run_id VARCHAR, stage VARCHAR NOT NULL, item VARCHAR, reason VARCHAR NOT NULL,
    logged_at TIMESTAMP NOT NULL
);
-- per-epoch training metrics of pretrain (round 0) and contrast (rounds >= 1)
CREATE TABLE IF NOT EXISTS epochs (
    round INTEGER NOT NULL, stage VARCHAR NOT NULL, epoch INTEGER NOT NULL,
    train_loss DOUBLE, cls_loss DOUBLE, contrastive_loss DOUBLE, val_loss DOUBLE,
    val_mean_auc DOUBLE, lr DOUBLE, seconds DOUBLE, images_per_s DOUBLE,
    PRIMARY KEY (round, epoch)
);
-- one row per (round, image, finding): the Grad-CAM box in original pixel coordinates,
-- NULL box with a reason when the map is empty/flat
CREATE TABLE IF NOT EXISTS cam_boxes (
    round INTEGER NOT NULL, image_id VARCHAR NOT NULL, finding VARCHAR NOT NULL,
    probability DOUBLE NOT NULL,
    x DOUBLE, y DOUBLE, w DOUBLE, h DOUBLE,
    peak DOUBLE, mass DOUBLE, reason VARCHAR,
    PRIMARY KEY (round, image_id, finding)
);
-- the regions radiomics are computed on, in store pixel coordinates (half-open x0:x1, y0:y1)
CREATE TABLE IF NOT EXISTS rois (
    round INTEGER NOT NULL, image_id VARCHAR NOT NULL, finding VARCHAR NOT NULL,
    source VARCHAR NOT NULL,           -- cam | gt
    x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL, y1 INTEGER NOT NULL,
    is_positive BOOLEAN NOT NULL,      -- the ROI whose radiomics are the contrastive positive
    PRIMARY KEY (round, image_id, finding)
);
CREATE TABLE IF NOT EXISTS radiomics_features (
    settings_hash VARCHAR NOT NULL, feature_index INTEGER NOT NULL, name VARCHAR NOT NULL,
    PRIMARY KEY (settings_hash, feature_index)
);
CREATE TABLE IF NOT EXISTS radiomics_settings (
    settings_hash VARCHAR PRIMARY KEY, settings_json VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS radiomics (
    round INTEGER NOT NULL, image_id VARCHAR NOT NULL, finding VARCHAR NOT NULL,
    backend VARCHAR NOT NULL, settings_hash VARCHAR NOT NULL,
    features FLOAT[],                  -- in radiomics_features order; NULL when reason is set
    n_nonfinite INTEGER NOT NULL DEFAULT 0,
    reason VARCHAR,
    PRIMARY KEY (round, image_id, finding)
);
-- training-split statistics for z-scoring (per round and settings)
CREATE TABLE IF NOT EXISTS radiomics_stats (
    round INTEGER NOT NULL, settings_hash VARCHAR NOT NULL, feature_index INTEGER NOT NULL,
    mean DOUBLE NOT NULL, std DOUBLE NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (round, settings_hash, feature_index)
);
-- images whose ground-truth boxes were used as training supervision (excluded from evaluation)
CREATE TABLE IF NOT EXISTS box_supervision (
    image_id VARCHAR PRIMARY KEY, fold INTEGER, fraction DOUBLE, run_id VARCHAR
);
-- per-finding box rules (threshold fraction of the peak, component rule) of a round's
-- checkpoint, fitted in `cam` on GT boxes evaluation does not score (or the 0.5/peak fallback)
CREATE TABLE IF NOT EXISTS box_rules (
    round INTEGER NOT NULL, checkpoint VARCHAR, finding VARCHAR NOT NULL,
    frac DOUBLE NOT NULL, component VARCHAR NOT NULL, fit_mean_iou DOUBLE, n_pairs INTEGER,
    source VARCHAR NOT NULL,
    PRIMARY KEY (round, finding)
);
-- the images whose GT boxes the round's box rules were fitted on (left out of localization)
CREATE TABLE IF NOT EXISTS box_rule_images (
    round INTEGER NOT NULL, image_id VARCHAR NOT NULL, PRIMARY KEY (round, image_id)
);
-- boxes 2..K of `cam --max-boxes K` (rank 1 is the cam_boxes row), ranked by mass
CREATE TABLE IF NOT EXISTS cam_boxes_ranked (
    round INTEGER NOT NULL, image_id VARCHAR NOT NULL, finding VARCHAR NOT NULL,
    rank INTEGER NOT NULL, x DOUBLE, y DOUBLE, w DOUBLE, h DOUBLE, mass DOUBLE,
    PRIMARY KEY (round, image_id, finding, rank)
);
-- evaluation results, long format: one row per (round, split, metric, finding, threshold)
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL, split VARCHAR NOT NULL, metric VARCHAR NOT NULL,
    finding VARCHAR NOT NULL, threshold DOUBLE, value DOUBLE,
    ci_low DOUBLE, ci_high DOUBLE, n INTEGER, run_id VARCHAR
);
-- `kacl compare A B` results, kept in A's catalog (long format: one row per metric; a new
-- compare of the same A, B and split replaces them); evaluate's reports list them
CREATE TABLE IF NOT EXISTS comparisons (
    a VARCHAR NOT NULL, b VARCHAR NOT NULL,            -- the targets as given
    a_root VARCHAR NOT NULL, round_a INTEGER NOT NULL, -- resolved workspace and round
    b_root VARCHAR NOT NULL, round_b INTEGER NOT NULL,
    split VARCHAR NOT NULL, metric VARCHAR NOT NULL,   -- mean_auc | loc_acc | mean_iou | auc/F
    delta DOUBLE, ci_low DOUBLE, ci_high DOUBLE,       -- A - B and its paired-bootstrap CI
    n_images INTEGER NOT NULL, n_boot INTEGER NOT NULL, seed INTEGER,
    compared_at TIMESTAMP NOT NULL,
    PRIMARY KEY (a_root, round_a, b_root, round_b, split, metric)
);
"""


class Catalog:
    """Handle on ``catalog.duckdb``; opens a connection per use (see module docstring), or
    reuses one inside :meth:`session`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._held: duckdb.DuckDBPyConnection | None = None
        self._sessions = 0

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise KaclError(f"no catalog at {self.path}: run `kacl prepare` first")
        if self._sessions:
            yield from self._reuse()
            return
        con = _connect_with_retry(self.path, read_only)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Every :meth:`connect` (and query) inside shares one read-write connection.

        Why: opening and closing the catalog costs ~30-50 ms, and a stage's bookkeeping (run
        record, ROI rows, statistics, summary) opens it about ten times: half a second of
        fixed cost on a small job. The shared connection is opened on first use and closed
        when the outermost session ends or at :meth:`release`, which a stage calls before it
        goes off to compute so other processes can read the catalog meanwhile, as before.
        A statement that raises closes it too: its open transaction is dropped, exactly as
        closing a connection of its own did.
        """
        self._sessions += 1
        try:
            yield
        finally:
            self._sessions -= 1
            if not self._sessions:
                self.release()

    def release(self) -> None:
        """Close the session's shared connection (the next use inside it reopens one)."""
        con, self._held = self._held, None
        if con is not None:
            con.close()

    def _reuse(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._held is None:
            self._held = _connect_with_retry(self.path, False)
        try:
            yield self._held
        except BaseException:
            self.release()
            raise

    def init(self) -> None:
        """Create every table (idempotent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute(SCHEMA)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    def ensure_tables(self, *names: str) -> None:
        """Create the schema's missing tables when any of ``names`` is absent: catalogs made
        before a table was added (e.g. box_rules) gain it without a re-prepare."""
        have = {r[0] for r in self.query("SELECT table_name FROM duckdb_tables()")}
        if not set(names) <= have:
            self.init()

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        """Run a read-only query and return all rows."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).fetchall()

    def query_df(self, sql: str, params: list | None = None) -> dict:
        """Run a read-only query and return columns as numpy arrays (``{name: array}``)."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).fetchnumpy()

    def execute(self, sql: str, params: list | None = None) -> None:
        with self.connect() as con:
            con.execute(sql, params or [])

    def count(self, table: str, where: str = "", params: list | None = None) -> int:
        sql = f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else "")
        return int(self.query(sql, params)[0][0])


def _connect_with_retry(
    path: Path, read_only: bool, wait_s: float = 30.0
) -> duckdb.DuckDBPyConnection:
    """Open the catalog, waiting briefly while another kacl process holds the write lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            text = str(exc)
            # A lock conflict names another process; a read-only or full file system does
            # not (its message also says "lock" at times, so check that first).
            fs_problem = any(w in text for w in ("Read-only", "Permission denied",
                                                 "No space left"))
            if fs_problem or "lock" not in text.lower() or time.monotonic() > deadline:
                hint = "" if fs_problem or "lock" not in text.lower() else (
                    " (is another kacl process writing to this workspace?)")
                raise KaclError(
                    f"cannot open catalog {path}: {text.splitlines()[0]}{hint}") from None
            time.sleep(0.2)


def label_columns_sql() -> str:
    """The quoted label columns, in model-head order, for SELECTs."""
    return ", ".join(_q(c) for c in LABEL_COLUMNS)


quote_ident = _q


# -- bulk inserts ---------------------------------------------------------------------------
_INSERT_VIEW = "__kacl_insert_columns"
_ROW = "__kacl_row"


@dataclass(frozen=True)
class ListRows:
    """A list column given as a 2-D float array: row i of ``values`` is row i's list value,
    NULL where ``null[i]`` (e.g. radiomics ``FLOAT[]`` features, NULL for a failed ROI).

    Why: binding n x F Python floats as a nested list parameter costs ~1 us a value (~60 ms
    for 500 ROIs x 102 features); the array is scanned flat instead (~0.1 us a value) and
    regrouped into lists server-side. NaN and +-inf stay NaN and +-inf, exactly as binding.
    """

    values: np.ndarray
    null: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.dtype.kind != "f":
            raise ValueError(f"ListRows needs a 2-D float array, got {self.values.dtype} "
                             f"{self.values.shape}")
        if self.null is not None and self.null.shape != (len(self.values),):
            raise ValueError(f"ListRows: null of shape {self.null.shape} for "
                             f"{len(self.values)} rows")

    def __len__(self) -> int:
        return len(self.values)


def insert_columns(
    con: duckdb.DuckDBPyConnection, table: str, columns: Mapping[str, Any], *,
    replace: bool = False,
) -> int:
    """Insert rows given column by column, in ONE statement; return the number of rows.

    Why: DuckDB's ``executemany`` runs one statement per row (~2-4 ms each: seconds for a few
    thousand metric or ROI rows, minutes for a full NIH round), and multi-row ``VALUES`` binds
    and plans every value separately. Here a column goes either through DuckDB's native numpy
    scan (``con.register``; ~0.1 us a value) or, where that scan would change a value, as one
    typed list parameter unnested server-side (~1 us a value); the two halves meet in a
    ``POSITIONAL JOIN``. What is stored is exactly what binding the values row by row stores:

    - scanned: 1-D numpy arrays of bool/int, of float without NaN, masked arrays (masked =
      NULL; ``np.ma.masked_invalid`` says "NaN means no value"), and object arrays of str/None;
    - listed: everything else - Python lists, float arrays holding NaN (the numpy scan would
      read NaN as NULL), 2-D arrays (one list value per row, e.g. ``FLOAT[]`` features),
      timestamps. List parameters are cast to the target column's type, so None is NULL and
      NaN/inf stay NaN/inf;
    - :class:`ListRows`: a 2-D float array as one list value per row, scanned flat and
      regrouped server-side (10x faster than listing it), joined to the rest by row number.

    ``replace=True`` is ``INSERT OR REPLACE``. Column names are the table's (quoted here);
    ``table`` is SQL as written (``metrics``, ``ws.images``).
    """
    names = list(columns)
    lengths = {name: len(columns[name]) for name in names}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"insert into {table}: columns differ in length {lengths}")
    n = next(iter(lengths.values()), 0)
    if n == 0:
        return 0
    matrices = [k for k in names if isinstance(columns[k], ListRows)]
    scanned = {k: v for k, v in columns.items() if _scannable(v)}
    if matrices:  # joined to the rest by row number
        scanned[_ROW] = np.arange(n, dtype=np.int64)
    listed = [k for k in names if k not in scanned and k not in matrices]
    sources = []
    if scanned:
        sources.append(_INSERT_VIEW)
    types: dict[str, str] = {}
    if listed:
        types = {str(r[0]): str(r[1]) for r in con.execute(f"DESCRIBE {table}").fetchall()}
    if listed:
        sources.append("(SELECT " + ", ".join(
            f"unnest(?::{types[k]}[]) AS {_q(k)}" for k in listed) + ")")
    cols = ", ".join(_q(k) for k in names)
    source = " POSITIONAL JOIN ".join(sources)
    views = {f"{_INSERT_VIEW}_{j}": columns[k] for j, k in enumerate(matrices)}
    if matrices:
        source = f"(SELECT * FROM {source}) AS __kacl_base"
        for (view, rows), k in zip(views.items(), matrices, strict=True):
            elem = "FLOAT" if rows.values.dtype == np.float32 else "DOUBLE"
            # the scan reads NaN as NULL; no element is NULL, so coalesce gives NaN back;
            # the INSERT casts the list to the column's type, as it casts a list parameter
            source += (f" LEFT JOIN (SELECT i AS {_ROW}, list(coalesce(v, 'NaN'::{elem}) "
                       f"ORDER BY j) AS {_q(k)} FROM {view} GROUP BY i) USING ({_ROW})")
        source += f" ORDER BY {_ROW}"
    sql = (f"INSERT {'OR REPLACE ' if replace else ''}INTO {table} ({cols}) SELECT {cols} FROM "
           + source)
    if scanned:
        con.register(_INSERT_VIEW, scanned)
    for view, rows in views.items():
        con.register(view, _flat(rows))
    try:
        con.execute(sql, [_as_list(columns[k]) for k in listed])
    finally:
        if scanned:
            con.unregister(_INSERT_VIEW)
        for view in views:
            con.unregister(view)
    return n


def _flat(rows: ListRows) -> dict[str, np.ndarray]:
    """The non-NULL rows of ``rows`` as (row i, position j, value v) columns."""
    keep = np.arange(len(rows)) if rows.null is None else np.flatnonzero(~rows.null)
    width = rows.values.shape[1]
    return {"i": np.repeat(keep.astype(np.int64), width),
            "j": np.tile(np.arange(width, dtype=np.int64), len(keep)),
            "v": np.ascontiguousarray(rows.values[keep]).ravel()}


def insert_rows(
    con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Sequence[Any]],
    columns: Sequence[str] | None = None, *, replace: bool = False,
) -> int:
    """Insert row tuples (in ``columns`` order, default: the table's) via :func:`insert_columns`.

    For call sites that build rows one by one; same values, one statement.
    """
    if not rows:
        return 0
    if columns is None:
        columns = [str(r[0]) for r in con.execute(f"DESCRIBE {table}").fetchall()]
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"insert into {table}: rows must have {len(columns)} values")
    return insert_columns(
        con, table, {c: [row[j] for row in rows] for j, c in enumerate(columns)},
        replace=replace,
    )


def _scannable(col: Any) -> bool:
    """True when DuckDB's numpy scan stores exactly the values of ``col`` (see above)."""
    if not isinstance(col, np.ndarray) or col.ndim != 1:
        return False
    kind = col.dtype.kind
    # numpy.ma is imported on first use (~25 ms): nothing is masked before anyone imported it
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(col, ma.MaskedArray):
        return kind in "biuf" and not (kind == "f" and np.isnan(col.compressed()).any())
    if kind in "biu":
        return True
    if kind == "f":
        return not np.isnan(col).any()
    if kind == "O":
        return all(v is None or isinstance(v, str) for v in col)
    return False


def _as_list(col: Any) -> list:
    """A column as a Python list for a list parameter (masked -> None, arrays -> lists)."""
    if isinstance(col, np.ndarray):
        return col.tolist()  # masked entries become None
    return [v.tolist() if isinstance(v, np.ndarray | np.generic) else v for v in col]
