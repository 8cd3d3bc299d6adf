"""Publisher image hosts for the emulator: real aiohttp servers on 127.0.0.2, 127.0.0.3, ...

Each host has one fault profile taken from what publishers really do to image downloaders:
slow answers, dead links (404/403/401), 429 with Retry-After, flaky 5xx, connection resets,
truncated bodies, HTML served as image/jpeg, huge files, decompression bombs, redirect chains,
images gzip-compressed for any client that says it accepts gzip or for every client (gzip,
deflate, raw deflate, brotli, a gzip bomb, a cut gzip stream), and traps: an answer that is
not HTTP, a redirect to a URL that does not parse, a body dripped a byte at a time.
Every host counts its open connections so tests can assert the per-host politeness limit.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import io
import random
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from aiohttp import web
from PIL import Image

FAULTS = (
    "ok",
    "slow",
    "dead404",
    "dead403",
    "dead401",
    "rate429",
    "flaky5xx",
    "reset",
    "truncate",
    "html",
    "huge",
    "bomb",
    "redirect",
    "redirect_loop",
    "redirect_scheme",
    "hang",
    "gzip",
    "garbage",
    "redirect_invalid",
    "drip",
    "compressed",
    "moved",
    "placeholder",
)


@dataclass(frozen=True)
class HostProfile:
    """One publisher host: a loopback address and how it misbehaves."""

    name: str
    address: str
    fault: str = "ok"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; allowed: {', '.join(FAULTS)}")
        if not self.address.startswith("127."):
            raise ValueError(f"image hosts live on loopback only, not {self.address}")


def default_profiles() -> list[HostProfile]:
    """A realistic mix: most hosts healthy, a few dead, rate-limited, slow or hostile."""
    return [
        HostProfile("ok", "127.0.0.2", "ok"),
        HostProfile("ok2", "127.0.0.3", "ok"),
        HostProfile("slow", "127.0.0.4", "slow", {"delay_s": 0.05}),
        HostProfile("dead404", "127.0.0.5", "dead404"),
        HostProfile("rate429", "127.0.0.6", "rate429", {"every": 3, "retry_after": "1"}),
        HostProfile("flaky5xx", "127.0.0.7", "flaky5xx", {"every": 3}),
        HostProfile("html", "127.0.0.8", "html"),
        HostProfile("redirect", "127.0.0.9", "redirect", {"hops": 2}),
        HostProfile("dead403", "127.0.0.10", "dead403"),
        HostProfile("truncate", "127.0.0.11", "truncate"),
        HostProfile("reset", "127.0.0.12", "reset"),
        HostProfile("bomb", "127.0.0.13", "bomb"),
        HostProfile("huge", "127.0.0.14", "huge", {"bytes": 40_000_000}),
        HostProfile("dead401", "127.0.0.15", "dead401"),
    ]


@functools.lru_cache(maxsize=16)
def _base_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A real photo-like JPEG (noise + gradient) so size and decode cost resemble real images."""
    rng = random.Random(seed)
    width, height = size
    img = Image.effect_noise((width, height), 40 + seed % 30).convert("RGB")
    overlay = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    img = Image.blend(img, overlay, 0.3 + rng.random() * 0.3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80 + seed % 10)
    return buf.getvalue()


