"""CPU work on downloaded files: cheap checks while the body streams, decoding in a worker process.

Every image is checked for its format and its pixel count (decompression bombs are rejected from
the header, before any decoding) and for its end marker (JPEG end-of-image, PNG IEND chunk, GIF
trailer: a truncated body still has a valid header). The hash and these header checks are worked
out from the bytes as they stream to disk (`Streamed`), so the usual image is never read back.
The decode check of a JPEG is a walk of its whole structure as libjpeg reads it
(`jpeg_decodes_cleanly`): libjpeg treats damaged entropy-coded data as a warning and decodes on,
so its fatal errors, the ones Pillow raises, all come from the marker structure, which the walk
checks at about 20 us per image against 400 us for a draft decode. Decoding (JPEG draft mode, for
anything the walk does not vouch for, and other formats), resizing and anything the streamed
bytes cannot settle run in a worker process on the file itself (`verify_image`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from gbif_assets.fetch.safety import sniff

PIL_FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "GIF": ("image/gif", "gif"),
               "WEBP": ("image/webp", "webp"), "TIFF": ("image/tiff", "tif")}  # fmt: skip
OPEN_FORMATS = tuple(PIL_FORMATS)  # Pillow tries only these decoders
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b"\x3b"}
HEAD_BYTES = 1 << 18  # the header (EXIF, ICC profile, then the frame size) of nearly every photo fits
TAIL_BYTES = 1024  # the end marker sits in the last bytes of a whole file
MAX_SCANS = 500  # scans per JPEG at most, as libjpeg-turbo's own fuzzers limit them (photos have ~10)
BODY_BYTES = 1 << 21  # bodies up to this size are kept in memory for the JPEG checks; larger ones are read from disk
Image.MAX_IMAGE_PIXELS = None  # max_pixels is enforced here, from the header, per call
Formats = tuple[str, ...] | None  # the MIME types a recipe keeps (filters.formats); None: every one above


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
    """What the engine learns about a body while writing it: sha256, size, first and last bytes,
    and (`keep=True`) the whole body while it stays within BODY_BYTES, for the JPEG walk and the
    scan count.

    A kept body is its own head and tail: its chunks are held, not copied (a copy of every body
    cost 5 us of the 2 cores' per-image budget); past BODY_BYTES, head and tail are cut from them
    and the streaming carries on as without `keep`."""

    __slots__ = ("_head", "_tail", "chunks", "digest", "ends", "size")

    def __init__(self, ends: bool = True, keep: bool = False) -> None:
        """`ends=False`: hash only (the file will be checked from disk, so head and tail go unused)."""
        self.digest = hashlib.sha256()
        self.ends = ends
        self._head = bytearray()
        self._tail = b""
        self.size = 0
        self.chunks: list[bytes] | None = [] if keep and ends else None

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        if self.chunks is not None:
            if self.size <= BODY_BYTES:
                self.chunks.append(chunk)
                return
            kept, self.chunks = self.chunks, None
            for piece in kept:
                self._edges(piece)
        if self.ends:
            self._edges(chunk)

    def _edges(self, chunk: bytes) -> None:
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self._tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (self._tail + chunk)[-TAIL_BYTES:]

    @property
    def head(self) -> bytes | bytearray:
        """The first HEAD_BYTES (or fewer) of the body."""
        body = self.body()
        return self._head if body is None else body[:HEAD_BYTES]  # a whole-bytes slice is no copy

    @property
    def tail(self) -> bytes:
        """The last TAIL_BYTES (or fewer) of the body."""
        body = self.body()
        return self._tail if body is None else body[-TAIL_BYTES:]

    def body(self) -> bytes | None:
        """The whole body, when it was kept (one chunk is returned as it is, not copied)."""
        if self.chunks is None:
            return None
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""


def _refusal(
    fmt: str, width: int, height: int, max_pixels: int, mode: str | None = None, formats: Formats = None
) -> Verified | None:
    """Why a header alone rules the file out (format, one the recipe's `formats` leaves out,
    pixel count, a colour mode Pillow cannot convert to RGB and L), or None."""
    if fmt not in PIL_FORMATS:
        return Verified(False, "not_image", f"unsupported image format {fmt or 'unknown'}")
    if formats and (mime := PIL_FORMATS[fmt][0]) not in formats:
        return Verified(False, "unwanted_format", f"{mime} is not in filters.formats ({', '.join(formats)})")
    if width * height > max_pixels:
        return Verified(False, "too_large", f"{width}x{height} pixels exceeds {max_pixels:,} (decompression bomb?)")
    if mode is not None and not _converts(mode):
        return Verified(False, "decode_error", f"colour mode {mode}: Pillow cannot convert it to both RGB and L")
    return None


@functools.lru_cache(maxsize=64)
def _converts(mode: str) -> bool:
    """Whether Pillow converts an image of this mode to RGB and to L, as training loaders and the
    near-duplicate hash ask: a LAB TIFF decodes, and then fails there."""
    try:
        Image.new(mode, (1, 1)).convert("RGB")
        Image.new(mode, (1, 1)).convert("L")
    except (ValueError, OSError, KeyError):
        return False
    return True


def _ends_properly(tail: bytes, fmt: str) -> bool:
    marker = END_MARKERS.get(fmt)
    return marker is not None and marker in tail


def jpeg_frame_size(head: bytes | bytearray) -> tuple[int, int, bool] | None:
    """(width, height, progressive?) from a JPEG's frame header, found by walking its marker
    segments up to the scan, or None: then Pillow reads the header.

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
            return size if size and size[0] and size[1] else None
        if marker in _SOF_MARKERS:
            if size is not None or length < 8 or head[body] != 8 or head[body + 5] not in (1, 3, 4):
                return None
            size = (head[body + 3] << 8 | head[body + 4], head[body + 1] << 8 | head[body + 2], marker in _PROGRESSIVE)
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
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})  # the frames Pillow calls progressive: the ones with many scans
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


_HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive: the Huffman frames libjpeg decodes
_TABLE_SEGMENTS = frozenset({0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})  # allowed between scans
# in entropy-coded data, FF 00 is a data byte; any other FF starts a marker
_SCAN_END = re.compile(rb"\xff[^\x00]|\xff\Z")


Frame = tuple[bool, tuple[tuple[int, int, int, int], ...]]  # progressive?, (id, h, v, quantization table) per component


@functools.lru_cache(maxsize=256)
def _huffman_tables(segment: bytes) -> tuple[int, int] | None:
    """The DC and AC table numbers a DHT segment's body defines (bit masks), or None where
    libjpeg's `get_dht` and `jpeg_make_d_derived_tbl` would stop: a bad class or number, more than
    256 codes, a code set that overflows its lengths (the all-ones code included), or a DC symbol
    above 11. Cached, as the other segment checks: most images repeat their encoder's tables."""
    masks, at = [0, 0], 0
    while at < len(segment):
        if at + 17 > len(segment) or segment[at] >> 4 > 1 or segment[at] & 0x0F > 3:
            return None
        counts = segment[at + 1 : at + 17]
        total = sum(counts)
        if at + 17 + total > len(segment):
            return None
        code = 0
        for length, count in enumerate(counts, 1):
            code += count
            if code >= 1 << length:
                return None
            code <<= 1
        if segment[at] >> 4 == 0 and max(segment[at + 17 : at + 17 + total], default=0) > 11:
            return None
        masks[segment[at] >> 4] |= 1 << (segment[at] & 0x0F)
        at += 17 + total
    return masks[0], masks[1]


