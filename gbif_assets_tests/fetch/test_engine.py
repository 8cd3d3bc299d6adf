"""The fetch engine against real hosts with real faults: limits, retries, safety, quota, resume."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trustme
from aiohttp import web
from PIL import Image

from gbif_assets.emulator.imagehosts import ImageHosts, image_bytes
from gbif_assets.fetch import Candidate, FetchConfig, FetchEngine, download_label
from gbif_assets.fetch.partition import LabelBusy, label_dir, label_lock
from gbif_assets.fetch.safety import address_allowed, host_literal_allowed


def _cand(url: str, dest: Path, stream: str = "s", rank: int = 1, gbif_id: str = "1") -> Candidate:
    return Candidate(url, hashlib.sha1(url.encode()).hexdigest(), gbif_id, stream, rank, True, dest)


def _config(**kw) -> FetchConfig:
    base = dict(
        allow_private_hosts=True,
        retries=2,
        timeout_s=2,
        backoff_base_s=0.05,
        gbif_image_cache_fallback=False,
    )
    return FetchConfig(**{**base, **kw})


def _run(config: FetchConfig, streams: dict[str, tuple[list[Candidate], int]]) -> FetchEngine:
    engine = FetchEngine(config)
    asyncio.run(engine.run(streams))
    return engine


def test_every_fault_gets_its_error_class(hosts: ImageHosts, tmp_path: Path) -> None:
    expected = {
        "ok": None, "dead404": "http_404", "html": "not_image", "redirect": None,
        "redirect_long": "too_many_redirects", "redirect_scheme": "blocked", "truncate": "truncated",
        "reset": "reset", "bomb": "too_large", "huge": "too_large", "huge_chunked": "too_large",
        "hang": "timeout", "rate429": None, "flaky5xx": None, "garbage": "protocol", "redirect_invalid": "blocked",
        "drip": "timeout", "proxied": None,
    }  # fmt: skip
    streams = {
        name: (
            [_cand(f"{hosts.base_urls[name]}/photos/{name}/1.jpg", tmp_path / name, stream=name)],
            1,
        )
        for name in expected
    }
    engine = _run(_config(max_bytes=1_000_000, retries=1, timeout_s=1), streams)
    outcomes = {o.candidate.stream: o for o in engine.outcomes}
    for name, error in expected.items():
        assert outcomes[name].error == error, (name, outcomes[name].error)
        files = (
            [p for p in (tmp_path / name).glob("*") if not p.name.startswith(".")] if (tmp_path / name).exists() else []
        )
        if error is None:
            assert len(files) == 1
            with Image.open(files[0]) as img:
                img.verify()  # the stored file is a real image
        else:
            assert files == []  # nothing half-written at a final path
        assert not list((tmp_path / name).glob(".*.part")) if (tmp_path / name).exists() else True
    logged = {(a["stream"], a["error"]) for a in engine.attempts}
    assert ("rate429", "http_429") in logged and (
        "flaky5xx",
        "http_5xx",
    ) in logged  # retried, then fetched


def test_per_host_limit_holds(hosts: ImageHosts, tmp_path: Path) -> None:
    stats = hosts.stats["slow"]
    stats.max_open_connections = 0
    cands = [_cand(f"{hosts.base_urls['slow']}/p/{i}.jpg", tmp_path, rank=i) for i in range(24)]
    engine = _run(_config(per_host=3, concurrency=50), {"s": (cands, 24)})
    assert sum(o.ok for o in engine.outcomes) == 24
    assert 1 <= stats.max_open_connections <= 3


@pytest.mark.parametrize("host", ["rate429", "rate429date"])
def test_retry_after_is_honoured(hosts: ImageHosts, tmp_path: Path, host: str) -> None:
    url = f"{hosts.base_urls[host]}/retry/{host}.jpg"
    engine = _run(_config(retries=2), {"s": ([_cand(url, tmp_path)], 1)})
    attempts = sorted(engine.attempts, key=lambda a: a["attempt"])
    assert attempts[0]["error"] == "http_429" and attempts[-1]["error"] is None
    gap = (attempts[-1]["fetched_at"] - attempts[0]["fetched_at"]).total_seconds()
    assert gap >= 0.5, gap  # waited for Retry-After, not the 0.05 s backoff


def test_a_retry_after_no_parser_reads_is_a_plain_429(hosts: ImageHosts, tmp_path: Path) -> None:
    """`Retry-After: ²` (a Unicode digit that str.isdigit takes and float refuses) failed the whole label."""
    cands = [_cand(f"{hosts.base_urls['rate429odd']}/odd/{i}.jpg", tmp_path, rank=i) for i in range(4)]
    engine = _run(_config(retries=2), {"s": (cands, 4)})
    assert sum(o.ok for o in engine.outcomes) == 4
    assert any(a["error"] == "http_429" for a in engine.attempts)


@pytest.mark.parametrize(
    "address",
    [
        "100.100.100.200",  # carrier-grade NAT space: a cloud metadata endpoint
        "100.64.0.1",
        "192.0.0.192",  # IETF protocol assignments
        "2002:a9fe:a9fe::",  # 6to4 wrapping 169.254.169.254
        "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 wrapping 169.254.169.254
        "::ffff:10.0.0.1",  # IPv4-mapped
        "169.254.169.254",
        "fd00::1",
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str) -> None:
    """Judged without a packet sent: the guard's verdict on what DNS or a redirect may name."""
    assert not address_allowed(address, allow_private=False)
    assert not host_literal_allowed(f"[{address}]" if ":" in address else address, allow_private=False)


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.1", "2606:4700::1111", "2002:808:808::"])
def test_public_addresses_pass_the_guard(address: str) -> None:
    assert address_allowed(address, allow_private=False)


