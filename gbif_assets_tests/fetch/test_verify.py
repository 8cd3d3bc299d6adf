"""Image checks on real files: what a header-only check must still catch, and what it must not reject."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from gbif_assets.emulator.imagehosts import bomb_jpeg, image_bytes
from gbif_assets.fetch.verify import (
    BODY_BYTES,
    HEAD_BYTES,
    MAX_SCANS,
    OPEN_FORMATS,
    Streamed,
    Verified,
    jpeg_decodes_cleanly,
    jpeg_frame_size,
    settle_streamed,
    verify_image,
)
from gbif_assets.fetch.workers import VerifyPool

MAX_PIXELS = 89_478_485


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_a_whole_image_passes_and_is_hashed(tmp_path: Path, decode: bool, kind: str) -> None:
    data = image_bytes("https://h/a.jpg") if kind == "jpeg" else _png()
    path = tmp_path / "f"
    path.write_bytes(data)
    verified = verify_image(str(path), MAX_PIXELS, decode=decode)
    assert verified.ok and verified.size == len(data) and verified.ext == ("jpg" if kind == "jpeg" else "png")
    assert verified.width > 0 and len(verified.sha256 or "") == 64


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_a_truncated_image_is_a_decode_error_even_without_decode(tmp_path: Path, decode: bool, kind: str) -> None:
    data = image_bytes("https://h/b.jpg") if kind == "jpeg" else _png()
    path = tmp_path / "f"
    path.write_bytes(data[: len(data) * 2 // 3])
    verified = verify_image(str(path), MAX_PIXELS, decode=decode)
    assert not verified.ok and verified.error == "decode_error"


@pytest.mark.parametrize("decode", [True, False])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path, decode: bool) -> None:
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb_jpeg())
    verified = verify_image(str(path), MAX_PIXELS, decode=decode)
    assert not verified.ok and verified.error == "too_large" and "60000x60000" in (verified.detail or "")


@pytest.mark.parametrize("decode", [True, False])
def test_a_broken_scan_behind_a_good_end_marker_is_caught_only_by_the_decode(tmp_path: Path, decode: bool) -> None:
    """What `decode_check` buys: a frame marker in the middle of the scan data, with the header and
    the end marker intact, passes the header check and fails the (greyscale draft) decode."""
    data = image_bytes("https://h/e.jpg")
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    path = tmp_path / "broken.jpg"
    path.write_bytes(data[:middle] + b"\xff\xc0\x00\x11" + data[middle + 4 :])
    verified = verify_image(str(path), MAX_PIXELS, decode=decode)
    assert verified.ok is not decode
    if decode:
        assert verified.error == "decode_error" and "broken data stream" in (verified.detail or "")


def test_data_appended_after_the_image_is_decoded_not_rejected(tmp_path: Path) -> None:
    """Motion photos append a video after the JPEG's end marker: a valid image, so it is decoded to be sure."""
    path = tmp_path / "motion.jpg"
    path.write_bytes(image_bytes("https://h/c.jpg") + b"ftypmp42" + bytes(4096))
    assert verify_image(str(path), MAX_PIXELS, decode=False).ok


@pytest.mark.parametrize("decode", [True, False])
def test_a_colour_mode_loaders_cannot_convert_is_refused(tmp_path: Path, decode: bool) -> None:
    """A LAB TIFF decodes, and then made the near-duplicate hash (convert('L')) fail the whole
    image_metadata step; a grey loader would fail on it the same way. Streamed or from disk."""
    buffer = io.BytesIO()
    Image.new("LAB", (64, 64)).save(buffer, "TIFF")
    path = tmp_path / "lab.tif"
    path.write_bytes(buffer.getvalue())
    streamed = settle_streamed(_streamed(buffer.getvalue(), keep=decode), MAX_PIXELS, decode=decode)
    for verified in (verify_image(str(path), MAX_PIXELS, decode=decode), streamed):
        assert verified is not None and verified.error == "decode_error" and "LAB" in (verified.detail or "")


def _tarpit(scans: int, junk: bytes = b"") -> bytes:
    """A 2000 x 2000 grey progressive JPEG whose last scan is repeated: a few KB per hundred scans,
    and each scan costs a pass over every block to decode (a decoding tarpit)."""
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    end = len(data) - 2  # the end-of-image marker
    return data[:end] + data[last:end] * (scans - data.count(b"\xff\xda")) + data[end:] + junk