@functools.lru_cache(maxsize=256)
def _quant_tables(segment: bytes) -> int | None:
    """The table numbers a DQT segment's body defines (a bit mask; 8- or 16-bit tables 0-3
    filling it), or None."""
    mask, at = 0, 0
    while at < len(segment):
        if segment[at] >> 4 > 1 or segment[at] & 0x0F > 3:
            return None
        mask |= 1 << (segment[at] & 0x0F)
        at += 65 if segment[at] >> 4 == 0 else 129
    return mask if at == len(segment) else None


@functools.lru_cache(maxsize=256)
def _frame(marker: int, segment: bytes) -> Frame | None:
    """A Huffman frame header libjpeg decodes: 8 bits, a size, 1, 3 or 4 distinct components
    with tables 0-3 and sampling factors of 1-4 whose ratios to the largest are whole."""
    if len(segment) < 6 or segment[0] != 8 or not (segment[1] | segment[2]) or not (segment[3] | segment[4]):
        return None
    count = segment[5]
    if count not in (1, 3, 4) or len(segment) != 6 + 3 * count:
        return None
    components = tuple(
        (cid, hv >> 4, hv & 0x0F, tq) for cid, hv, tq in (segment[6 + 3 * c : 9 + 3 * c] for c in range(count))
    )
    if len({c[0] for c in components}) != count or any(
        not (1 <= h <= 4 and 1 <= v <= 4) or tq > 3 for _, h, v, tq in components
    ):
        return None
    most_h, most_v = max(c[1] for c in components), max(c[2] for c in components)
    if any(most_h % h or most_v % v for _, h, v, _ in components):
        return None
    return marker == 0xC2, components


@functools.lru_cache(maxsize=256)
def _scan_ok(header: bytes, frame: Frame, first: bool, dc: int, ac: int, quant: int) -> bool:
    """A start-of-scan header libjpeg accepts (`jdinput`, `jdphuff`), whose Huffman and
    quantization tables (bit masks) are defined; a sequential frame has one scan of every component."""
    progressive, components = frame
    count = header[0] if header else 0
    if not 1 <= count <= 4 or len(header) != 4 + 2 * count:
        return False
    by_id = {cid: (h, v, tq) for cid, h, v, tq in components}
    ids, tables = header[1 : 1 + 2 * count : 2], header[2 : 2 + 2 * count : 2]
    start, stop, approximation = header[-3:]
    high, low = approximation >> 4, approximation & 0x0F
    if len(set(ids)) != count or any(i not in by_id or not quant >> by_id[i][2] & 1 for i in ids):
        return False
    if count > 1 and sum(by_id[i][0] * by_id[i][1] for i in ids) > 10:  # blocks per MCU
        return False
    if not progressive:
        return (first and count == len(components) and (start, stop, approximation) == (0, 63, 0)
                and all(dc >> (t >> 4) & 1 and ac >> (t & 0x0F) & 1 for t in tables))  # fmt: skip
    if start == 0:
        tables_ok = stop == 0 and (high > 0 or all(dc >> (t >> 4) & 1 for t in tables))
    else:
        tables_ok = start <= stop <= 63 and count == 1 and all(ac >> (t & 0x0F) & 1 for t in tables)
    return tables_ok and (not high or low == high - 1) and low <= 13


