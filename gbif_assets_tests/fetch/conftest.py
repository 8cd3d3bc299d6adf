"""Image hosts with fault profiles on 127.0.0.x, running in their own thread for each test module."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from gbif_assets.emulator.imagehosts import HostProfile, ImageHosts, start_image_hosts

PROFILES = [
    HostProfile("ok", "127.0.0.2", "ok"),
    HostProfile("dead404", "127.0.0.5", "dead404"),
    HostProfile("rate429", "127.0.0.6", "rate429", {"every": 2, "retry_after": "1"}),
    HostProfile("rate429date", "127.0.0.16", "rate429", {"every": 2, "retry_after": "http-date"}),
    HostProfile("flaky5xx", "127.0.0.7", "flaky5xx", {"every": 2}),
    HostProfile("html", "127.0.0.8", "html"),
    HostProfile("redirect", "127.0.0.9", "redirect", {"hops": 2}),
    HostProfile("redirect_long", "127.0.0.17", "redirect", {"hops": 7}),
    HostProfile("redirect_scheme", "127.0.0.18", "redirect_scheme"),
    HostProfile("truncate", "127.0.0.11", "truncate"),
    HostProfile("reset", "127.0.0.12", "reset"),
    HostProfile("bomb", "127.0.0.13", "bomb"),
    HostProfile("huge", "127.0.0.14", "huge", {"bytes": 3_000_000}),
    HostProfile("huge_chunked", "127.0.0.19", "huge", {"bytes": 3_000_000, "chunked": True}),
    HostProfile("hang", "127.0.0.20", "hang", {"hang_s": 30}),
    HostProfile("slow", "127.0.0.21", "slow", {"delay_s": 0.2}),
    HostProfile("rate20", "127.0.0.22", "rate429", {"rate": 20, "retry_after": "1"}),
    HostProfile("gzip", "127.0.0.23", "gzip"),
    HostProfile("closed_hour", "127.0.0.24", "rate429", {"every": 1_000_000, "retry_after": "3600"}),
    HostProfile("rate20_busy", "127.0.0.25", "rate429", {"rate": 20, "retry_after": "1"}),  # one test's own
    HostProfile("garbage", "127.0.0.26", "garbage"),
    HostProfile("redirect_invalid", "127.0.0.27", "redirect_invalid"),
    HostProfile("drip", "127.0.0.28", "drip", {"interval_s": 0.2}),  # a tarpit
    HostProfile("trickle", "127.0.0.29", "drip", {"interval_s": 0.05, "lead": 5}),  # 5 single bytes, then the rest
    HostProfile("refuse_all", "127.0.0.30", "rate429", {"every": 1_000_000, "retry_after": "0"}),
    HostProfile("fail_all", "127.0.0.31", "flaky5xx", {"every": 1_000_000, "status": 503}),
    HostProfile("gzipped", "127.0.0.32", "compressed", {"encoding": "gzip"}),
    HostProfile("deflated", "127.0.0.33", "compressed", {"encoding": "deflate"}),
    HostProfile("deflated_raw", "127.0.0.34", "compressed", {"encoding": "deflate-raw"}),
    HostProfile("brotli", "127.0.0.35", "compressed", {"encoding": "br"}),
    HostProfile("gzip_bomb", "127.0.0.36", "compressed", {"bomb_mb": 200}),
    HostProfile("gzip_cut", "127.0.0.37", "compressed", {"encoding": "gzip", "cut": True}),
    HostProfile("moved", "127.0.0.38", "moved", {"to": "http://127.0.0.39:9"}),  # /moved/ -> nothing listens
    HostProfile("rate429odd", "127.0.0.40", "rate429", {"every": 2, "retry_after": "\u00b2"}),  # float() refuses it
    HostProfile("placeholder", "127.0.0.41", "placeholder"),  # the same "no image" picture at every URL
    HostProfile("gzip_lie", "127.0.0.42", "compressed", {"encoding": "gzip", "lie": True}),
    HostProfile("proxied", "127.0.0.43", "ok", {"ok_status": 203}),
    HostProfile("refuse_slowly", "127.0.0.44", "rate429", {"every": 1_000_000, "retry_after": "2"}),
]


class RunningHosts:
    """Hosts served from a background loop, reachable from any test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.hosts: ImageHosts | None = None

    def __enter__(self) -> ImageHosts:
        self.thread.start()
        self.hosts = asyncio.run_coroutine_threadsafe(start_image_hosts(PROFILES), self.loop).result(30)
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        assert self.hosts is not None
        asyncio.run_coroutine_threadsafe(self.hosts.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def hosts() -> Iterator[ImageHosts]:
    with RunningHosts() as running:
        yield running