def image_bytes(url: str, size_range: tuple[int, int] = (30_000, 80_000)) -> bytes:
    """A deterministic, valid JPEG for a URL; its bytes (and sha256) differ per URL.

    A handful of base images are cached; a COM segment after SOI carries the URL and padding, so
    generation is cheap and the body length falls inside `size_range`.
    """
    digest = hashlib.sha256(url.encode()).digest()
    base = _base_jpeg(digest[0] % 4, (320 + 32 * (digest[1] % 2), 240))
    low, high = size_range
    target = low + int.from_bytes(digest[3:7], "big") % max(1, high - low)
    payload = url.encode()[:1000]
    pad = max(0, min(65_000, target - len(base) - len(payload) - 4))
    comment = payload + b"\x00" + digest * (pad // 32 + 1)
    comment = comment[: len(payload) + 1 + pad]
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return base[:2] + segment + base[2:]


def png_bytes(url: str) -> bytes:
    """A deterministic, valid PNG for a URL (publishers serve PNGs too): a small gradient whose
    colours come from the URL's hash, so its bytes differ per URL."""
    red, green, blue = hashlib.sha256(url.encode()).digest()[:3]
    img = Image.merge("RGB", [Image.linear_gradient("L").resize((96, 64)).point(lambda v, c=c: (v + c) % 256)
                              for c in (red, green, blue)])  # fmt: skip
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def bomb_jpeg() -> bytes:
    """A small JPEG whose header claims 60,000 x 60,000 pixels (3.6 Gpx): a decompression bomb.

    It is a real JPEG with its SOF0 frame size patched, so it costs nothing to serve, and a reader
    that decodes before checking the pixel count would try to allocate gigabytes.
    """
    data = bytearray(_base_jpeg(0, (320, 240)))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC2):
            data[i + 5 : i + 9] = (60_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker in the base JPEG")


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Moved</title></head><body>Login required</body></html>"


@dataclass
class HostStats:
    """Per-host counters the tests read: requests, open connections now and at most."""

    requests: int = 0
    open_connections: int = 0
    max_open_connections: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class _Server(web.Server):
    """Counts TCP connections (not requests), since politeness is about connections."""

    def __init__(self, handler: Any, stats: HostStats) -> None:
        super().__init__(handler, access_log=None)
        self.stats = stats

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        self.stats.open_connections += 1
        self.stats.max_open_connections = max(self.stats.max_open_connections, self.stats.open_connections)
        super().connection_made(handler, transport)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        self.stats.open_connections -= 1
        super().connection_lost(handler, exc)


class _Host:
    """One host's request handler implementing its fault profile."""

    def __init__(self, profile: HostProfile, stats: HostStats, latency_s: float) -> None:
        self.profile = profile
        self.stats = stats
        self.latency_s = latency_s
        self.counter = 0
        self.window, self.in_window = 0, 0

    def _count(self, status: int) -> None:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1

    def _throttled(self, params: dict[str, Any]) -> bool:
        """`every`: only every Nth request passes; `rate`: at most N requests per second."""
        if "rate" not in params:
            return self.counter % int(params.get("every", 2)) != 0
        second = int(time.monotonic())
        if second != self.window:
            self.window, self.in_window = second, 0
        self.in_window += 1
        return self.in_window > int(params["rate"])

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.stats.requests += 1
        self.counter += 1
        profile, params = self.profile, self.profile.params
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        url = f"http://{request.host}{request.path_qs}"
        fault = profile.fault
        if request.path.startswith("/ok/"):  # a redirect target always works
            fault = "ok"
        elif request.path.startswith("/reset/"):  # on any host: this request's connection is reset
            fault = "reset"
        if fault == "slow":
            await asyncio.sleep(float(params.get("delay_s", 0.5)))
        elif fault == "hang":
            await asyncio.sleep(float(params.get("hang_s", 3600)))
        elif fault in ("dead404", "dead403", "dead401"):
            status = int(fault[-3:])
            self._count(status)
            return web.Response(status=status, text=f"{status} error", content_type="text/html")
        elif fault == "rate429" and self._throttled(params):
            retry_after = str(params.get("retry_after", "1"))
            if retry_after == "http-date":
                retry_after = formatdate(time.time() + 2, usegmt=True)
            self._count(429)
            return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": retry_after})
        elif fault == "flaky5xx" and self.counter % int(params.get("every", 2)) != 0:
            status = int(params.get("status", 503))
            self._count(status)
            return web.Response(status=status, text="Service Unavailable")
        elif fault == "reset":
            self._count(0)
            _reset(request)
            raise asyncio.CancelledError
        elif fault == "html":
            self._count(200)
            return web.Response(body=HTML_PAGE, headers={"Content-Type": "image/jpeg"})
        elif fault == "bomb":
            self._count(200)
            return web.Response(body=bomb_jpeg(), headers={"Content-Type": "image/jpeg"})
        elif fault == "huge":
            return await self._huge(request, int(params.get("bytes", 40_000_000)), bool(params.get("chunked")))
        elif fault == "redirect":
            hops = int(params.get("hops", 2))
            hop = int(request.query.get("hop", "0"))
            if hop < hops:
                self._count(302)
                target = f"{request.path}?hop={hop + 1}" if hop + 1 < hops else f"/ok{request.path}"
                raise web.HTTPFound(target)
        elif fault == "moved" and request.path.startswith("/moved/"):  # some images moved to another host
            self._count(302)
            raise web.HTTPFound(f"{params['to']}{request.path_qs[len('/moved') :]}")
        elif fault == "redirect_loop":
            self._count(302)
            raise web.HTTPFound(request.path_qs)
        elif fault == "redirect_scheme":
            self._count(302)
            raise web.HTTPFound("file:///etc/passwd")
        elif fault == "redirect_invalid":  # an unclosed IPv6 bracket: no URL parser accepts it
            self._count(302)
            return web.Response(status=302, headers={"Location": "http://[::1/photo.jpg"})
        elif fault == "garbage":  # another service on the port: its banner instead of an HTTP answer
            self._count(0)
            assert request.transport is not None
            request.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            request.transport.close()
            raise asyncio.CancelledError
        body = image_bytes(url.split("?")[0].replace("/ok/", "/", 1) if "/ok/" in url else url)
        if fault == "placeholder":  # one "image not available" picture at every URL
            body = image_bytes(f"http://{request.host}/placeholder")
        if fault == "truncate":
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))})
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.01)
            _reset(request)
            self._count(200)
            return response
        if fault == "drip":  # the first `lead` bytes one at a time (all of them: a tarpit), then the rest
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))})
            await response.prepare(request)
            lead = min(len(body), int(params.get("lead", len(body))))
            for at in range(lead):
                await response.write(body[at : at + 1])
                await asyncio.sleep(float(params.get("interval_s", 1.0)))
            await response.write(body[lead:])
            self._count(200)
            return response
        self._count(200)
        if fault == "compressed":  # compressed whatever the client asked (an S3 object stored gzipped)
            encoding = params.get("encoding", "gzip").replace("deflate-raw", "deflate")
            headers = {"Content-Type": "image/jpeg", "Content-Encoding": encoding}
            return web.Response(body=_compressed(body, params), headers=headers)
        if fault == "gzip" and "gzip" in request.headers.get("Accept-Encoding", ""):
            # a server that compresses every type it may (images included) when the client says it can decode
            return web.Response(
                body=gzip.compress(body), headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
            )
        if request.path.endswith(".png"):
            return web.Response(body=png_bytes(url), headers={"Content-Type": "image/png"})
        status = int(params.get("ok_status", 200))  # e.g. 203 from a transforming proxy
        return web.Response(body=body, status=status, headers={"Content-Type": "image/jpeg"})

    async def _huge(self, request: web.BaseRequest, size: int, chunked: bool) -> web.StreamResponse:
        headers = {"Content-Type": "image/jpeg"}
        if not chunked:
            headers["Content-Length"] = str(size)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        chunk = image_bytes(str(request.url))[:65536].ljust(65536, b"\0")
        sent = 0
        try:
            while sent < size:
                await response.write(chunk[: size - sent])
                sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client cut the body at its max_bytes, as it should
        self._count(200)
        return response


