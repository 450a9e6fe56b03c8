"""The HDF5 image and map store (``store.h5``).

Layout:
- ``/images``: uint8, N x S x S, one image per chunk (random access for training batches),
  stored raw by default, or LZF-compressed (``prepare --compression lzf``: ships with h5py,
  no plugin needed on the user's cluster). Raw, because on real NIH PNGs LZF saves only
  16-22 % of the bytes (0.84 at 256 px, 0.78 at 512 px) while it costs 1.4 / 4.1 ms per
  image to write and 0.30 / 1.26 ms to read back (against 0.01 / 0.06 ms raw): a quarter of
  the training loader's CPU per image and a third of ingest's beyond the decoding itself
  (docs/data.md). A store keeps the compression it was created with.
- ``/cams/round-K``: float16, N x F x h x w raw Grad-CAM maps (never min-max normalised, so
  thresholds keep their meaning), one image per chunk.

Row ``i`` of every dataset belongs to the image whose catalog ``images.row`` is ``i``.
Only one process writes; readers (DataLoader workers) open the file once per process via
:class:`ImageReader`, never once per item.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from kacl_cli.errors import KaclError

IMAGES = "images"
COMPRESSION = "lzf"  # of the Grad-CAM maps
IMAGE_COMPRESSIONS = ("none", "lzf")
DEFAULT_IMAGE_COMPRESSION = "none"


def cam_key(round_: int) -> str:
    return f"cams/round-{round_}"


Chunk = tuple[int, bytes]  # (HDF5 filter mask, bytes) of one image's chunk in /images


def _images_dataset(f: h5py.File, size: int,
                    compression: str = DEFAULT_IMAGE_COMPRESSION) -> h5py.Dataset:
    """``/images`` of an open store, created on first use (with ``compression``); refuses
    another image size."""
    if IMAGES not in f:
        if compression not in IMAGE_COMPRESSIONS:
            raise ValueError(f"image compression must be one of {IMAGE_COMPRESSIONS}")
        f.create_dataset(
            IMAGES,
            shape=(0, size, size),
            maxshape=(None, size, size),
            dtype=np.uint8,
            chunks=(1, size, size),
            compression=None if compression == "none" else compression,
        )
    ds = f[IMAGES]
    if ds.shape[1] != size:
        raise KaclError(
            f"store holds {ds.shape[1]} px images but {size} px were asked for; "
            "use another workspace or `kacl prepare --force`"
        )
    return ds


def images_compression(ds: h5py.Dataset) -> str:
    """The ``IMAGE_COMPRESSIONS`` name of an ``/images`` dataset's filter."""
    return ds.compression or "none"


_ENCODERS: dict[tuple[int, str], tuple[h5py.File, h5py.Dataset]] = {}


