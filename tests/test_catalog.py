"""The catalog's bulk-insert helper stores exactly what row-by-row binding stores."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest

from kacl_cli.catalog import Catalog, insert_columns, insert_rows

TABLE = ("CREATE TABLE t (id INTEGER PRIMARY KEY, name VARCHAR, flag BOOLEAN NOT NULL, "
         "score DOUBLE, feats FLOAT[], stamp TIMESTAMP, \"No Finding\" BOOLEAN)")


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    c.execute(TABLE)
    yield c
    c.close()


def _rows(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute("SELECT * FROM t ORDER BY id").fetchall()


def test_insert_columns_round_trips_nulls_nan_lists_bools_timestamps(con) -> None:
    at = dt.datetime(2026, 11, 26, 16, 30, 1, 123456)
    n = insert_columns(con, "t", {
        "id": np.arange(4, dtype=np.int64),
        "name": np.array(["a", None, "c d", "é"], dtype=object),
        "flag": np.array([True, False, True, False]),
        "score": np.array([0.5, np.nan, -np.inf, 2.0]),  # NaN must stay NaN, not NULL
        "feats": [[1.0, float("nan")], None, np.array([np.inf, 3.0], np.float32), []],
        "stamp": [at, None, at, at],
        "No Finding": [None, True, False, None],
    })
    assert n == 4
    rows = _rows(con)
    assert [r[1] for r in rows] == ["a", None, "c d", "é"]
    assert [r[2] for r in rows] == [True, False, True, False]
    assert rows[0][3] == 0.5 and math.isnan(rows[1][3]) and rows[1][3] is not None
    assert rows[2][3] == -math.inf
    assert rows[0][4][0] == 1.0 and math.isnan(rows[0][4][1])
    assert rows[1][4] is None and rows[2][4] == [math.inf, 3.0] and rows[3][4] == []
    assert [r[5] for r in rows] == [at, None, at, at]
    assert [r[6] for r in rows] == [None, True, False, None]


def test_masked_floats_become_null_and_rows_stay_aligned(con) -> None:
    """Scanned (numpy) and listed (parameter) columns meet row by row over many rows."""
    n = 5000
    score = np.where(np.arange(n) % 7 == 0, np.nan, np.arange(n) / 10)
    insert_columns(con, "t", {
        "id": np.arange(n),                                  # scanned
        "name": [f"n{i}" for i in range(n)],                 # listed (Python list)
        "flag": np.arange(n) % 2 == 0,                       # scanned
        "score": np.ma.masked_invalid(score),                # scanned: NaN -> NULL
        "feats": np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32),  # listed
    })
    rows = _rows(con)
    assert len(rows) == n
    for i in (0, 1, 7, 4999):
        rid, name, flag, sc, feats = rows[i][:5]
        assert (rid, name, flag) == (i, f"n{i}", i % 2 == 0)
        assert sc is None if i % 7 == 0 else sc == pytest.approx(i / 10)
        assert feats == [float(i), float(-i)]


def test_insert_rows_matches_executemany_and_replace(con) -> None:
    at = dt.datetime(2026, 1, 2, 3, 4, 5)
    rows = [(1, "x", True, float("nan"), [0.25], at, None),
            (2, None, False, None, None, None, True)]
    assert insert_rows(con, "t", rows) == 2
    con.execute("CREATE TABLE ref AS SELECT * FROM t LIMIT 0")
    con.executemany("INSERT INTO ref VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    got, want = _rows(con), con.execute("SELECT * FROM ref ORDER BY id").fetchall()
    assert repr(got) == repr(want)  # repr: NaN == NaN
    insert_rows(con, "t", [(2, "y", True)], columns=["id", "name", "flag"], replace=True)
    assert _rows(con)[1][:4] == (2, "y", True, None)


def test_bad_shapes_are_refused_and_nothing_is_written(con) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        insert_columns(con, "t", {"id": [1, 2], "flag": [True]})
    with pytest.raises(ValueError, match="rows must have"):
        insert_rows(con, "t", [(1, "a")])
    assert insert_columns(con, "t", {"id": [], "flag": []}) == 0
    assert _rows(con) == []


def test_insert_into_catalog_tables(tmp_path: Path) -> None:
    """The real schema: quoted label columns and a FLOAT[] column with NULL features."""
    cat = Catalog(tmp_path / "catalog.duckdb")
    cat.init()
    with cat.connect() as con:
        insert_columns(con, "radiomics", {
            "round": np.array([1, 1], np.int32), "image_id": np.array(["a", "b"], object),
            "finding": np.array(["Mass", "Mass"], object), "backend": ["fast", "fast"],
            "settings_hash": ["h", "h"], "features": [[1.0, float("inf")], None],
            "n_nonfinite": [1, 0], "reason": [None, "empty ROI"],
        })
    rows = cat.query("SELECT image_id, features, n_nonfinite, reason FROM radiomics "
                     "ORDER BY image_id")
    assert rows == [("a", [1.0, math.inf], 1, None), ("b", None, 0, "empty ROI")]


def test_session_shares_one_connection_and_drops_a_failed_transaction(tmp_path, monkeypatch):
    import kacl_cli.catalog as catalog_mod

    cat = Catalog(tmp_path / "c.duckdb")
    cat.init()
    cat.execute("CREATE TABLE x (v INTEGER)")
    opened = []
    real = catalog_mod._connect_with_retry
    monkeypatch.setattr(catalog_mod, "_connect_with_retry",
                        lambda *a, **k: opened.append(a) or real(*a, **k))
    with cat.session():
        cat.execute("INSERT INTO x VALUES (1)")
        assert cat.query("SELECT count(*) FROM x") == [(1,)]  # read_only: the same connection
        with cat.session():  # nested: still the same one
            assert cat.count("x") == 1
        assert len(opened) == 1
        with pytest.raises(duckdb.Error), cat.connect() as con:
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO x VALUES (2)")
            con.execute("INSERT INTO nowhere VALUES (3)")
        assert cat.count("x") == 1 and len(opened) == 2  # rolled back, reopened
        cat.release()
        assert cat.count("x") == 1 and len(opened) == 3
    assert cat._held is None
    cat.query("SELECT 1")
    assert len(opened) == 4 and cat._held is None  # outside a session: one per use again


def test_list_rows_store_what_binding_lists_stores(con) -> None:
    """``ListRows`` (flat scan, regrouped) == the nested list parameter, value for value:
    NaN, +-inf, -0.0, NULL rows, float32 and float64, mixed with scanned and listed
    columns, rows in order, and INSERT OR REPLACE."""
    rng = np.random.default_rng(0)
    n = 300
    values = rng.normal(size=(n, 5)).astype(np.float32)
    values[1, 2], values[2, 0], values[3, 4], values[4, 1] = np.nan, np.inf, -np.inf, -0.0
    values[5] = np.nan  # a row of NaN is a value, not NULL
    null = np.zeros(n, dtype=bool)
    null[[0, 6, n - 1]] = True
    base = {"flag": np.arange(n) % 3 == 0, "name": [f"n{i}" for i in range(n)]}
    listed = [None if z else v.tolist() for v, z in zip(values, null, strict=True)]
    insert_columns(con, "t", {"id": np.arange(n), **base, "feats": listed})
    want = _rows(con)
    con.execute("DELETE FROM t")
    from kacl_cli.catalog import ListRows

    insert_columns(con, "t", {"id": np.arange(n), **base, "feats": ListRows(values, null)})
    got = _rows(con)
    assert repr(got) == repr(want)  # repr: NaN == NaN, -0.0 != 0.0
    assert got[0][4] is None and got[5][4] is not None and math.copysign(1, got[4][4][1]) < 0
    # rows are inserted in order (rowid), float64 into the FLOAT[] column rounds as binding
    assert [r[0] for r in con.execute("SELECT id FROM t ORDER BY rowid").fetchall()] == list(
        range(n))
    insert_columns(con, "t", {"id": np.array([7]), "flag": np.array([True]),
                              "feats": ListRows(np.array([[0.1, 2.0]]))}, replace=True)
    row = con.execute("SELECT feats, name FROM t WHERE id = 7").fetchall()[0]
    assert row == ([float(np.float32(0.1)), 2.0], "n7")  # OR REPLACE keeps other columns


def test_list_rows_refuse_what_they_cannot_hold() -> None:
    from kacl_cli.catalog import ListRows

    with pytest.raises(ValueError, match="2-D float"):
        ListRows(np.arange(4.0))
    with pytest.raises(ValueError, match="2-D float"):
        ListRows(np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="null of shape"):
        ListRows(np.ones((2, 2)), np.zeros(3, dtype=bool))