@functools.lru_cache(maxsize=64)
def _bomb(mb: int) -> bytes:
    """A JPEG start and `mb` MB of zeros, gzipped: a few tens of KB that inflate past any max_bytes."""
    return gzip.compress(b"\xff\xd8\xff\xe0" + bytes(mb << 20), compresslevel=9)


def _compressed(body: bytes, params: dict[str, Any]) -> bytes:
    """`body` in the host's Content-Encoding: gzip, deflate (zlib-wrapped), deflate-raw (what some
    servers send as deflate), br (not decodable by design here), a gzip bomb, or a lie (plain)."""
    encoding = params.get("encoding", "gzip")
    if params.get("lie"):  # the header says compressed, the body is the plain image
        return body
    if "bomb_mb" in params:
        return _bomb(int(params["bomb_mb"]))
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "deflate-raw":
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return packer.compress(body) + packer.flush()
    if encoding == "gzip":
        data = gzip.compress(body)
        return data[: len(data) // 2] if params.get("cut") else data
    return body  # any other name: sent as is, with that Content-Encoding


def _reset(request: web.BaseRequest) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a crashing server does."""
    transport = request.transport
    if transport is None:  # the client has gone already: nothing left to reset
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ImageHosts:
    """Running image hosts: base URL and stats per profile name."""

    def __init__(self) -> None:
        self.base_urls: dict[str, str] = {}
        self.profiles: dict[str, HostProfile] = {}
        self.stats: dict[str, HostStats] = {}
        self._runners: list[web.ServerRunner] = []

    async def close(self) -> None:
        """Stop every host."""
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()


async def start_image_hosts(profiles: list[HostProfile], port: int = 0, latency_s: float = 0.0) -> ImageHosts:
    """Start one aiohttp server per profile on its loopback address (ephemeral port by default)."""
    hosts = ImageHosts()
    bomb_jpeg()  # warm the caches now, not in the first request's handler
    for seed in range(4):
        for w in range(2):
            _base_jpeg(seed, (320 + 32 * w, 240))
    for profile in profiles:
        stats = HostStats()
        host = _Host(profile, stats, latency_s)
        server = _Server(host.handle, stats)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, profile.address, port)
        await site.start()
        bound = runner.addresses[0][1]
        hosts._runners.append(runner)
        hosts.base_urls[profile.name] = f"http://{profile.address}:{bound}"
        hosts.profiles[profile.name] = profile
        hosts.stats[profile.name] = stats
    return hosts