def encode_image(pixels: np.ndarray, compression: str = DEFAULT_IMAGE_COMPRESSION) -> Chunk:
    """One S x S uint8 image as an ``/images`` dataset of ``compression`` stores it: its chunk.

    Why: LZF compression was ~6 ms per 512-px image in the one process that writes the store,
    a third of the decoding's cost and a ceiling on many cores. HDF5 compresses this chunk in
    an in-memory file of the same layout (one per process, size and filter, reused), so the
    bytes are exactly what :meth:`Store.write_images` would have written. A raw chunk is the
    C-order pixels themselves.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if compression == "none":
        return 0, pixels.tobytes()
    size = pixels.shape[0]
    if (size, compression) not in _ENCODERS:
        f = h5py.File(io.BytesIO(), "w")
        _ENCODERS[size, compression] = (f, _images_dataset(f, size, compression))
    f, ds = _ENCODERS[size, compression]
    ds.resize((1, size, size))
    ds[0] = pixels
    f.flush()
    mask, data = ds.id.read_direct_chunk((0, 0, 0))
    return int(mask), bytes(data)


class Store:
    """Handle on ``store.h5``; opens the file per use."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def open(self, mode: str = "r") -> Iterator[h5py.File]:
        if mode == "r" and not self.path.exists():
            raise KaclError(f"no image store at {self.path}: run `kacl prepare` first")
        try:
            f = h5py.File(self.path, mode)
        except (OSError, BlockingIOError) as exc:
            raise KaclError(
                f"cannot open store {self.path}: {exc} "
                "(is another kacl process writing to this workspace?)"
            ) from None
        try:
            yield f
        finally:
            f.close()

    # -- images -------------------------------------------------------------------------
    def image_size(self) -> int:
        with self.open("r") as f:
            if IMAGES not in f:
                raise KaclError(f"store {self.path} holds no images: run `kacl prepare` first")
            return int(f[IMAGES].shape[1])

    def images_compression(self) -> str | None:
        """The compression of the stored images; None when there is no store or no image
        dataset yet (the next writer chooses)."""
        if not self.path.exists():
            return None
        with self.open("r") as f:
            return images_compression(f[IMAGES]) if IMAGES in f else None

    def n_rows(self) -> int:
        if not self.path.exists():
            return 0
        with self.open("r") as f:
            return int(f[IMAGES].shape[0]) if IMAGES in f else 0

    def write_images(self, start_row: int, images: np.ndarray, size: int,
                     compression: str = DEFAULT_IMAGE_COMPRESSION) -> None:
        """Write ``images`` (k x S x S uint8) at rows ``start_row..``, growing the dataset
        (created with ``compression``; an existing one keeps its own).

        Rows past ``start_row + k`` that a killed run left behind are cut, so a resumed
        prepare never keeps orphan pixels.
        """
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"expected k x {size} x {size} images, got {images.shape}")
        with self.open("a") as f:
            ds = _images_dataset(f, size, compression)
            end = start_row + images.shape[0]
            ds.resize((end, size, size))
            if len(images):
                ds[start_row:end] = images
            f.flush()

    def write_chunks(self, start_row: int, chunks: list[Chunk], size: int,
                     compression: str = DEFAULT_IMAGE_COMPRESSION) -> None:
        """:meth:`write_images` of images already encoded by :func:`encode_image` with
        ``compression`` (in the decode workers: the single writer then only copies bytes)."""
        with self.open("a") as f:
            ds = _images_dataset(f, size, compression)
            if images_compression(ds) != compression:  # the bytes would be read as garbage
                raise ValueError(f"chunks encoded with {compression!r} for a store of "
                                 f"{images_compression(ds)!r} images")
            end = start_row + len(chunks)
            ds.resize((end, size, size))
            for k, (mask, data) in enumerate(chunks):
                ds.id.write_direct_chunk((start_row + k, 0, 0), data, mask)
            f.flush()

    def read_images(self, rows: np.ndarray | list[int]) -> np.ndarray:
        with self.open("r") as f:
            return read_rows(f[IMAGES], rows)

    # -- maps ---------------------------------------------------------------------------
    def write_cams(self, round_: int, rows: np.ndarray, maps: np.ndarray, n_rows: int) -> None:
        """Store raw maps (k x F x h x w) for catalog rows ``rows`` of round ``round_``."""
        maps = np.asarray(maps, dtype=np.float16)
        key = cam_key(round_)
        with self.open("a") as f:
            if key not in f:
                f.create_dataset(
                    key,
                    shape=(n_rows,) + maps.shape[1:],
                    maxshape=(None,) + maps.shape[1:],
                    dtype=np.float16,
                    chunks=(1,) + maps.shape[1:],
                    compression=COMPRESSION,
                )
            ds = f[key]
            if ds.shape[0] < n_rows:
                ds.resize((n_rows,) + ds.shape[1:])
            order = np.argsort(rows)
            sorted_rows = np.asarray(rows)[order]
            ds[sorted_rows] = maps[order]
            f.flush()

    def read_cams(self, round_: int, rows: np.ndarray | list[int]) -> np.ndarray:
        with self.open("r") as f:
            key = cam_key(round_)
            if key not in f:
                raise KaclError(
                    f"no Grad-CAM maps for round {round_}: run `kacl cam --round {round_}`"
                )
            return read_rows(f[key], rows)

    def has_cams(self, round_: int) -> bool:
        if not self.path.exists():
            return False
        with self.open("r") as f:
            return cam_key(round_) in f

    def delete(self, key: str) -> None:
        with self.open("a") as f:
            if key in f:
                del f[key]