def jpeg_decodes_cleanly(data: bytes) -> bool:
    """True when libjpeg will decode `data` to its end without a fatal error, so Pillow will
    not raise; False means "not vouched for" (decode it to know), not "broken".

    libjpeg only warns about damaged entropy-coded data (it decodes the rest as grey), so what
    stops a decode is the marker structure: this walks every segment and every scan as libjpeg
    reads them, and vouches only for the plain case. Huffman frame (baseline, extended or
    progressive) of 8 bits; tables well formed, defined before a scan uses them; scans whose
    components and parameters libjpeg accepts; nothing but restart markers inside the scans (and
    those only after DRI); no fill bytes, no unknown segment; the end-of-image marker last. A test
    holds it to Pillow's full and draft decodes on seeded mutations of real JPEGs."""
    if not data.startswith(b"\xff\xd8"):
        return False
    end, at, scans, restart = len(data), 2, 0, 0
    frame: Frame | None = None
    dc = ac = quant = 0  # the tables defined so far, as bit masks
    while at + 2 <= end and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xD9:
            return scans > 0 and at + 2 == end
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        body, after = at + 4, at + 2 + length
        if length < 2 or after > end:
            return False
        if marker == 0xDA:
            if frame is None or scans >= MAX_SCANS or not _scan_ok(data[body:after], frame, not scans, dc, ac, quant):
                return False
            scans += 1
            at = after
            while (found := _SCAN_END.search(data, at)) is not None:  # the entropy-coded data
                at = found.start()
                if not (restart and at + 1 < end and 0xD0 <= data[at + 1] <= 0xD7):
                    break
                at += 2
            if found is None:
                return False
            continue
        if marker == 0xC4:
            if (tables := _huffman_tables(data[body:after])) is None:
                return False
            dc, ac = dc | tables[0], ac | tables[1]
        elif marker == 0xDB:
            if (numbers := _quant_tables(data[body:after])) is None:
                return False
            quant |= numbers
        elif marker in _HUFFMAN_FRAMES:
            if frame is not None or (frame := _frame(marker, data[body:after])) is None:
                return False
        elif marker == 0xDD:
            if length != 4:
                return False
            restart = data[body] << 8 | data[body + 1]
        elif marker not in _TABLE_SEGMENTS:
            return False
        at = after
    return False


def settle_streamed(
    streamed: Streamed, max_pixels: int, decode: bool = False, formats: Formats = None
) -> Verified | None:
    """The verdict from the streamed bytes, or None when the file must be opened by
    `verify_image`: a header past the first HEAD_BYTES, an end marker missing (decode it to tell a
    truncated file from one with data appended), anything the header parse tripped on, a
    progressive JPEG too large to keep (its scans are counted from disk), and with `decode`,
    anything but a kept JPEG body that `jpeg_decodes_cleanly` vouches for."""
    if (frame := jpeg_frame_size(streamed.head)) is not None:
        (width, height, progressive), fmt = frame, "JPEG"
    else:
        try:
            with Image.open(io.BytesIO(streamed.head), formats=OPEN_FORMATS) as img:
                width, height = img.size
                fmt, mode = img.format or "", img.mode
                progressive = bool(img.info.get("progressive") or img.info.get("progression"))
        except Exception:  # a partial header or a bad file: verify_image judges the file itself
            return None
        refusal = _refusal(fmt, width, height, max_pixels, mode)
        if refusal is not None:
            return refusal
    refusal = _refusal(fmt, width, height, max_pixels, formats=formats)
    if refusal is not None:
        return refusal
    if decode:
        body = streamed.body() if fmt == "JPEG" else None
        if body is None or not jpeg_decodes_cleanly(body):
            return None
    elif not _ends_properly(streamed.tail, fmt):
        return None
    elif fmt == "JPEG" and progressive:  # only a progressive frame holds many scans: count them (a tarpit)
        body = streamed.body()
        if body is None or (refusal := _too_many_scans(body)) is not None:
            return refusal
    mime, ext = PIL_FORMATS[fmt]
    return Verified(True, width=width, height=height, mime=mime, ext=ext,
                    sha256=streamed.digest.hexdigest(), size=streamed.size)  # fmt: skip


def _needs_decode(path: str, fmt: str, decode: bool, jpeg: bytes | None) -> bool:
    """Whether the file must be decoded to be judged (`jpeg`: its bytes, when it is one): with
    `decode`, unless the JPEG walk vouches for it; without, when its end marker is missing
    (truncated, or data appended after the image)."""
    if decode:
        return jpeg is None or not jpeg_decodes_cleanly(jpeg)
    if jpeg is not None:
        return not _ends_properly(jpeg[-TAIL_BYTES:], fmt)
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - TAIL_BYTES))
        return not _ends_properly(handle.read(), fmt)


