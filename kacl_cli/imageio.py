"""Reading X-rays as users have them (PNG/JPEG of any bit depth, RGBA, DICOM) into 8-bit gray.

Shared by ``prepare`` (the NIH release and phantoms) and ``predict`` (a user's file), so a
model sees the same pixels at training and inference time.

Choices (documented in the README):
- 8-bit gray is kept as is; RGB/RGBA is converted to luminance (alpha ignored: the NIH RGBA
  images are gray with an opaque alpha channel).
- 16-bit (and other >8-bit) images are scaled linearly from their own min..max to 0..255:
  X-ray PNGs rarely use the full 16-bit range, so a fixed /256 would leave them dark.
- DICOM: modality LUT (rescale slope/intercept) then VOI LUT/window, MONOCHROME1 inverted,
  then the same min..max scaling.
- Resizing to the store's S x S is antialiased (PIL's bilinear filter widens with the scale
  factor); non-square images are resized anisotropically, and boxes map back with separate
  x and y scales from the catalog's original width/height.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kacl_cli.errors import InputError

DICOM_SUFFIXES = {".dcm", ".dicom"}

# Pixel cap, checked from the header before any pixel is decoded (a 214 KB 16-bit PNG of
# 10000 x 10000 took predict to 4.2 GB). 50 MP is over 3x the largest chest radiographs
# (~4300 x 3500); --max-pixels (prepare, predict) or KACL_MAX_PIXELS changes it. An
# environment variable, so prepare's decoder processes see the same cap.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "KACL_MAX_PIXELS"


def max_pixels() -> int:
    """The pixel cap in force (:data:`DEFAULT_MAX_PIXELS` unless KACL_MAX_PIXELS is set)."""
    try:
        return int(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def _check_pixels(path: Path, width: int, height: int, frames: int = 1) -> None:
    cap = max_pixels()
    if width * height * max(frames, 1) > cap:
        raise InputError(f"{path}: {width} x {height} pixels is over the pixel cap of {cap} "
                         "(--max-pixels / KACL_MAX_PIXELS)")


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8, H x W, original resolution
    width: int
    height: int


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric image to uint8; uint8 passes through untouched."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise InputError("image has no finite pixel values")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise InputError(f"{path}: DICOM support needs pydicom ({exc})") from None
    try:
        head = pydicom.dcmread(str(path), stop_before_pixels=True)
        _check_pixels(path, int(getattr(head, "Columns", 0) or 0),
                      int(getattr(head, "Rows", 0) or 0),
                      int(getattr(head, "NumberOfFrames", 1) or 1))
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except InputError:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise InputError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]  # multi-frame: first frame
    if arr.ndim == 3:
        arr = arr.mean(axis=-1)
    try:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds, index=0)
    except Exception as exc:  # e.g. WindowWidth 0, a malformed LUT
        raise InputError(f"{path}: unusable DICOM window/LUT ({type(exc).__name__}: "
                         f"{exc})") from None
    arr = np.asarray(arr, dtype=np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            _check_pixels(path, *im.size)  # from the header: nothing decoded yet
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return np.asarray(im)
            if mode in ("L", "P", "1", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "PA"):
                if mode == "P":
                    im = im.convert("RGBA")
                return np.asarray(im.convert("L"))
            return np.asarray(im.convert("L"))
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None


def read_gray(path: Path | str) -> Decoded:
    """Decode an X-ray file into 8-bit gray at its original resolution."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty (zero-byte) file")
    arr = _read_dicom(path) if _is_dicom(path) else _read_pil(path)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise InputError(f"{path}: not a 2D image (shape {arr.shape})")
    u8 = to_uint8(arr)
    return Decoded(np.ascontiguousarray(u8), width=int(u8.shape[1]), height=int(u8.shape[0]))


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of an 8-bit image to size x size."""
    if pixels.shape == (size, size):
        return pixels
    im = Image.fromarray(pixels, mode="L")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def load_for_store(path: Path | str, size: int) -> tuple[np.ndarray, int, int]:
    """Decode and resize in one call (the unit of work of prepare's worker processes)."""
    dec = read_gray(path)
    return resize_square(dec.pixels, size), dec.width, dec.height