@pytest.mark.parametrize("by_name", [False, True], ids=["ip-literal", "hostname-resolving-to-loopback"])
def test_private_addresses_refused_before_any_request(hosts: ImageHosts, tmp_path: Path, by_name: bool) -> None:
    before = hosts.stats["ok"].requests
    url = f"{hosts.base_urls['ok']}/private/1.jpg"
    if by_name:  # 127.0.0.2 has no name; use the same port on 127.0.0.1 via "localhost"
        url = url.replace("127.0.0.2", "localhost")
    engine = _run(_config(allow_private_hosts=False), {"s": ([_cand(url, tmp_path)], 1)})
    assert engine.outcomes[0].error == "blocked"
    assert hosts.stats["ok"].requests == before
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_urls_that_do_not_parse_are_blocked_and_replaced(hosts: ImageHosts, tmp_path: Path) -> None:
    """An unclosed IPv6 bracket, a port past 65535, a backslash in the authority: each is refused
    without a request (it once stopped the whole run), and the stream takes its next candidate."""
    ok = hosts.base_urls["ok"]
    bad = ["http://[::1/x.jpg", ok.replace(ok.rsplit(":", 1)[1], "99999") + "/p.jpg", ok + "\\@example.org/b.jpg"]
    cands = [_cand(url, tmp_path, rank=i) for i, url in enumerate([*bad, f"{ok}/good/1.jpg"])]
    engine = _run(_config(), {"s": (cands, 1)})
    errors = {o.candidate.url: o.error for o in engine.outcomes}
    assert errors == {**dict.fromkeys(bad, "blocked"), f"{ok}/good/1.jpg": None}
    assert all(a["detail"] for a in engine.attempts if a["error"] == "blocked")


def test_an_image_whose_first_bytes_come_one_at_a_time_is_kept(hosts: ImageHosts, tmp_path: Path) -> None:
    """The magic-number check waits for its 16 bytes: judging the first packet alone refused a
    real JPEG whose server flushed a few bytes first."""
    url = f"{hosts.base_urls['trickle']}/photos/trickle/1.jpg"
    engine = _run(_config(), {"s": ([_cand(url, tmp_path)], 1)})
    outcome = engine.outcomes[0]
    assert outcome.ok, outcome.error
    assert outcome.path is not None and outcome.path.read_bytes() == image_bytes(url)


def test_a_tarpit_costs_one_total_timeout_per_attempt(hosts: ImageHosts, tmp_path: Path) -> None:
    """A body dripped a byte every 0.2 s never trips the 0.5 s read timeout; the total one
    (twice timeout_s) ends each attempt, and nothing is left behind."""
    started = time.monotonic()
    engine = _run(
        _config(timeout_s=0.5, retries=1), {"s": ([_cand(f"{hosts.base_urls['drip']}/t/1.jpg", tmp_path)], 1)}
    )
    elapsed = time.monotonic() - started
    assert engine.outcomes[0].error == "timeout"
    assert [a["error"] for a in engine.attempts] == ["timeout", "timeout"]
    assert all("total" in a["detail"] for a in engine.attempts)
    assert 2.0 <= elapsed < 4.0, elapsed
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_dead_host_costs_seconds_not_hours(hosts: ImageHosts, tmp_path: Path) -> None:
    cands = [_cand(f"{hosts.base_urls['hang']}/h/{i}.jpg", tmp_path, rank=i) for i in range(40)]
    started = time.monotonic()
    engine = _run(
        _config(timeout_s=0.5, retries=1, per_host=2, breaker_failures=3, breaker_open_s=60),
        {"s": (cands, 40)},
    )
    elapsed = time.monotonic() - started
    assert elapsed < 8, elapsed  # 40 candidates x 2 attempts x 0.5 s / 2 connections would be 20 s
    assert any(a["error"] == "circuit_open" for a in engine.attempts)


def test_dead_links_are_replaced_from_the_same_stream(hosts: ImageHosts, tmp_path: Path) -> None:
    dead = [_cand(f"{hosts.base_urls['dead404']}/d/{i}.jpg", tmp_path, "a", rank=i) for i in range(1, 4)]
    live = [_cand(f"{hosts.base_urls['ok']}/a/{i}.jpg", tmp_path, "a", rank=i) for i in range(4, 10)]
    other = [_cand(f"{hosts.base_urls['ok']}/b/{i}.jpg", tmp_path, "b", rank=i) for i in range(1, 10)]
    engine = _run(_config(), {"a": (dead + live, 3), "b": (other, 2)})
    kept = [o for o in engine.outcomes if o.ok]
    assert sorted(o.candidate.stream for o in kept) == ["a", "a", "a", "b", "b"]
    assert all(o.candidate.rank >= 4 for o in kept if o.candidate.stream == "a")


def test_a_dead_redirect_target_does_not_close_the_links_own_host(hosts: ImageHosts, tmp_path: Path) -> None:
    """A publisher that moved some images to a host that is now dead: those links fail, and the
    dead host's breaker opens; the publisher's own host stays open and every other image is kept."""
    base = hosts.base_urls["moved"]
    moved = [_cand(f"{base}/moved/{i}.jpg", tmp_path / "m", "m", rank=i) for i in range(30)]
    here = [_cand(f"{base}/here/{i}.jpg", tmp_path / "h", "h", rank=i) for i in range(30)]
    engine = _run(_config(concurrency=4, per_host=2), {"m": (moved, 30), "h": (here, 30)})
    assert sorted(o.candidate.stream for o in engine.outcomes if o.ok) == ["h"] * 30
    failed = [o.error for o in engine.outcomes if not o.ok]
    assert len(failed) == 30 and set(failed) <= {"connect", "circuit_open"} and "circuit_open" in failed


def test_the_same_image_at_many_urls_counts_once_and_reserves_fill_the_quota(hosts: ImageHosts, tmp_path: Path) -> None:
    """A publisher's "no image" placeholder at every URL: one copy is kept, the others are
    duplicates (deleted), and reserves from the same stream fill the quota."""
    same = [_cand(f"{hosts.base_urls['placeholder']}/p/{i}.jpg", tmp_path, rank=i) for i in range(1, 4)]
    live = [_cand(f"{hosts.base_urls['ok']}/fill/{i}.jpg", tmp_path, rank=i) for i in range(4, 10)]
    engine = _run(_config(), {"s": (same + live, 4)})
    kept = [o for o in engine.outcomes if o.ok]
    assert len(kept) == 4 and len({o.verified.sha256 for o in kept if o.verified}) == 4
    assert sorted(o.error for o in engine.outcomes if not o.ok) == ["duplicate", "duplicate"]
    assert len([p for p in tmp_path.iterdir() if p.is_file()]) == 4