def _too_many_scans(jpeg: bytes) -> Verified | None:
    """A JPEG split into more scans than MAX_SCANS: a decoding tarpit (a few MB that take minutes
    of CPU to decode, in the check and in every training epoch), refused before any decode. The
    count of scan markers may include a few from embedded thumbnails; real photos have at most a
    few dozen."""
    scans = jpeg.count(b"\xff\xda")
    if scans <= MAX_SCANS:
        return None
    return Verified(False, "decode_error", f"{scans:,} scan markers, more than {MAX_SCANS} (decoding it takes minutes)")


def verify_image(
    path: str,
    max_pixels: int,
    resize_max_side: int | None = None,
    decode: bool = True,
    sha256: str | None = None,
    formats: Formats = None,
) -> Verified:
    """Check, optionally resize in place, and hash the file at `path` (`sha256`: its known hash).

    `decode=True` decodes what `jpeg_decodes_cleanly` does not vouch for (a JPEG it does is as
    good as decoded); `decode=False` keeps every safety check (format, pixel limit from the
    header) and decodes only files whose end marker is missing (truncated, or data appended after
    the image, as motion photos do).
    """
    try:
        with Image.open(path, formats=OPEN_FORMATS) as img:
            width, height = img.size
            fmt = img.format or ""
            jpeg = Path(path).read_bytes() if fmt == "JPEG" else None
            refusal = _refusal(fmt, width, height, max_pixels, img.mode, formats)
            if refusal is None and jpeg is not None:
                refusal = _too_many_scans(jpeg)
            if refusal is not None:
                return refusal
            if resize_max_side or _needs_decode(path, fmt, decode, jpeg):
                if fmt == "JPEG":  # every coefficient is still entropy-decoded; grey skips the colour work
                    img.draft("L", (max(1, width // 8), max(1, height // 8)))
                img.load()
            if resize_max_side and max(width, height) > resize_max_side:
                resized = img.convert("RGB") if img.mode not in ("RGB", "L") else img
                if fmt == "JPEG":
                    with Image.open(path) as full:
                        full.load()
                        resized = full.convert("RGB") if full.mode not in ("RGB", "L") else full.copy()
                # upright (the copy keeps no EXIF, so its orientation tag is applied to the pixels),
                # its colour profile kept, its comment and other metadata dropped
                icc_profile = resized.info.get("icc_profile")
                resized = ImageOps.exif_transpose(resized)
                resized.info.pop("comment", None)
                resized.thumbnail((resize_max_side, resize_max_side))
                tmp = path + ".resized"
                resized.save(tmp, "JPEG" if fmt == "JPEG" else "PNG", quality=90, icc_profile=icc_profile)
                os.replace(tmp, path)
                width, height = resized.size
                fmt = "JPEG" if fmt == "JPEG" else "PNG"
                sha256 = None  # the stored bytes changed
    except Image.DecompressionBombError as exc:
        return Verified(False, "too_large", str(exc))
    except UnidentifiedImageError:
        with open(path, "rb") as handle:
            kind = sniff(handle.read(16))
        if kind is not None:  # it starts as an image: a damaged one, not another kind of file
            return Verified(False, "decode_error", f"a damaged {kind[0]}: no image reader accepts its header")
        return Verified(False, "not_image", "not an image format this client keeps")
    except (OSError, SyntaxError, ValueError) as exc:  # the message names the file: a temporary path, so left out
        return Verified(False, "decode_error", f"{type(exc).__name__}: {str(exc).replace(path, 'the file')}"[:300])
    if sha256 is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        sha256 = digest.hexdigest()
    mime, ext = PIL_FORMATS[fmt]
    return Verified(True, width=width, height=height, mime=mime, ext=ext, sha256=sha256, size=Path(path).stat().st_size)
