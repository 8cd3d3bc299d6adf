"""CPU work on downloaded files: cheap checks while the body streams, decoding in a worker process.

Every image is checked for its format and its pixel count (decompression bombs are rejected from
the header, before any decoding) and for its end marker (JPEG end-of-image, PNG IEND chunk, GIF
trailer: a truncated body still has a valid header). The hash and these header checks are worked
out from the bytes as they stream to disk (`Streamed`), so the usual image is never read back.
Decoding (JPEG draft mode), resizing and anything the streamed bytes cannot settle run in a
worker process on the file itself (`verify_image`).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

PIL_FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "GIF": ("image/gif", "gif"),
               "WEBP": ("image/webp", "webp"), "TIFF": ("image/tiff", "tif")}  # fmt: skip
OPEN_FORMATS = tuple(PIL_FORMATS)  # Pillow tries only these decoders
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b"\x3b"}
HEAD_BYTES = 1 << 18  # the header (EXIF, ICC profile, then the frame size) of nearly every photo fits
TAIL_BYTES = 1024  # the end marker sits in the last bytes of a whole file
Image.MAX_IMAGE_PIXELS = None  # max_pixels is enforced here, from the header, per call


def die_with_parent() -> None:
    """First call in every child process (image-check workers, fetch shards): on Linux, ask the
    kernel to kill this process when its parent dies, so a `kill -9` of a build leaves none behind.
    Ctrl-C reaches the whole process group: the parent stops the run, and the children go with it
    (without a traceback each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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

    def as_tuple(self) -> tuple[Any, ...]:
        """The fields in order, for sending between processes (a third of the dataclass's pickle)."""
        return tuple(self.__dict__.values())


class Streamed:
    """What the engine learns about a body while writing it: sha256, size, first and last bytes."""

    __slots__ = ("digest", "ends", "head", "size", "tail")

    def __init__(self, ends: bool = True) -> None:
        """`ends=False`: hash only (the file will be decoded from disk, so head and tail go unused)."""
        self.digest = hashlib.sha256()
        self.ends = ends
        self.head = bytearray()
        self.tail = b""
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        if not self.ends:
            return
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (self.tail + chunk)[-TAIL_BYTES:]


def _refusal(fmt: str, width: int, height: int, max_pixels: int) -> Verified | None:
    """Why a header alone rules the file out (format, pixel count), or None."""
    if fmt not in PIL_FORMATS:
        return Verified(False, "not_image", f"unsupported image format {fmt or 'unknown'}")
    if width * height > max_pixels:
        return Verified(False, "too_large", f"{width}x{height} pixels exceeds {max_pixels:,} (decompression bomb?)")
    return None


def _ends_properly(tail: bytes, fmt: str) -> bool:
    marker = END_MARKERS.get(fmt)
    return marker is not None and marker in tail


def jpeg_frame_size(head: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, found by walking its marker segments up to
    the scan, or None: then Pillow reads the header.

    Pillow's header parse (and its EXIF reading) cost 27 us of the fetch's ~0.4 ms of CPU per
    image; this walk costs 6. It answers only where Pillow would open the file with the same
    size: one 8-bit frame header of 1, 3 or 4 components and no empty side, whole quantization
    tables, no segment Pillow trips on, nothing it reads differently (padding, junk, an MPO
    index), every segment inside `head`. A test holds it to Pillow on mutated headers."""
    if not head.startswith(b"\xff\xd8\xff"):
        return None
    size, at, end = None, 2, len(head)
    while at + 4 <= end:
        marker, length = head[at + 1], head[at + 2] << 8 | head[at + 3]
        body, after = at + 4, at + 2 + length
        if head[at] != 0xFF or length < 2 or after > end:
            return None
        if marker == 0xDA:  # start of scan: the header is over (Pillow refuses an empty frame)
            return size if size and all(size) else None
        if marker in _SOF_MARKERS:
            if size is not None or length < 8 or head[body] != 8 or head[body + 5] not in (1, 3, 4):
                return None
            size = (head[body + 3] << 8 | head[body + 4], head[body + 1] << 8 | head[body + 2])
        elif marker == 0xDB:  # quantization tables: 65 or 129 bytes each, filling the segment
            table = body
            while table < after:
                table += 65 if head[table] < 16 else 129
            if table != after:
                return None
        elif not (marker in _SKIPPED_MARKERS or (0xE0 <= marker <= 0xEF and _plain_app(head, marker, body, after))):
            return None
        at = after
    return None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE})
_SKIPPED_MARKERS = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE})  # segments Pillow skips or stores whole


def _plain_app(head: bytes | bytearray, marker: int, body: int, after: int) -> bool:
    """An APPn segment Pillow reads without failing and without making the file an MPO."""
    if marker in (0xE0, 0xEE) and (head.startswith(b"JFIF", body, after) or head.startswith(b"Adobe", body, after)):
        return after - body >= 7  # Pillow reads a version number at byte 5
    if marker == 0xE2:
        return not head.startswith(b"MPF\0", body, after) and (
            after - body >= 14 or not head.startswith(b"ICC_PROFILE\0", body, after)
        )
    return not (marker == 0xED and head.startswith(b"Photoshop 3.0\0", body, after))


def settle_streamed(streamed: Streamed, max_pixels: int) -> Verified | None:
    """The header-only verdict from the streamed bytes, or None when the file must be opened
    by `verify_image`: a header past the first HEAD_BYTES, an end marker missing (decode it to
    tell a truncated file from one with data appended), or anything the header parse tripped on."""
    if (size := jpeg_frame_size(streamed.head)) is not None:
        (width, height), fmt = size, "JPEG"
    else:
        try:
            with Image.open(io.BytesIO(streamed.head), formats=OPEN_FORMATS) as img:
                width, height = img.size
                fmt = img.format or ""
        except Exception:  # a partial header or a bad file: verify_image judges the file itself
            return None
    refusal = _refusal(fmt, width, height, max_pixels)
    if refusal is not None:
        return refusal
    if not _ends_properly(streamed.tail, fmt):
        return None
    mime, ext = PIL_FORMATS[fmt]
    return Verified(True, width=width, height=height, mime=mime, ext=ext,
                    sha256=streamed.digest.hexdigest(), size=streamed.size)  # fmt: skip


def _tail_of(path: str) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - TAIL_BYTES))
        return handle.read()


def verify_image(
    path: str, max_pixels: int, resize_max_side: int | None = None, decode: bool = True, sha256: str | None = None
) -> Verified:
    """Check, optionally resize in place, and hash the file at `path` (`sha256`: its known hash).

    `decode=False` keeps every safety check (format, pixel limit from the header) and skips the
    draft decode, most of the CPU time per image, for files whose end marker is in place; a file
    without one (truncated, or data appended after the image, as motion photos do) is decoded.
    """
    try:
        with Image.open(path, formats=OPEN_FORMATS) as img:
            width, height = img.size
            fmt = img.format or ""
            refusal = _refusal(fmt, width, height, max_pixels)
            if refusal is not None:
                return refusal
            if decode or resize_max_side or not _ends_properly(_tail_of(path), fmt):
                if fmt == "JPEG":  # every coefficient is still entropy-decoded; grey skips the colour work
                    img.draft("L", (max(1, width // 8), max(1, height // 8)))
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
                sha256 = None  # the stored bytes changed
    except Image.DecompressionBombError as exc:
        return Verified(False, "too_large", str(exc))
    except UnidentifiedImageError as exc:
        return Verified(False, "not_image", str(exc)[:300])
    except (OSError, SyntaxError, ValueError) as exc:
        return Verified(False, "decode_error", f"{type(exc).__name__}: {exc}"[:300])
    if sha256 is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        sha256 = digest.hexdigest()
    mime, ext = PIL_FORMATS[fmt]
    return Verified(True, width=width, height=height, mime=mime, ext=ext, sha256=sha256, size=Path(path).stat().st_size)