def test_gbif_image_cache_rescues_dead_links(hosts: ImageHosts, tmp_path: Path) -> None:
    url = f"{hosts.base_urls['dead404']}/gone/1.jpg"
    config = _config(gbif_image_cache_fallback=True, image_cache_base=f"{hosts.base_urls['ok']}/v1/image/cache")
    engine = _run(config, {"s": ([_cand(url, tmp_path, gbif_id="42")], 1)})
    outcome = engine.outcomes[0]
    assert outcome.ok and outcome.source == "gbif_cache"
    md5 = hashlib.md5(url.encode()).hexdigest()
    cache_attempts = [a for a in engine.attempts if a["source"] == "gbif_cache"]
    assert cache_attempts[0]["url"] == url and cache_attempts[0]["final_url"].endswith(f"/occurrence/42/media/{md5}")


def _manifest(path: Path, base: str, n: int, label: str = "L1", png_every: int = 0) -> Path:
    """`png_every`: every n-th URL a PNG, which the decode check leaves to the image-check workers."""
    urls = [f"{base}/resume/{i}.{'png' if png_every and i % png_every == 0 else 'jpg'}" for i in range(n)]
    table = pa.table(
        {
            "label": [label] * n,
            "identifier": urls,
            "url_sha1": [hashlib.sha1(u.encode()).hexdigest() for u in urls],
            "gbifID": [str(1000 + i) for i in range(n)],
            "stream": ["s"] * n,
            "rank": list(range(1, n + 1)),
            "selected": [True] * n,
            "split": ["train" if i % 5 else "test" for i in range(n)],
            "stream_target": [n] * n,
        }
    )
    pq.write_table(table, path)
    return path


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _journal_rows(folder: Path) -> list[dict]:
    """The attempt rows in the label's journals so far (a batch being written may be cut)."""
    rows: list[dict] = []
    for journal in folder.glob("L1.parquet.journal-*"):
        try:
            with pa.ipc.open_stream(pa.OSFile(str(journal))) as reader:
                rows += [row for batch in reader for row in batch.to_pylist()]
        except (pa.ArrowInvalid, OSError):
            pass
    return rows


def test_kill_dash_nine_then_resume(hosts: ImageHosts, tmp_path: Path) -> None:
    """After kill -9: no partial file at a final path, no process left, nothing fetched twice, and
    the attempts written before the kill (its journal, every half second) are in the log after."""
    home = tmp_path / "home"
    total = 80  # 8 s at the slow host's pace: the kill comes after the journal's first batches
    manifest = _manifest(tmp_path / "manifest.parquet", hosts.base_urls["slow"], total, png_every=4)
    env = {**os.environ, "GBIF_ASSETS_ALLOW_PRIVATE_HOSTS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gbif_assets.fetch", str(manifest), "L1", str(home)], env=env)
    deadline = time.monotonic() + 30
    downloads = home / "metadata" / "downloads"
    while time.monotonic() < deadline and not (
        len(list(home.glob("images/*/L1/*.[jp][pn]g"))) >= 8 and _journal_rows(downloads)
    ):
        time.sleep(0.05)
    workers = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).endswith(f"--parent {proc.pid}")]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert workers, "the run had started its image-check workers before the kill"
    orphans = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).endswith(f"--parent {proc.pid}")]
    assert orphans == []  # the image-check workers died with their parent
    finished = {p: p.stat().st_mtime_ns for p in home.glob("images/*/L1/*.[jp][pn]g")}
    assert 8 <= len(finished) < total
    for path in finished:  # every file at a final path is a whole, valid image
        with Image.open(path) as img:
            img.load()
    logged = len(_journal_rows(downloads))
    assert logged >= 1
    before = hosts.stats["slow"].requests
    result = download_label(manifest, "L1", home, _config(concurrency=4, per_host=2))
    assert result.kept == total and result.already_present == len(finished)
    assert hosts.stats["slow"].requests - before == total - len(finished)  # nothing fetched twice
    assert not list(downloads.glob("L1.parquet.journal-*"))  # folded into the log
    log_rows = pq.read_table(downloads / "L1.parquet").to_pylist()
    recovered = [r for r in log_rows if (r["detail"] or "").startswith("logged from the file on disk")]
    assert len(log_rows) == logged + result.attempts + len(recovered)
    # every kept image has its successful attempt in the log: journaled before the kill, made in
    # the resumed run, or (finished in its last half second) logged from the file on disk
    kept_urls = set(pq.read_table(home / "metadata" / "partitions" / "L1.parquet").column("url").to_pylist())
    assert kept_urls == {r["url"] for r in log_rows if r["error"] is None}
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime
    assert not list(home.glob("images/*/L1/.*.part"))
    kept = pq.read_table(home / "metadata" / "partitions" / "L1.parquet")
    assert kept.num_rows == total and set(kept.column("source").to_pylist()) == {"publisher"}
    log = pq.read_table(home / "metadata" / "downloads" / "L1.parquet")
    assert {
        "url",
        "host",
        "final_url",
        "status",
        "error",
        "bytes",
        "ms",
        "attempt",
        "source",
    } <= set(log.column_names)


def test_labels_that_clean_alike_keep_their_own_folders(hosts: ImageHosts, tmp_path: Path) -> None:
    """ "Mentha piperita" and "Mentha × piperita" are two classes: two folders, two logs, and
    neither run deletes the other's files (they once shared one folder)."""
    home = tmp_path / "home"
    labels = ["Mentha piperita", "Mentha × piperita"]
    assert label_dir("5352251") == "5352251" and len({label_dir(x) for x in labels}) == 2
    urls = {f"{hosts.base_urls['ok']}/mentha/{n}/{i}.jpg": label for n, label in enumerate(labels) for i in range(4)}
    manifest = _labelled_manifest(tmp_path / "manifest.parquet", urls)
    for label in labels:
        assert download_label(manifest, label, home, _config()).kept == 4
    for label in labels:
        assert len(list(home.glob(f"images/*/{label_dir(label)}/*.jpg"))) == 4
        assert (home / "metadata" / "downloads" / f"{label_dir(label)}.parquet").is_file()


