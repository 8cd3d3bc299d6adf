"""The offline GBIF emulator: API, archives and publisher image hosts, all on loopback.

`Emulator` runs everything in a background thread (tests, `gbif-assets demo`);
`run_emulator` runs it in the foreground (`gbif-assets emulator --port N`).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from gbif_assets.emulator.app import EmulatorConfig, GbifEmulator, make_app
from gbif_assets.emulator.imagehosts import (
    HostProfile,
    ImageHosts,
    default_profiles,
    start_image_hosts,
)
from gbif_assets.emulator.pool import (
    OccurrencePool,
    load_archive_records,
    load_recorded_records,
    rewrite_media,
    synthetic_example_records,
)

DEFAULT_WEIGHTS = {
    "ok": 40, "ok2": 30, "slow": 6, "dead404": 5, "rate429": 4, "flaky5xx": 3, "html": 2,
    "redirect": 3, "dead403": 2, "truncate": 1, "reset": 1, "bomb": 1, "huge": 1, "dead401": 1,
}  # fmt: skip

__all__ = ["Emulator", "EmulatorConfig", "HostProfile", "run_emulator"]


def build_pool(base_urls: dict[str, str], weights: dict[str, int], per_stream: int, seed: int) -> OccurrencePool:
    """Real recorded records, the 2014 archive's records and the README example's records."""
    records = [
        *load_recorded_records(),
        *load_archive_records(),
        *synthetic_example_records(per_stream, seed),
    ]
    rewrite_media(records, base_urls, weights)
    return OccurrencePool(records)


class Emulator:
    """GBIF on loopback for the length of a `with` block."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        users: dict[str, str] | None = None,
        profiles: list[HostProfile] | None = None,
        weights: dict[str, int] | None = None,
        per_stream: int = 40,
        seed: int = 0,
        image_latency_s: float = 0.0,
        config: EmulatorConfig | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.config = config or EmulatorConfig()
        if users:
            self.config.users = dict(users)
        self.profiles = profiles if profiles is not None else default_profiles()
        self.weights = weights if weights is not None else DEFAULT_WEIGHTS
        self.per_stream, self.seed, self.image_latency_s = per_stream, seed, image_latency_s
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="gbif-emulator-")
        self.workdir = workdir or Path(self._tmp.name)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gbif-emulator", daemon=True)
        self.api_url = ""
        self.state: GbifEmulator | None = None
        self.image_hosts: ImageHosts | None = None
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        self.image_hosts = await start_image_hosts(self.profiles, latency_s=self.image_latency_s)
        pool = build_pool(self.image_hosts.base_urls, self.weights, self.per_stream, self.seed)
        self.state = GbifEmulator(pool, self.workdir, self.config)
        self._runner = web.AppRunner(make_app(self.state), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.api_url = f"http://{self.host}:{self.port}/v1"

    async def _stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self.image_hosts:
            await self.image_hosts.close()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the emulator's loop (thread-safe)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def __enter__(self) -> Emulator:
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        if self._tmp:
            self._tmp.cleanup()

    @property
    def pool(self) -> OccurrencePool:
        assert self.state is not None
        return self.state.pool

    def set_status(self, key: str, status: str) -> None:
        """Force a download into a GBIF state (FAILED, KILLED, FILE_ERASED, ...)."""
        assert self.state is not None
        self.loop.call_soon_threadsafe(self.state.set_status, key, status)
        self.call(asyncio.sleep(0))


def run_emulator(host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the emulator until interrupted, printing where everything is."""
    with Emulator(host=host, port=port) as emu:
        assert emu.image_hosts is not None
        print(f"GBIF emulator API: {emu.api_url}  (export GBIF_API_URL={emu.api_url})")
        print(f"  users: {', '.join(emu.config.users)}; occurrences: {len(emu.pool)}")
        for name, url in emu.image_hosts.base_urls.items():
            print(f"  image host {name:<10} {url}  ({emu.image_hosts.profiles[name].fault})")
        print("Image URLs resolve to loopback: set GBIF_ASSETS_ALLOW_PRIVATE_HOSTS=1. Ctrl-C stops.")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
