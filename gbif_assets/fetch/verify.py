"""CPU work on downloaded files, run in a worker process so the event loop never stalls.

Each check opens the image with a pixel limit (decompression bombs are rejected from the header,
before any decoding), checks that the file is complete (JPEG end-of-image marker, PNG IEND chunk,
GIF trailer), decodes it cheaply (JPEG draft mode) unless `decode` is off, optionally stores a
resized copy, and hashes exactly the bytes that will be kept.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

PIL_FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "GIF": ("image/gif", "gif"),
               "WEBP": ("image/webp", "webp"), "TIFF": ("image/tiff", "tif")}  # fmt: skip


def die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when its parent dies, so a
    `kill -9` of a build leaves no orphaned verification processes behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class Verified:
    """Outcome of checking one file; `error` is an error class when it failed."""

    ok: bool
    error: str | None = None
    detail: str | None = None
    width: int = 0
    height: int = 0
    mime: str | None = None
    ext: str | None = None
    sha256: str | None = None
    size: int = 0


def _ends_properly(path: str, fmt: str) -> bool:
    """The format's end marker sits in the last 1 KB (a truncated body still passes the header)."""
    trailer = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b"\x3b"}.get(fmt)
    if trailer is None:
        return False
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - 1024))
        return trailer in handle.read()


def verify_image(path: str, max_pixels: int, resize_max_side: int | None = None, decode: bool = True) -> Verified:
    """Check, optionally resize in place, and hash the file at `path`.

    `decode=False` keeps every safety check (format, pixel limit from the header) and skips the
    draft decode, most of the CPU time per image, for files whose end marker is in place; a file
    without one (truncated, or data appended after the image, as motion photos do) is decoded.
    """
    Image.MAX_IMAGE_PIXELS = None  # we enforce max_pixels ourselves, from the header
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format or ""
            if fmt not in PIL_FORMATS:
                return Verified(False, "not_image", f"unsupported image format {fmt or 'unknown'}")
            if width * height > max_pixels:
                return Verified(
                    False,
                    "too_large",
                    f"{width}x{height} pixels exceeds {max_pixels:,} (decompression bomb?)",
                )
            if decode or resize_max_side or not _ends_properly(path, fmt):
                if fmt == "JPEG":
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
            if resize_max_side and max(width, height) > resize_max_side:
                resized = img.convert("RGB") if img.mode not in ("RGB", "L") else img
                if fmt == "JPEG":
                    with Image.open(path) as full:
                        full.load()
                        resized = full.convert("RGB") if full.mode not in ("RGB", "L") else full.copy()
                resized.thumbnail((resize_max_side, resize_max_side))
                tmp = path + ".resized"
                resized.save(tmp, "JPEG" if fmt == "JPEG" else "PNG", quality=90)
                os.replace(tmp, path)
                width, height = resized.size
                fmt = "JPEG" if fmt == "JPEG" else "PNG"
    except Image.DecompressionBombError as exc:
        return Verified(False, "too_large", str(exc))
    except UnidentifiedImageError as exc:
        return Verified(False, "not_image", str(exc)[:300])
    except (OSError, SyntaxError, ValueError) as exc:
        return Verified(False, "decode_error", f"{type(exc).__name__}: {exc}"[:300])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    mime, ext = PIL_FORMATS[fmt]
    return Verified(
        True,
        width=width,
        height=height,
        mime=mime,
        ext=ext,
        sha256=digest.hexdigest(),
        size=Path(path).stat().st_size,
    )