def _labelled_manifest(path: Path, labels: dict[str, str]) -> Path:
    """A manifest of these URLs in these labels, one stream per label, all in train."""
    n = len(labels)
    pq.write_table(
        pa.table({
            "label": list(labels.values()), "identifier": list(labels),
            "url_sha1": [hashlib.sha1(u.encode()).hexdigest() for u in labels],
            "gbifID": [str(1000 + i) for i in range(n)], "stream": list(labels.values()),
            "rank": list(range(1, n + 1)), "selected": [True] * n, "split": ["train"] * n,
            "stream_target": [list(labels.values()).count(v) for v in labels.values()],
        }),
        path,
    )  # fmt: skip
    return path


def test_media_re_identified_on_gbif_move_to_their_new_label(hosts: ImageHosts, tmp_path: Path) -> None:
    """An occurrence GBIF now files under another species has not left GBIF: with
    refresh_vanished=keep its image still leaves the old label (it is fetched under the new one),
    and a label folder left empty is removed (ImageFolder refuses empty class folders)."""
    home, ok, dead = tmp_path / "home", hosts.base_urls["ok"], hosts.base_urls["dead404"]
    a, b, c = (f"{ok}/moves/{i}.jpg" for i in range(3))
    first = _labelled_manifest(tmp_path / "m1.parquet", {a: "L1", b: "L1", c: "L3"})
    assert download_label(first, "L1", home, _config()).kept == 2
    assert download_label(first, "L3", home, _config()).kept == 1
    # b moves to L2 and c to L1; L3 keeps only a dead link
    moved = _labelled_manifest(tmp_path / "m2.parquet", {a: "L1", c: "L1", b: "L2", f"{dead}/x.jpg": "L3"})
    result = download_label(moved, "L1", home, _config(), vanished="keep")
    assert (result.kept, result.vanished) == (2, 0)
    on_disk = {p.name.split(".")[0] for p in home.glob("images/train/L1/*.jpg")}
    assert on_disk == {hashlib.sha1(u.encode()).hexdigest() for u in (a, c)}
    assert download_label(moved, "L2", home, _config()).kept == 1
    assert download_label(moved, "L3", home, _config(retries=0), vanished="keep").kept == 0
    assert not (home / "images" / "train" / "L3").exists()  # c moved away, the dead link left nothing


def test_media_the_recipe_now_refuses_leave_even_with_keep(hosts: ImageHosts, tmp_path: Path) -> None:
    """`keep` is for media that left GBIF; an image whose licence the recipe now refuses is listed
    in metadata/excluded.parquet by the manifest step, and the partition removes it."""
    home, ok = tmp_path / "home", hosts.base_urls["ok"]
    a, b = f"{ok}/refused/1.jpg", f"{ok}/refused/2.jpg"
    assert (
        download_label(_labelled_manifest(tmp_path / "m1.parquet", {a: "L1", b: "L1"}), "L1", home, _config()).kept == 2
    )
    pq.write_table(
        pa.table({"url_sha1": [hashlib.sha1(b.encode()).hexdigest()]}), home / "metadata" / "excluded.parquet"
    )
    result = download_label(
        _labelled_manifest(tmp_path / "m2.parquet", {a: "L1"}), "L1", home, _config(), vanished="keep"
    )
    assert (result.kept, result.vanished) == (1, 0)
    assert [p.name.split(".")[0] for p in home.glob("images/*/L1/*")] == [hashlib.sha1(a.encode()).hexdigest()]


def test_resize_set_after_a_build_resizes_the_files_already_there(hosts: ImageHosts, tmp_path: Path) -> None:
    """`resize_max_side` added to the recipe later: the next run resizes the kept files in place
    (no mixed sizes, nothing fetched again) and their rows say the new size."""
    home = tmp_path / "home"
    manifest = _manifest(tmp_path / "m.parquet", hosts.base_urls["ok"], 4)
    assert download_label(manifest, "L1", home, _config()).kept == 4
    result = download_label(manifest, "L1", home, _config(resize_max_side=64))
    assert (result.kept, result.fetched) == (4, 0)
    rows = pq.read_table(home / "metadata" / "partitions" / "L1.parquet").to_pylist()
    for row in rows:
        with Image.open(home / row["path"]) as img:
            assert max(img.size) <= 64 and img.size == (row["width"], row["height"])
        assert row["bytes"] == (home / row["path"]).stat().st_size


def test_a_second_run_of_a_label_is_refused_while_one_runs(hosts: ImageHosts, tmp_path: Path) -> None:
    home = tmp_path / "home"
    manifest = _manifest(tmp_path / "m.parquet", hosts.base_urls["ok"], 3)
    with label_lock(home, "L1"), pytest.raises(LabelBusy, match="'L1' is being downloaded by another run"):
        download_label(manifest, "L1", home, _config())
    assert not (home / "images").exists()  # it touched nothing
    assert download_label(manifest, "L1", home, _config()).kept == 3  # the lock went with the first run


def test_a_file_cut_since_it_was_kept_is_fetched_again(hosts: ImageHosts, tmp_path: Path) -> None:
    home = tmp_path / "home"
    manifest = _manifest(tmp_path / "m.parquet", hosts.base_urls["ok"], 5)
    assert download_label(manifest, "L1", home, _config()).kept == 5
    victim = sorted(home.glob("images/*/L1/*.jpg"))[0]
    whole = victim.read_bytes()
    victim.write_bytes(whole[:100])
    result = download_label(manifest, "L1", home, _config())
    assert (result.kept, result.fetched) == (5, 1)
    assert victim.read_bytes() == whole


