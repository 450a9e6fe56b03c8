"""The stage contract's bookkeeping: skip identical finished runs, record errors."""

from __future__ import annotations

from kacl_cli.workspace import StageRun, config_hash


def test_config_hash_is_order_independent_and_sensitive() -> None:
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_finished_run_is_skipped_unless_forced(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    run = ws.begin("demo", {"x": 1}, "fp1", round_=0)
    assert isinstance(run, StageRun) and not run.skipped
    run.error("img-1", "broken")
    run.finish({"n": 3})
    again = ws.begin("demo", {"x": 1}, "fp1", round_=0)
    assert again.skipped and again.previous == {"n": 3}
    assert again.result() == {"n": 3, "skipped": True}
    assert not ws.begin("demo", {"x": 1}, "fp1", round_=0, force=True).skipped
    assert not ws.begin("demo", {"x": 2}, "fp1", round_=0).skipped
    assert not ws.begin("demo", {"x": 1}, "fp2", round_=0).skipped
    assert ws.catalog.count("errors", "item = 'img-1'") == 1


def test_store_roundtrip_with_unsorted_rows(tiny_workspace) -> None:
    ws = tiny_workspace(n=6, size=32)
    imgs = ws.store.read_images([5, 1, 1, 3])
    assert imgs.shape == (4, 32, 32)
    assert (imgs[1] == imgs[2]).all()
    assert (imgs[0] == ws.store.read_images([5])[0]).all()


def test_killed_run_is_marked_interrupted_by_the_next(tiny_workspace) -> None:
    ws = tiny_workspace(n=2)
    killed = ws.begin("demo", {"x": 1}, "fp", round_=0)
    assert isinstance(killed, StageRun)  # never finished: the process "died" here
    resumed = ws.begin("demo", {"x": 1}, "fp", round_=0)
    status = dict(ws.catalog.query("SELECT run_id, status FROM runs"))
    assert status[killed.run_id] == "interrupted"
    assert status[resumed.run_id] == "running"


def test_image_reader_items_equal_high_level_indexing(tiny_workspace) -> None:
    """ImageReader[row] reads one hyperslab (cam's and training's per-item path): the same
    pixels as h5py's ``ds[row]``, negative rows included, and IndexError past the end."""
    import h5py
    import numpy as np
    import pytest

    from kacl_cli.store import ImageReader

    ws = tiny_workspace(n=5, size=32)
    reader = ImageReader(ws.store.path)
    with h5py.File(ws.store.path, "r") as f:
        want = f["images"][()]
    for row in (0, 3, 4, -1, -5):
        got = reader[row]
        assert got.dtype == want.dtype and np.array_equal(got, want[row])
    for row in (5, -6):
        with pytest.raises(IndexError):
            reader[row]
    reader.close()