@pytest.mark.parametrize("decode", [True, False])
def test_a_jpeg_split_into_too_many_scans_is_refused_before_any_decode(tmp_path: Path, decode: bool) -> None:
    """From disk and from the streamed bytes, decode check on or off: with it off, the image
    would otherwise be kept, and its first decode (the near-duplicate hash, a training loader)
    would take minutes."""
    path = tmp_path / "tarpit.jpg"
    path.write_bytes(_tarpit(MAX_SCANS + 100))
    assert not jpeg_decodes_cleanly(path.read_bytes())  # not vouched for: the worker judges it
    started = time.process_time()
    verified = verify_image(str(path), MAX_PIXELS, decode=decode)
    assert verified.error == "decode_error" and "scan markers" in (verified.detail or "")
    assert time.process_time() - started < 0.5
    streamed = settle_streamed(_streamed(path.read_bytes(), keep=True), MAX_PIXELS, decode=decode)
    if decode:
        assert streamed is None  # not vouched for: left to verify_image, as above
    else:
        assert streamed is not None and streamed.error == "decode_error" and "scan markers" in (streamed.detail or "")
    data, comment = _tarpit(MAX_SCANS + 100), b"\xff\xfe\xff\xff" + b"c" * 65_533
    big = data[:-2] + comment * (BODY_BYTES // len(comment) + 1) + data[-2:]  # too large to keep
    assert settle_streamed(_streamed(big, keep=True), MAX_PIXELS, decode=False) is None  # counted from disk


def test_html_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "page.jpg"
    path.write_bytes(b"<!doctype html><html><body>Not found</body></html>")
    verified = verify_image(str(path), MAX_PIXELS, decode=False)
    assert not verified.ok and verified.error == "not_image"


def test_engine_without_decode_still_refuses_every_fake_image(hosts, tmp_path: Path) -> None:
    """`download.decode_check: false` against real hosts: whole images kept, HTML, bombs and cut bodies refused."""
    import asyncio

    from gbif_assets.fetch import Candidate, FetchConfig, FetchEngine

    expected = {"ok": None, "html": "not_image", "truncate": "truncated", "bomb": "too_large", "redirect": None}
    streams = {
        name: ([Candidate(url := f"{hosts.base_urls[name]}/photos/{name}/1.jpg",
                          hashlib.sha1(url.encode()).hexdigest(), "1", name, 1, True, tmp_path / name)], 1)
        for name in expected
    }  # fmt: skip
    config = FetchConfig(allow_private_hosts=True, retries=1, timeout_s=2, backoff_base_s=0.05,
                         gbif_image_cache_fallback=False, decode_check=False)  # fmt: skip
    engine = FetchEngine(config)
    asyncio.run(engine.run(streams))
    assert {o.candidate.stream: o.error for o in engine.outcomes} == expected
    kept = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(kept) == 2 and all(verify_image(str(p), MAX_PIXELS).ok for p in kept)


def _streamed(data: bytes, chunk: int = 65_536, keep: bool = False) -> Streamed:
    streamed = Streamed(keep=keep)
    for start in range(0, len(data), chunk):
        streamed.update(data[start : start + chunk])
    return streamed


@pytest.mark.parametrize("chunk", [1, 1000, 65_536])
def test_streamed_bytes_settle_a_whole_image_as_the_file_check_does(tmp_path: Path, chunk: int) -> None:
    data = image_bytes("https://h/d.jpg")
    path = tmp_path / "f"
    path.write_bytes(data)
    settled = settle_streamed(_streamed(data, chunk), MAX_PIXELS)
    assert settled == verify_image(str(path), MAX_PIXELS, decode=False)
    assert settled is not None and settled.ok and settled.sha256 == hashlib.sha256(data).hexdigest()


def test_streamed_bytes_refuse_a_bomb_and_leave_doubtful_files_to_the_file_check() -> None:
    bomb = settle_streamed(_streamed(bomb_jpeg()), MAX_PIXELS)
    assert bomb is not None and bomb.error == "too_large"
    data = image_bytes("https://h/e.jpg")
    assert settle_streamed(_streamed(data[: len(data) // 2]), MAX_PIXELS) is None  # no end marker: decode it
    assert settle_streamed(_streamed(b"<html>" + data), MAX_PIXELS) is None  # not an image: judged on the file


def _jpegs() -> list[bytes]:
    """JPEGs with the header segments and the scan layouts photos carry: JFIF, EXIF, ICC, Adobe,
    comments; 4:2:0, 4:2:2, 4:4:4, progressive, restart markers, grey, CMYK."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0128], exif[0x011A] = "Camera", 2, 300.0
    variants = [
        ("RGB", {"exif": exif.tobytes(), "icc_profile": bytes(range(256)) * 8, "quality": 90}),
        ("RGB", {"progressive": True, "optimize": True, "comment": b"field photo", "dpi": (300, 300)}),
        ("RGB", {"restart_marker_blocks": 1, "xmp": b"<x:xmpmeta/>"}),
        ("RGB", {"progressive": True, "restart_marker_rows": 1, "subsampling": 1}),
        ("RGB", {"subsampling": 0, "quality": 95}),
        ("L", {}),
        ("L", {"progressive": True}),
        ("CMYK", {}),
    ]
    noise = Image.effect_noise((97, 61), 60)  # a busy picture: scan data with FF bytes and every code length
    picture = Image.merge(
        "RGB", (noise, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", (97, 61), 90))
    )
    made = [image_bytes("https://h/walk.jpg")]
    for mode, options in variants:
        buffer = io.BytesIO()
        picture.convert(mode).save(buffer, "JPEG", **options)
        made.append(buffer.getvalue())
    return made


def _mutated(data: bytes, rng: random.Random) -> bytes:
    """One damage to the header: a byte changed, a cut, or a segment dropped or doubled."""
    scan = data.index(b"\xff\xda") + 14
    at = rng.randrange(2, scan)
    kind = rng.randrange(4)
    if kind == 0:
        return data[:at] + bytes([rng.choice([0x00, 0xFF, data[at] ^ 1, rng.randrange(256)])]) + data[at + 1 :]
    if kind == 1:
        return data[:at]
    starts = [i for i in range(2, scan) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]
    first = rng.choice(starts)
    segment = data[first : first + 2 + int.from_bytes(data[first + 2 : first + 4], "big")]
    rest = data[first + len(segment) :]
    return data[:first] + (segment + segment if kind == 2 else b"") + rest


def _progressive(img: Image.Image) -> bool:
    return bool(img.info.get("progressive"))


def test_the_jpeg_header_walk_answers_only_where_pillow_reads_the_same_size() -> None:
    """The fast header walk stands in for Pillow's parse on the fetch path (decode off), so it
    must never pass a header Pillow would refuse or read another size from; on doubt it says None
    and Pillow decides. Seeded mutations of real headers hold it to that."""
    rng, answered, tried = random.Random(5), 0, 0
    for data in _jpegs():
        with Image.open(io.BytesIO(data)) as img:
            assert jpeg_frame_size(data) == (*img.size, _progressive(img))  # the usual photo takes the fast path
        for _ in range(400):
            damaged = _mutated(data, rng)
            frame = jpeg_frame_size(damaged)
            tried += 1
            if frame is None:
                continue
            answered += 1
            with Image.open(io.BytesIO(damaged), formats=OPEN_FORMATS) as img:
                assert (img.format, *img.size, _progressive(img)) == ("JPEG", *frame), damaged[:64]
    assert answered > tried // 5  # the property was tested, not dodged


def _damaged_anywhere(data: bytes, rng: random.Random) -> bytes:
    """One to three damages anywhere in the file: a byte changed or flipped, a marker put in, bytes
    dropped or repeated, an end marker after a cut."""
    damaged = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        at, kind = rng.randrange(2, len(damaged) - 2), rng.randrange(6)
        if kind == 0:
            damaged[at] = rng.randrange(256)
        elif kind == 1:
            damaged[at] ^= 1 << rng.randrange(8)
        elif kind == 2:
            damaged[at:at] = bytes((0xFF, rng.randrange(256)))
        elif kind == 3:
            del damaged[at : at + rng.randrange(1, 64)]
        elif kind == 4:
            damaged[at:at] = damaged[rng.randrange(len(damaged)) :][: rng.randrange(1, 40)]
        else:
            damaged[at:] = b"\xff\xd9"
    return bytes(damaged)


def _opens(data: bytes) -> bool:
    """Whether the header passes, as on the fetch path (Pillow's open; the frame walk answers only
    where Pillow agrees)."""
    try:
        with Image.open(io.BytesIO(data), formats=OPEN_FORMATS):
            return True
    except Exception:
        return False


def _decodes(data: bytes, draft: bool) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if draft:
                img.draft("L", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception:
        return False
    return True


@pytest.mark.filterwarnings("ignore:Corrupt EXIF:UserWarning", "ignore:Tag data larger:UserWarning")
def test_the_jpeg_walk_vouches_only_for_files_pillow_decodes() -> None:
    """With `decode_check` on, a JPEG whose header passed (the frame walk or Pillow's open) and
    that the walk vouches for is kept without a decode: so none of those may fail Pillow's decode,
    full or draft. Seeded damage anywhere in real JPEGs of every layout holds it to that. (A file
    Pillow cannot open, a damaged EXIF or Photoshop segment say, is refused at the header.)"""
    rng, vouched, broken = random.Random(11), 0, 0
    for data in _jpegs():
        assert jpeg_decodes_cleanly(data)  # every clean layout takes the fast path
        for _ in range(500):
            damaged = _damaged_anywhere(data, rng)
            if jpeg_decodes_cleanly(damaged) and _opens(damaged):
                vouched += 1
                assert _decodes(damaged, draft=False) and _decodes(damaged, draft=True), damaged[:64]
            elif not _decodes(damaged, draft=False):
                broken += 1
    assert vouched > 1500 and broken > 500  # the property was tested on both sides, not dodged


def test_damaged_scan_data_decodes_so_the_walk_need_not_read_it() -> None:
    """Why a walk of the structure is as good as a decode: libjpeg only warns about damaged
    entropy-coded data (and Pillow does not raise), so it is the markers that stop a decode."""
    data = bytearray(_jpegs()[5])
    rng, scan = random.Random(3), data.index(b"\xff\xda") + 20
    for at in rng.sample(range(scan, len(data) - 4), 200):
        if 0xFF not in data[at - 1 : at + 2]:
            data[at] = rng.choice([b for b in range(255) if b != data[at]])
    assert jpeg_decodes_cleanly(bytes(data)) and _decodes(bytes(data), draft=False)


def test_with_the_decode_check_streamed_jpegs_are_settled_by_the_walk(tmp_path: Path) -> None:
    """decode_check on: a kept JPEG body the walk vouches for needs no worker; anything else (a
    PNG, a broken scan, a body past BODY_BYTES) is left to the decode on the file."""
    data = image_bytes("https://h/kept.jpg")
    settled = settle_streamed(_streamed(data, 1000, keep=True), MAX_PIXELS, decode=True)
    assert settled is not None and settled.ok and settled.sha256 == hashlib.sha256(data).hexdigest()
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    broken = data[:middle] + b"\xff\xc0\x00\x11" + data[middle + 4 :]
    comments = b"".join(b"\xff\xfe\xff\xff" + bytes(65_533) for _ in range(BODY_BYTES // 65_000))
    large = data[:2] + comments + data[2:]
    for doubtful in (_png(), broken, large):
        assert settle_streamed(_streamed(doubtful, keep=True), MAX_PIXELS, decode=True) is None
    path = tmp_path / "large.jpg"
    path.write_bytes(large)
    assert verify_image(str(path), MAX_PIXELS, decode=True).ok  # walked from disk


def test_headers_the_walk_leaves_to_pillow() -> None:
    data = image_bytes("https://h/leave.jpg")
    sof = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] == 0xC0)
    segment = data[sof : sof + 2 + int.from_bytes(data[sof + 2 : sof + 4], "big")]
    two_frames = data[:sof] + segment + data[sof:]
    mpo = data[:2] + b"\xff\xe2\x00\x08MPF\x00\x00\x00" + data[2:]
    twelve_bit = data[: sof + 4] + b"\x0c" + data[sof + 5 :]
    padded = data[:sof] + b"\xff" + data[sof:]
    for damaged in (two_frames, mpo, twelve_bit, padded, data[: sof + 6]):
        assert jpeg_frame_size(damaged) is None


def test_a_header_past_the_streamed_head_is_judged_on_the_file(tmp_path: Path) -> None:
    """A photo whose metadata segments fill more than HEAD_BYTES before the frame header."""
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", icc_profile=bytes(HEAD_BYTES + 10_000))  # split into several APP2 segments
    data = buffer.getvalue()
    assert settle_streamed(_streamed(data), MAX_PIXELS) is None
    path = tmp_path / "f.jpg"
    path.write_bytes(data)
    verified = verify_image(str(path), MAX_PIXELS, decode=False)
    assert verified.ok and (verified.width, verified.height) == (40, 30)


def _worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "gbif_assets.fetch.workers" in cmdline and cmdline.endswith(f"--parent {os.getpid()}"):
            pids.append(int(entry.name))
    return pids


def test_a_worker_that_dies_is_replaced_and_the_files_it_held_are_checked_again(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.effect_noise((2000, 1500), 64).convert("RGB").save(big, "PNG")  # decoded in the worker

    async def main() -> tuple[list[Verified], Verified, int]:
        pool = VerifyPool(1)
        checks = [asyncio.create_task(pool.verify(str(big), MAX_PIXELS, None, True, None)) for _ in range(40)]
        while not _worker_pids():
            await asyncio.sleep(0.01)
        first = _worker_pids()[0]
        await asyncio.sleep(0.1)  # some checks done, most still queued in the worker
        os.kill(first, signal.SIGKILL)
        verdicts = await asyncio.gather(*checks)
        after = await pool.verify(str(big), MAX_PIXELS, None, True, None)
        replaced = [pid for pid in _worker_pids() if pid != first]
        await pool.close()
        return verdicts, after, len(replaced)

    verdicts, after, replaced = asyncio.run(main())
    assert all(v.ok for v in verdicts)  # the killed worker's files were checked on its replacement
    assert after.ok and replaced == 1
    assert _worker_pids() == []  # closing the pool ends its workers


def test_a_check_past_its_cpu_budget_stops_its_worker_and_fails_only_that_file(tmp_path: Path) -> None:
    """A tarpit under the scan limit, with bytes after its end so that the walk leaves it to a
    decode: one C call of over a second, which no signal interrupts. The worker's watchdog fails
    it and stops the worker; the images beside it are kept."""
    tarpit, good = tmp_path / "tarpit.jpg", tmp_path / "good.jpg"
    tarpit.write_bytes(_tarpit(MAX_SCANS - 10, junk=b"junk"))
    good.write_bytes(image_bytes("https://h/good.jpg"))

    async def main() -> list[Verified]:
        pool = VerifyPool(1, check_cpu_s=0.3)
        paths = [good, tarpit, good, good]
        verdicts = await asyncio.gather(*(pool.verify(str(p), MAX_PIXELS, None, True, None) for p in paths))
        await pool.close()
        return verdicts

    started = time.monotonic()
    good_one, slow, *rest = asyncio.run(main())
    assert good_one.ok and all(v.ok for v in rest)
    assert slow.error == "decode_error" and "more than 0.3 s of CPU" in (slow.detail or "")
    assert time.monotonic() - started < 5  # the budget and a new worker's start, not the decode's time


def test_a_resized_copy_is_upright_keeps_its_colour_profile_and_drops_the_rest(tmp_path: Path) -> None:
    """A phone photo stored sideways with an EXIF orientation, a colour profile and a large comment:
    the small copy keeps no EXIF, so the rotation goes into its pixels; the comment would make it
    nearly as large as the original."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    icc = b"\0" * 128
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (400, 200), "green").save(
        path, "JPEG", exif=exif.tobytes(), icc_profile=icc, comment=b"x" * 50_000, quality=90
    )
    verified = verify_image(str(path), 10**8, resize_max_side=64)
    assert verified.ok and (verified.width, verified.height) == (32, 64)  # upright: portrait
    with Image.open(path) as small:
        assert small.size == (32, 64)
        assert small.info.get("icc_profile") == icc
        assert "comment" not in small.info and not small.getexif().get(0x0112)
    assert path.stat().st_size < 5_000


def test_formats_refuse_other_image_formats_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    refused = verify_image(str(path), MAX_PIXELS, formats=("image/jpeg",))
    assert not refused.ok and refused.error == "unwanted_format"
    assert verify_image(str(path), MAX_PIXELS, formats=("image/jpeg", "image/png")).ok
    jpeg = image_bytes("http://example.org/a.jpg")
    settled = settle_streamed(_streamed(jpeg), MAX_PIXELS, formats=("image/png",))
    assert settled is not None and settled.error == "unwanted_format"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GIF89a\x28\x00", "decode_error"),  # a GIF cut inside its header
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "decode_error"),  # a JPEG whose header is broken
        (b"II*\x00" + b"\x01" * 20, "decode_error"),  # a broken TIFF
        (b"<html><body>gone</body></html>", "not_image"),
    ],
)
def test_a_damaged_image_is_a_decode_error_and_no_detail_names_the_temporary_file(
    tmp_path: Path, data: bytes, error: str
) -> None:
    """What starts as an image but no reader accepts is a damaged image, not another kind of
    file; the attempt log's detail never shows the engine's temporary path."""
    path = tmp_path / ".0123abcd.5678.part"
    path.write_bytes(data)
    verified = verify_image(str(path), MAX_PIXELS)
    assert not verified.ok and verified.error == error
    assert verified.detail and ".part" not in verified.detail and str(tmp_path) not in verified.detail