def test_a_file_changed_in_place_since_it_was_kept_is_fetched_again(hosts: ImageHosts, tmp_path: Path) -> None:
    """Same size, other bytes (a bad disk, a tool that rewrote it): its modification time is later
    than its fetch, so it is checked, fails and is fetched again. A file that only had its times
    changed (a copy without -p) is checked once and trusted again, not fetched."""
    home = tmp_path / "home"
    manifest = _manifest(tmp_path / "m.parquet", hosts.base_urls["ok"], 5)
    assert download_label(manifest, "L1", home, _config()).kept == 5
    victim, touched = sorted(home.glob("images/*/L1/*.jpg"))[:2]
    whole = victim.read_bytes()
    later = time.time() + 60
    victim.write_bytes(b"\xff\xd8" + bytes(len(whole) - 2))
    os.utime(victim, (later, later))
    os.utime(touched, (later, later))
    result = download_label(manifest, "L1", home, _config())
    assert (result.kept, result.fetched) == (5, 1)
    assert victim.read_bytes() == whole
    assert touched.stat().st_mtime < later - 30  # trusted again: its time went back to its fetch
    assert download_label(manifest, "L1", home, _config()).fetched == 0


def test_files_a_killed_run_kept_from_the_gbif_cache_keep_that_source(hosts: ImageHosts, tmp_path: Path) -> None:
    """A run killed after its attempts reached the journal but before it wrote the label's rows:
    the next run finds the files on disk and takes their source from the attempt log, instead of
    calling every one 'publisher'."""
    home = tmp_path / "home"
    manifest = _manifest(tmp_path / "m.parquet", hosts.base_urls["dead404"], 4)
    config = _config(gbif_image_cache_fallback=True, image_cache_base=f"{hosts.base_urls['ok']}/v1/image/cache")
    assert download_label(manifest, "L1", home, config).kept == 4
    (home / "metadata" / "partitions" / "L1.parquet").unlink()  # as if killed before writing them
    result = download_label(manifest, "L1", home, config)
    assert (result.kept, result.fetched) == (4, 0)
    kept = pq.read_table(home / "metadata" / "partitions" / "L1.parquet")
    assert set(kept.column("source").to_pylist()) == {"gbif_cache"}


def test_rate_limited_host_is_paced_not_hammered(hosts: ImageHosts, tmp_path: Path) -> None:
    """A host allowing 20 requests/s: every image arrives, few 429s, never more than per_host."""
    stats = hosts.stats["rate20"]
    stats.max_open_connections = stats.open_connections
    refused_before = stats.by_status.get(429, 0)
    cands = [_cand(f"{hosts.base_urls['rate20']}/paced/{i}.jpg", tmp_path, rank=i) for i in range(80)]
    started = time.monotonic()
    engine = _run(_config(per_host=8, concurrency=32, retries=2), {"s": (cands, 80)})
    elapsed = time.monotonic() - started
    assert sum(o.ok for o in engine.outcomes) == 80
    refused = stats.by_status.get(429, 0) - refused_before
    # The first burst is refused once (at most per_host requests are in flight when the first 429
    # comes back), then the engine paces; bursting 8 connections after every Retry-After pause
    # is refused in every window: 80 images at 20/s is 4 windows or more.
    assert 1 <= refused <= 12, refused
    assert stats.max_open_connections <= 8
    report = engine.host_report()["127.0.0.22"]
    assert report["peak"] <= 8 and report["limit"] <= 8
    assert report["throttled"] == refused and report["cuts"] >= 1
    assert report["rate"] is not None and report["rate"] <= 20 * 1.05, report  # paced at the host's rate, or below
    assert elapsed < 80 / 20 * 2, elapsed  # 4 s at the host's rate; Retry-After pauses and a slower pace cost some


def test_paced_host_keeps_its_pace_while_every_worker_is_busy(hosts: ImageHosts, tmp_path: Path) -> None:
    """A slow host could keep all 3 workers busy for 8 s; the 20 requests/s host still gets its
    turn on time (it comes first when its pace is due). Its 60 images took 3.6-3.8 s here, one
    Retry-After pause included; when it waited in the round robin like any host, 5.1 s."""
    slow = [_cand(f"{hosts.base_urls['slow']}/busy/{i}.jpg", tmp_path, rank=2 * i) for i in range(120)]
    paced = [_cand(f"{hosts.base_urls['rate20_busy']}/busy/{i}.jpg", tmp_path, rank=2 * i + 1) for i in range(60)]
    started = dt.datetime.now(dt.UTC)
    # per_host 4: a cut needs 2 x per_host answers in a window, which a 20/s host gives even when the
    # machine is busy (at 8, a busy machine sometimes counted fewer than 16 and never paced)
    engine = _run(_config(per_host=4, concurrency=3), {"s": (slow + paced, 180)})
    assert sum(o.ok for o in engine.outcomes) == 180
    finished = {
        host: max(o.fetched_at for o in engine.outcomes if o.candidate.url.startswith(hosts.base_urls[host]))
        for host in ("slow", "rate20_busy")
    }
    assert (finished["slow"] - started).total_seconds() > 7.5  # the workers were busy all along
    assert (finished["rate20_busy"] - started).total_seconds() < 4.6, finished
    assert engine.host_report()["127.0.0.25"]["cuts"] >= 1  # it was paced


@pytest.mark.parametrize("host", ["gzipped", "deflated", "deflated_raw"])
def test_a_body_compressed_unasked_is_inflated_and_kept(hosts: ImageHosts, tmp_path: Path, host: str) -> None:
    """A server that compresses although asked for identity (an S3 object stored with
    Content-Encoding: gzip): the image is inflated, checked and stored as the image itself."""
    cands = [_cand(f"{hosts.base_urls[host]}/photos/{i}.jpg", tmp_path, rank=i) for i in range(3)]
    engine = _run(_config(), {"s": (cands, 3)})
    assert [o.error for o in engine.outcomes] == [None] * 3
    for outcome in engine.outcomes:
        assert outcome.path is not None and outcome.path.read_bytes() == image_bytes(outcome.candidate.url)
        assert (
            outcome.verified is not None
            and outcome.verified.sha256 == hashlib.sha256(image_bytes(outcome.candidate.url)).hexdigest()
        )


