"""store.encode_image + Store.write_chunks: the decode workers' encoded chunks land in the
store as exactly the bytes (and pixels) Store.write_images writes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from kacl_cli import store as store_mod
from kacl_cli.store import IMAGE_COMPRESSIONS, ImageReader, Store, encode_image


@pytest.mark.parametrize("compression", IMAGE_COMPRESSIONS)
def test_encoded_chunks_equal_what_write_images_stores(tmp_path: Path, compression: str) -> None:
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    images = np.stack([ramp, rng.integers(0, 256, (64, 64), dtype=np.uint8),  # incompressible
                       np.zeros((64, 64), np.uint8), ramp[::-1]])
    a, b = Store(tmp_path / "a.h5"), Store(tmp_path / "b.h5")
    a.write_images(0, images, 64, compression)
    chunks = [encode_image(p, compression) for p in images]
    b.write_chunks(0, chunks[:1], 64, compression)
    b.write_chunks(1, chunks[1:], 64, compression)
    assert (b.read_images([0, 1, 2, 3]) == images).all()
    assert a.images_compression() == b.images_compression() == compression
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        for k in range(4):
            assert fa["images"].id.read_direct_chunk((k, 0, 0)) == \
                fb["images"].id.read_direct_chunk((k, 0, 0))
    assert encode_image(images[1], compression) == chunks[1]  # the reused encoder: same bytes


def test_a_store_keeps_its_compression_and_refuses_chunks_of_another(tmp_path: Path) -> None:
    """Raw is the default; later writes keep the filter the dataset was made with, and
    chunks encoded for another filter are refused (they would be read back as garbage)."""
    img = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8)
    raw, lzf = Store(tmp_path / "raw.h5"), Store(tmp_path / "lzf.h5")
    assert raw.images_compression() is None  # no store yet: the next writer chooses
    raw.write_images(0, img[None], 32)
    lzf.write_images(0, img[None], 32, "lzf")
    raw.write_images(1, img[None], 32, "lzf")  # an existing dataset keeps its own filter
    assert raw.images_compression() == "none" and lzf.images_compression() == "lzf"
    with h5py.File(raw.path) as f:
        assert f["images"].compression is None
    with pytest.raises(ValueError, match="'lzf'"):
        raw.write_chunks(2, [encode_image(img, "lzf")], 32, "lzf")
    assert raw.n_rows() == 2 and (raw.read_images([0, 1]) == img).all()


@pytest.mark.parametrize("compression", IMAGE_COMPRESSIONS)
def test_rows_read_the_same_through_the_raw_chunk_path(tmp_path: Path, compression: str) -> None:
    """A raw store's rows are read as chunk bytes (``_read_raw_chunk``); the pixels equal
    HDF5's own read in any order and with duplicates, and a row whose chunk was never
    written reads as the fill value (zeros) through the normal path."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 16, 16), dtype=np.uint8)
    store = Store(tmp_path / "s.h5")
    store.write_images(0, images, 16, compression)
    with h5py.File(store.path, "a") as f:
        f["images"].resize((7, 16, 16))  # rows 5 and 6: chunks never written
        assert store_mod._raw_rows(f["images"]) is (compression == "none")
    rows = [4, 0, 6, 4, 2]
    expect = np.concatenate([images, np.zeros((2, 16, 16), np.uint8)])[rows]
    assert (store.read_images(rows) == expect).all()
    reader = ImageReader(store.path)
    assert all((reader[r] == expect[k]).all() for k, r in enumerate(rows))
    reader.close()
