"""store.encode_image + Store.write_chunks: the decode workers' encoded chunks land in the
store as exactly the bytes (and pixels) Store.write_images writes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from kacl_cli.store import Store, encode_image


def test_encoded_chunks_equal_what_write_images_stores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    images = np.stack([ramp, rng.integers(0, 256, (64, 64), dtype=np.uint8),  # incompressible
                       np.zeros((64, 64), np.uint8), ramp[::-1]])
    a, b = Store(tmp_path / "a.h5"), Store(tmp_path / "b.h5")
    a.write_images(0, images, 64)
    chunks = [encode_image(p) for p in images]
    b.write_chunks(0, chunks[:1], 64)
    b.write_chunks(1, chunks[1:], 64)
    assert (b.read_images([0, 1, 2, 3]) == images).all()
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        for k in range(4):
            assert fa["images"].id.read_direct_chunk((k, 0, 0)) == \
                fb["images"].id.read_direct_chunk((k, 0, 0))
    assert encode_image(images[1]) == chunks[1]  # the reused encoder gives the same bytes