@pytest.mark.parametrize(
    ("host", "error", "detail"),
    [
        ("brotli", "not_image", "Content-Encoding br"),
        ("gzip_bomb", "too_large", "max_bytes"),
        ("gzip_cut", "not_image", "gzip body ends before its end"),
        ("gzip_lie", "not_image", "broken gzip body"),
    ],
)
def test_a_compressed_body_that_cannot_be_an_image(
    hosts: ImageHosts, tmp_path: Path, host: str, error: str, detail: str
) -> None:
    """An encoding we cannot read, a bomb (200 MB of zeros in a few hundred KB: inflated a piece
    at a time, cut at max_bytes) and a cut stream each fail their candidate, leaving no file."""
    started = time.monotonic()
    engine = _run(
        _config(retries=0, max_bytes=5_000_000), {"s": ([_cand(f"{hosts.base_urls[host]}/x.jpg", tmp_path)], 1)}
    )
    assert time.monotonic() - started < 10
    assert engine.outcomes[0].error == error
    assert detail in (engine.attempts[-1]["detail"] or "") and engine.attempts[-1]["status"] == 200
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_images_come_uncompressed_from_a_host_that_gzips_when_asked(hosts: ImageHosts, tmp_path: Path) -> None:
    """aiohttp offers gzip by default; a server that then compresses its JPEGs would have them
    refused as not images (the stored file is the body as sent). The engine asks for identity."""
    base = hosts.base_urls["gzip"]

    async def default_client_encoding() -> str | None:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.get(f"{base}/probe.jpg") as response,
        ):
            return response.headers.get("Content-Encoding")

    assert asyncio.run(default_client_encoding()) == "gzip"  # the host does compress when offered
    cands = [_cand(f"{base}/photos/{i}.jpg", tmp_path, rank=i) for i in range(5)]
    engine = _run(_config(), {"s": (cands, 5)})
    assert [o.ok for o in engine.outcomes] == [True] * 5, [o.error for o in engine.outcomes]
    for outcome in engine.outcomes:
        assert outcome.path is not None and outcome.path.read_bytes() == image_bytes(outcome.candidate.url)


def test_a_host_asking_for_an_hour_is_left_alone_and_reserves_fill_its_quota(hosts: ImageHosts, tmp_path: Path) -> None:
    """429 with Retry-After: 3600 is honoured (no more requests to that host) without stalling the
    partition for an hour: its candidates fail at once and reserves on other hosts take their place."""
    stats = hosts.stats["closed_hour"]
    before = stats.requests
    closed = [_cand(f"{hosts.base_urls['closed_hour']}/hour/{i}.jpg", tmp_path, rank=i) for i in range(10)]
    reserves = [_cand(f"{hosts.base_urls['ok']}/hour/{i}.jpg", tmp_path, rank=10 + i) for i in range(10)]
    started = time.monotonic()
    engine = _run(_config(backoff_max_s=30), {"s": (closed + reserves, 10)})
    assert time.monotonic() - started < 10
    assert sum(o.ok for o in engine.outcomes) == 10
    assert stats.requests - before <= 2  # slow start: two requests, then the host is left alone
    refused = [a for a in engine.attempts if "/hour/" in a["url"] and "127.0.0.24" in a["url"]]
    assert {a["error"] for a in refused} <= {"http_429", "host_paused"}  # paused at its request, not dead
    assert any("3600 s pause" in (a["detail"] or "") for a in refused if a["error"] == "host_paused")


@pytest.mark.parametrize(("host", "error"), [("refuse_all", "http_429"), ("fail_all", "http_5xx")])
def test_a_host_refusing_everything_is_not_hammered(hosts: ImageHosts, tmp_path: Path, host: str, error: str) -> None:
    """'429, Retry-After: 0' or '503' on every request: each refusal pauses the host (backoff_base_s),
    and after 3 rounds of refusals in a row (3 x the 2 connections a host gets before it accepts
    anything) the host is closed and reserves fill the quota. Before, 50 candidates drew 500
    requests in 0.7 s (429) or 200 (503)."""
    base = hosts.stats[host].requests
    refused = [_cand(f"{hosts.base_urls[host]}/r/{i}.jpg", tmp_path, rank=i) for i in range(50)]
    reserves = [_cand(f"{hosts.base_urls['ok']}/{host}/{i}.jpg", tmp_path, rank=100 + i) for i in range(50)]
    engine = _run(_config(per_host=4, backoff_base_s=0.2), {"s": (refused + reserves, 50)})
    assert sum(o.ok for o in engine.outcomes) == 50
    assert hosts.stats[host].requests - base <= 3 * 2 + 2  # the last round's requests were in flight
    closed = [a for a in engine.attempts if a["error"] == "host_paused"]
    assert closed and f"in a row refused ({error})" in closed[0]["detail"]


def test_a_host_refusing_everything_with_long_pauses_costs_three_of_them(hosts: ImageHosts, tmp_path: Path) -> None:
    """'429, Retry-After: 2' on every request, per_host 8: the host never gets past its 2 first
    connections, so it is closed after 3 rounds of 2 (three pauses), not 3 x 8 refusals (twelve
    pauses). With 'Retry-After: 29' that was 174 s for one label."""
    base = hosts.stats["refuse_slowly"].requests
    refused = [_cand(f"{hosts.base_urls['refuse_slowly']}/r/{i}.jpg", tmp_path, rank=i) for i in range(20)]
    reserves = [_cand(f"{hosts.base_urls['ok']}/slowly/{i}.jpg", tmp_path, rank=100 + i) for i in range(20)]
    started = time.monotonic()
    engine = _run(_config(per_host=8, retries=2), {"s": (refused + reserves, 20)})
    assert sum(o.ok for o in engine.outcomes) == 20
    assert hosts.stats["refuse_slowly"].requests - base <= 3 * 2 + 2
    assert time.monotonic() - started < 10


def _hanging_host_beside_a_live_one(
    hosts: ImageHosts, tmp_path: Path, first: str, folder: str
) -> tuple[FetchEngine, float]:
    """One stream: 30 links on the hanging host (the first at path `first`, the others under
    `folder`) interleaved with 30 on a working host; every live one must be fetched."""
    hang = [_cand(f"{hosts.base_urls['hang']}/{first}", tmp_path, rank=0)]
    hang += [_cand(f"{hosts.base_urls['hang']}/{folder}/{i}.jpg", tmp_path, rank=2 * i) for i in range(1, 30)]
    live = [_cand(f"{hosts.base_urls['ok']}/{folder}-live/{i}.jpg", tmp_path, rank=2 * i + 1) for i in range(30)]
    started = time.monotonic()
    engine = _run(
        _config(timeout_s=1, retries=2, per_host=8, concurrency=8, breaker_failures=5, breaker_open_s=60),
        {"s": (hang + live, 60)},
    )
    assert sum(o.ok for o in engine.outcomes) == 30
    return engine, time.monotonic() - started