def read_rows(ds: h5py.Dataset, rows: np.ndarray | list[int], raw: bool | None = None
              ) -> np.ndarray:
    """Read rows in any order (duplicates allowed), one chunk read per distinct row.
    ``raw``: :func:`_raw_rows` of ``ds`` when the caller knows it (None: asked here).

    h5py's fancy indexing builds a point selection that is 10-20x slower than reading the
    one-image chunks one by one (measured: 135 vs 2,500 images/s), so rows are read in
    ascending order and scattered back.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size,) + ds.shape[1:], dtype=ds.dtype)
    if rows.size == 0:
        return out
    uniq, inverse = np.unique(rows, return_inverse=True)
    if uniq[0] < 0 or uniq[-1] >= ds.shape[0]:
        raise IndexError(f"rows out of range 0..{ds.shape[0] - 1}")
    block = np.empty((uniq.size,) + ds.shape[1:], dtype=ds.dtype)
    # h5py's low-level read, one hyperslab per row: half the per-row cost of ``ds[row]``
    # (no selection parsing), which dominates for small images.
    tail = tuple(int(d) for d in ds.shape[1:])
    mspace = h5py.h5s.create_simple(tail)
    fspace = ds.id.get_space()
    raw = _raw_rows(ds) if raw is None else raw
    for k, row in enumerate(uniq.tolist()):
        if raw and _read_raw_chunk(ds, row, block[k]):
            continue
        fspace.select_hyperslab((row,) + (0,) * len(tail), (1,) + tail)
        ds.id.read(mspace, fspace, block[k])
    if uniq.size == rows.size and np.array_equal(uniq, rows):
        return block
    out[:] = block[inverse.reshape(-1)]
    return out


def _raw_rows(ds: h5py.Dataset) -> bool:
    """Whether each row is one unfiltered chunk (a raw image store): its bytes are then the
    row itself, and reading them directly skips HDF5's selection machinery (measured: 12
    against 77 us per 256-px image)."""
    return (ds.chunks == (1,) + tuple(ds.shape[1:])
            and ds.id.get_create_plist().get_nfilters() == 0)


def _read_raw_chunk(ds: h5py.Dataset, row: int, out: np.ndarray) -> bool:
    """Copy row ``row``'s chunk into ``out``; False when it is not there as expected (a chunk
    never written reads as the fill value through the normal path)."""
    try:
        mask, data = ds.id.read_direct_chunk((row,) + (0,) * (ds.ndim - 1))
    except (OSError, ValueError, KeyError, RuntimeError):  # RuntimeError: not allocated
        return False
    if mask or len(data) != out.nbytes:
        return False
    out.reshape(-1)[:] = np.frombuffer(data, dtype=out.dtype)
    return True


def read_row(ds: h5py.Dataset, row: int, raw: bool | None = None) -> np.ndarray:
    """``ds[row]`` through h5py's low-level read (one hyperslab): ~half the cost of the
    high-level indexing, which DataLoader items pay once per image (cam, training)."""
    n = int(ds.shape[0])
    if not -n <= row < n:
        raise IndexError(f"Index ({row}) out of range for (0-{n - 1})")
    row = row + n if row < 0 else row
    tail = tuple(int(d) for d in ds.shape[1:])
    out = np.empty(tail, dtype=ds.dtype)
    if (_raw_rows(ds) if raw is None else raw) and _read_raw_chunk(ds, row, out):
        return out
    fspace = ds.id.get_space()
    fspace.select_hyperslab((row,) + (0,) * len(tail), (1,) + tail)
    ds.id.read(h5py.h5s.create_simple(tail), fspace, out)
    return out


class ImageReader:
    """Picklable, per-process reader of ``/images`` for DataLoader workers.

    The file is opened on first use in each process (and re-opened after a fork), not per
    item: opening an HDF5 file costs far more than reading one chunk.
    """

    def __init__(self, path: Path):
        self.path = str(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._raw = False  # _raw_rows of the open file's images, asked once per open (~15 us)

    def _dataset(self) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._raw = _raw_rows(self._file[IMAGES])
        return self._file[IMAGES]

    def __getitem__(self, row: int) -> np.ndarray:
        ds = self._dataset()
        return read_row(ds, int(row), self._raw)

    def batch(self, rows: np.ndarray | list[int]) -> np.ndarray:
        ds = self._dataset()
        return read_rows(ds, rows, self._raw)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_file": None, "_pid": None, "_raw": False}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