def test_host_that_never_answered_costs_one_timeout(hosts: ImageHosts, tmp_path: Path) -> None:
    """Slow start gives a new host 2 connections; if both time out and the host never answered, the
    breaker opens (a host that has worked needs `breaker_failures`): one timeout, in parallel."""
    stats = hosts.stats["hang"]
    stats.max_open_connections = stats.open_connections
    opened_before = stats.open_connections
    requests_before = stats.requests
    engine, elapsed = _hanging_host_beside_a_live_one(hosts, tmp_path, "once/0.jpg", "once")
    timeouts = [a for a in engine.attempts if a["error"] == "timeout"]
    assert len(timeouts) == 2  # two slots, two timeouts, then the breaker: not 5 failures x 8 slots
    assert stats.requests - requests_before == 2
    assert stats.max_open_connections - opened_before <= 2
    assert sum(a["error"] == "circuit_open" for a in engine.attempts) == 30
    # 8 global slots: had the hanging host held them, the 30 live images would wait for its timeouts
    assert elapsed < 1.9, elapsed  # one 1 s timeout, the live images fetched meanwhile


def test_a_host_that_never_answered_starts_no_request_after_a_failure(hosts: ImageHosts, tmp_path: Path) -> None:
    """The first of a new host's two requests is reset at once, the second hangs: the slot the
    reset freed must not start a third request (it would hang too, and the run would wait out
    two timeouts). The hang's timeout then opens the breaker, as in the test above."""
    engine, elapsed = _hanging_host_beside_a_live_one(hosts, tmp_path, "reset/0.jpg", "twice")
    errors = collections.Counter(a["error"] for a in engine.attempts if a["host"] == "127.0.0.20")
    assert errors["reset"] == 1 and errors["timeout"] == 1, errors  # a third request would time out too
    assert elapsed < 1.9, elapsed  # one 1 s timeout, not two


def test_a_host_whose_certificate_is_refused_fails_as_tls_once_per_link(tmp_path: Path) -> None:
    """An https image host whose certificate the client does not trust (expired, self-signed,
    another name: all common on publisher servers) fails as `tls`, not `connect`: the link-rot
    report names the cause, a certificate that stays bad is not retried, and the breaker closes
    the host as for any connection-level failure."""
    served = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        return web.Response(body=image_bytes(str(request.url)), content_type="image/jpeg")

    async def main() -> FetchEngine:
        server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("127.0.0.46").configure_cert(server_side)  # a CA the client never heard of
        app = web.Application()
        app.router.add_get("/{name}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.46", 0, ssl_context=server_side)
        await site.start()
        port = runner.addresses[0][1]
        engine = FetchEngine(_config(retries=3, breaker_failures=5))
        try:
            cands = [_cand(f"https://127.0.0.46:{port}/{i}.jpg", tmp_path, rank=i) for i in range(6)]
            await engine.run({"s": (cands, 6)})
        finally:
            await runner.cleanup()
        return engine

    engine = asyncio.run(main())
    errors = collections.Counter(a["error"] for a in engine.attempts)
    assert errors == {"tls": 2, "circuit_open": 4}, errors  # never answered: the breaker opens after 2
    assert all("certificate" in (a["detail"] or "").lower() for a in engine.attempts if a["error"] == "tls")
    assert served == 0 and not any(o.ok for o in engine.outcomes)


def test_a_host_pause_lies_between_the_backoff_base_and_max() -> None:
    """A 429 or 5xx pauses its whole host: at least backoff_base_s ('Retry-After: 0' too) and at
    most backoff_max_s, so a request retrying on a host that asked for an hour (whose breaker
    the engine then holds open) never sleeps inside the run for that hour."""
    from gbif_assets.fetch.engine import _HostLimit

    for status, asked in [(429, 0.0), (503, 0.0), (429, 3600.0), (503, 3600.0), (429, None)]:
        limit = _HostLimit(8, min_pause_s=0.5, max_pause_s=30.0)
        limit.answered(limit.started + 1, status, asked)
        wait = limit.wait_s(time.monotonic())
        assert wait is not None and 0.49 <= wait <= 30.0, (status, asked, wait)


def test_breaker_waits_longer_for_a_host_that_has_worked() -> None:
    from gbif_assets.fetch.engine import _Breaker

    breaker = _Breaker(failures=5, open_s=60)
    for _ in range(4):
        breaker.record("proven", "timeout", proven=True)
    assert not breaker.is_open("proven")
    breaker.record("proven", "timeout", proven=True)
    assert breaker.is_open("proven")
    breaker.record("new", "timeout", proven=False)
    assert not breaker.is_open("new")
    breaker.record("new", "connect", proven=False)
    assert breaker.is_open("new")


def test_an_image_of_a_format_the_recipe_leaves_out_is_refused_and_replaced(hosts: ImageHosts, tmp_path: Path) -> None:
    """`filters.formats: [image/jpeg]` and a publisher serving PNG under a JPEG record: the PNG is
    refused (`unwanted_format`, not kept, not retried), the next reserve takes its place, and a
    refresh that narrows the formats removes the files of the format it dropped."""
    home = tmp_path / "home"
    manifest = tmp_path / "manifest.parquet"
    _manifest(manifest, hosts.base_urls["ok"], 12, png_every=3)  # 4 PNGs among 12
    table = pq.read_table(manifest).to_pylist()
    for row in table:
        row["stream_target"], row["selected"] = 6, row["rank"] <= 6
    pq.write_table(pa.Table.from_pylist(table), manifest)
    cache = f"{hosts.base_urls['ok']}/v1/image/cache"  # GBIF's copy stands in for dead links only
    config = _config(formats=("image/jpeg",), gbif_image_cache_fallback=True, image_cache_base=cache)
    result = download_label(manifest, "L1", home, config)
    kept = sorted(p.suffix for p in home.glob("images/*/L1/*.*"))
    assert result.kept == 6 and kept == [".jpg"] * 6
    log = pq.read_table(home / "metadata" / "downloads" / "L1.parquet").to_pylist()
    assert not [r for r in log if r["source"] == "gbif_cache"]
    refused = [r for r in log if r["error"] == "unwanted_format"]
    assert refused and all(r["url"].endswith(".png") and r["attempt"] == 1 for r in refused)
    assert "image/png is not in filters.formats" in refused[0]["detail"]
    assert not list(home.glob("images/*/L1/.*"))

    both = download_label(manifest, "L1", tmp_path / "home2", _config(formats=("image/jpeg", "image/png")))
    assert both.kept == 6 and {p.suffix for p in (tmp_path / "home2").glob("images/*/L1/*.*")} == {".jpg", ".png"}
    narrowed = download_label(manifest, "L1", tmp_path / "home2", _config(formats=("image/jpeg",)))
    assert narrowed.kept == 6
    assert sorted(p.suffix for p in (tmp_path / "home2").glob("images/*/L1/*.*")) == [".jpg"] * 6
    # the same with resized copies: a resized PNG is a PNG and leaves with its format (the
    # emulator's JPEGs differ only in a comment, which resizing drops: some become duplicates)
    resized = tmp_path / "home3"
    download_label(manifest, "L1", resized, _config(formats=("image/jpeg", "image/png"), resize_max_side=100))
    assert ".png" in {p.suffix for p in resized.glob("images/*/L1/*.*")}
    result = download_label(manifest, "L1", resized, _config(formats=("image/jpeg",), resize_max_side=100))
    assert {p.suffix for p in resized.glob("images/*/L1/*.*")} == {".jpg"}
    assert result.kept == len(list(resized.glob("images/*/L1/*.*")))


def test_a_host_one_label_found_dead_is_skipped_by_the_next_labels(hosts: ImageHosts, tmp_path: Path) -> None:
    """A server that accepts and never answers costs its timeouts in the first label only: the
    labels fetched after it (within partition.HOST_MEMORY_S) skip it from the start, and their
    reserves on live hosts take its places."""
    home = tmp_path / "home"
    rows = []
    for label in ("L1", "L2", "L3"):
        urls = [f"{hosts.base_urls['hang']}/{label}/{i}.jpg" for i in range(3)]
        urls += [f"{hosts.base_urls['ok']}/memory/{label}/{i}.jpg" for i in range(3)]
        for rank, url in enumerate(urls, start=1):
            rows.append({"label": label, "identifier": url, "url_sha1": hashlib.sha1(url.encode()).hexdigest(),
                         "gbifID": str(len(rows)), "stream": "s", "rank": rank, "selected": rank <= 3,
                         "split": "train", "stream_target": 3})  # fmt: skip
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    config = _config(timeout_s=1, retries=1)
    first = download_label(manifest, "L1", home, config)
    assert first.kept == 3 and first.failures.get("timeout", 0) >= 1
    asked = hosts.stats["hang"].requests
    started = time.monotonic()
    for label in ("L2", "L3"):
        result = download_label(manifest, label, home, config)
        assert result.kept == 3 and "timeout" not in result.failures
        log = pq.read_table(home / "metadata" / "downloads" / f"{label}.parquet").to_pylist()
        skipped = [r for r in log if "/L" in r["url"] and r["host"] == "127.0.0.20"]
        assert skipped and {r["error"] for r in skipped} == {"circuit_open"}
        assert "closed in an earlier label's run" in skipped[0]["detail"]
    assert hosts.stats["hang"].requests == asked  # not asked again
    assert time.monotonic() - started < 1.5  # no timeout waited
    memory = json.loads((home / "metadata" / "hosts" / "L1.json").read_text())
    assert memory["127.0.0.20"]["closed"]["paused"] is False
    for label in ("L2", "L3"):  # skipping the host is no new sighting: the memory runs from L1's
        assert "127.0.0.20" not in json.loads((home / "metadata" / "hosts" / f"{label}.json").read_text())


def test_requests_waiting_out_a_pause_give_up_as_soon_as_the_host_is_closed() -> None:
    """A request waiting out a host's 20 s Retry-After pause leaves as soon as the host is closed
    (its breaker, or another request's verdict), instead of sleeping out a pause for a host the
    run has given up on; the caller then fails it as host_paused or circuit_open."""
    from gbif_assets.fetch.engine import _HostLimit

    async def main() -> float:
        limit = _HostLimit(ceiling=2, min_pause_s=0.5, max_pause_s=30)
        limit.paused_until = time.monotonic() + 20
        closed = False
        waiting = asyncio.create_task(limit.acquire(lambda: closed))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        started = time.monotonic()
        closed = True
        limit.wake()
        await asyncio.wait_for(waiting, timeout=5)
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.5


def test_a_changed_label_takes_its_files_from_the_dropped_labels_folders(hosts: ImageHosts, tmp_path: Path) -> None:
    """The recipe's `label` field changed (speciesKey to species): the same images now belong to
    a label with another folder. The new label's run moves them from the folder of the label the
    manifest dropped instead of fetching them again."""
    home = tmp_path / "home"
    old = _manifest(tmp_path / "old.parquet", hosts.base_urls["ok"], 10, label="5352251")
    assert download_label(old, "5352251", home, _config()).kept == 10
    table = pq.read_table(old).to_pylist()
    new = tmp_path / "new.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "label": "Fallopia japonica"} for r in table]), new)
    before = hosts.stats["ok"].requests
    result = download_label(new, "Fallopia japonica", home, _config())
    assert result.kept == 10 and result.fetched == 0
    assert hosts.stats["ok"].requests == before  # nothing fetched again
    folder = label_dir("Fallopia japonica")
    assert len(list(home.glob(f"images/*/{folder}/*.jpg"))) == 10
    assert not list(home.glob("images/*/5352251/*.jpg"))
    kept = pq.read_table(home / "metadata" / "partitions" / f"{folder}.parquet").to_pylist()
    assert {r["label"] for r in kept} == {"Fallopia japonica"} and all((home / r["path"]).exists() for r in kept)
