"""One label's images: read its manifest rows, fetch to quota, write its own Parquet files.

A partition touches only `images/*/<label>/`, `metadata/partitions/<label>.parquet` and
`metadata/downloads/<label>.parquet`, so a backfill can run every label in parallel. After a
crash (even `kill -9`) no partial file sits at a final path; a re-run counts the verified files
already there and fetches only what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from gbif_assets.fetch.engine import Candidate, FetchConfig, FetchEngine, Outcome, Progress, host_of
from gbif_assets.fetch.verify import verify_image
from gbif_assets.files import write_json_atomic

MTIME_SLACK_S = 2.0  # a kept file modified later than this after its fetch is checked again
HOST_MEMORY_S = 600.0  # how long a host one label found dead is skipped by the labels after it
# failures that say the link itself is no good, not that its host was busy or down at the time, nor
# that this client's settings refused it (blocked, too_large, unwanted_format: a changed setting may
# let it through)
FINAL_ERRORS = {"not_image", "decode_error", "too_many_redirects", "http_3xx", "duplicate"}
KEPT_SCHEMA = pa.schema(
    [
        ("url", pa.string()), ("url_sha1", pa.string()), ("path", pa.string()), ("split", pa.string()),
        ("label", pa.string()), ("gbifID", pa.string()), ("stream", pa.string()), ("rank", pa.int32()),
        ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()),
        ("mime", pa.string()), ("source", pa.string()), ("fetched_at", pa.timestamp("us", tz="UTC")),
    ]
)  # fmt: skip
ATTEMPT_SCHEMA = pa.schema(
    [
        ("url", pa.string()), ("host", pa.string()), ("final_url", pa.string()), ("status", pa.int32()),
        ("error", pa.string()), ("detail", pa.string()), ("bytes", pa.int64()), ("ms", pa.float64()),
        ("attempt", pa.int32()), ("source", pa.string()), ("stream", pa.string()), ("gbifID", pa.string()),
        ("fetched_at", pa.timestamp("us", tz="UTC")),
    ]
)  # fmt: skip


def label_dir(label: str) -> str:
    """A label value as a folder name. GBIF keys are digits and stay as they are; a label that
    needs escaping gets a short hash of itself, so "Mentha piperita" and "Mentha × piperita"
    stay two classes (two folders), not one."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    if cleaned == label:
        return label
    return f"{cleaned or '_'}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def label_lock(home: Path, label: str) -> Iterator[None]:
    """One run per label at a time: a second run of the same partition (the UI and the command
    line, say) would delete the first one's files in flight. It fails at once, saying so."""
    path = home / "metadata" / "partitions" / f".{label_dir(label)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabelBusy(f"label {label!r} is being downloaded by another run right now; wait for it") from None
        yield


class LabelBusy(RuntimeError):
    """Another run holds the label."""


class _AttemptLog:
    """metadata/downloads/<label>.parquet, written as the fetch goes: twice a second the new rows
    are appended to this run's journal beside it (an Arrow IPC stream on an unbuffered file, so
    every batch is in the kernel's hands when the write returns), and the journals are folded into
    the log at the end or, after a kill, at the start of the next run. A kill loses at most the
    attempts of its last half second (a batch cut in the middle is dropped): the files it finished
    then are logged from disk by the next run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self.run = f"{os.getpid()}-{time.time_ns()}"
        self._journal: tuple[BinaryIO, pa.ipc.RecordBatchStreamWriter] | None = None

    def fold(self, more: Sequence[dict[str, Any]] = ()) -> None:
        """Log + every journal + `more` -> the log, atomically; then the journals go."""
        if self._journal is not None:
            sink, writer = self._journal
            writer.close()
            sink.close()
            self._journal = None
        journals = sorted(self.path.parent.glob(f"{self.path.name}.journal-*"))
        if not journals and not more and self.path.exists():
            return
        rows = _read_rows(self.path)
        for journal in journals:
            rows += _read_journal(journal)
        _write_parquet(pa.Table.from_pylist(rows + list(more), schema=ATTEMPT_SCHEMA), self.path)
        for journal in journals:
            journal.unlink(missing_ok=True)

    def flush(self, attempts: list[dict[str, Any]]) -> None:
        """Append the rows not yet on disk to this run's journal."""
        new = attempts[self.written :]
        if not new:
            return
        if self._journal is None:
            sink = open(self.path.parent / f"{self.path.name}.journal-{self.run}", "wb", buffering=0)  # noqa: SIM115
            self._journal = sink, pa.ipc.new_stream(sink, ATTEMPT_SCHEMA)
        self._journal[1].write_batch(pa.RecordBatch.from_pylist(new, schema=ATTEMPT_SCHEMA))
        self.written += len(new)

    def refused(self) -> set[str]:
        """URLs whose publisher refused them for good (a 404, not an image...) and that
        no attempt ever fetched: a rebuild does not ask again. Transient failures (timeouts, 5xx,
        429, a closed breaker) are asked again, as a fresh build would."""
        rows = _read_rows(self.path)
        final = {r["url"] for r in rows if r["error"] in FINAL_ERRORS or _client_error(r["error"])}
        return final - {r["url"] for r in rows if r["error"] is None}

    def sources(self) -> dict[str, str]:
        """url -> where its kept copy came from (publisher or gbif_cache), from the log's successes."""
        return {r["url"]: r["source"] for r in _read_rows(self.path) if r["error"] is None and r["source"]}


def _client_error(error: str | None) -> bool:
    """An HTTP 4xx other than 429 (Too Many Requests, which asks for patience)."""
    return error is not None and error.startswith("http_4") and error != "http_429"


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The whole batches of a journal; a kill -9 may have cut its last one (or its header)."""
    rows: list[dict[str, Any]] = []
    try:
        with pa.ipc.open_stream(pa.OSFile(str(path))) as reader:
            for batch in reader:
                rows += batch.to_pylist()
    except (pa.ArrowInvalid, OSError, EOFError):
        pass
    return rows


@dataclass
class LabelFetchResult:
    """What one partition achieved (the `images` asset's metadata)."""

    label: str
    target: int
    kept: int
    already_present: int
    fetched: int
    rescued_by_gbif_cache: int
    failures: dict[str, int]
    shortfall: list[dict[str, Any]]
    attempts: int
    seconds: float
    images_per_second: float
    log_path: Path
    kept_path: Path
    vanished: int = 0
    vanished_policy: str = "keep"
    surplus_removed: int = 0
    notes: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """The progress-line shape, for the final log line."""
        return {"done": self.kept, "target": self.target, "rate": self.images_per_second,
                "failed": sum(self.failures.values()), "failures": self.failures, "eta_s": 0}  # fmt: skip


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if path.exists() else []


def _manifest_rows(manifest: Path, label: str) -> list[dict[str, Any]]:
    con = duckdb.connect()
    try:
        cur = con.execute(
            """SELECT identifier AS url, url_sha1, "gbifID", stream, rank, selected, split, stream_target
               FROM read_parquet(?) WHERE label = ? ORDER BY stream, rank""",
            [str(manifest), label],
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def _files_by_sha1(home: Path, folder: str) -> dict[str, Path]:
    """The label's image files in every split folder, by the sha1 of their URL (their name)."""
    found: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(home / "images" / split / folder):
                if entry.is_file() and not entry.name.startswith("."):
                    found.setdefault(entry.name.split(".", 1)[0], Path(entry.path))
    return found


def _files_of_dropped_labels(home: Path, manifest: Path, wanted: set[str]) -> dict[str, Path]:
    """The `wanted` images that sit in the folders of labels the manifest no longer has (the
    recipe's `label` field changed, or GBIF re-identified an occurrence), by the sha1 of their
    URL. No partition run owns those folders any more, so this label takes its files from them
    instead of fetching them again; image_metadata deletes what is left there."""
    con = duckdb.connect()
    try:
        labels = {
            label_dir(str(v))
            for (v,) in con.execute("SELECT DISTINCT label FROM read_parquet(?)", [str(manifest)]).fetchall()
        }
    finally:
        con.close()
    found: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        with contextlib.suppress(FileNotFoundError):
            for folder in os.scandir(home / "images" / split):
                if not folder.is_dir() or folder.name in labels:
                    continue
                for entry in os.scandir(folder.path):
                    sha1 = entry.name.split(".", 1)[0]
                    if sha1 in wanted and entry.is_file() and not entry.name.startswith("."):
                        found.setdefault(sha1, Path(entry.path))
    return found


def _move(
    found: Path, dest: Path, home: Path, record: dict[str, Any] | None, split: str
) -> tuple[Path | None, dict[str, Any] | None]:
    """A file whose occurrence now falls in another split (or that a dropped label's folder
    holds) goes to its folder (its times kept, so it stays trusted), with its row updated; a
    refresh does not fetch it again."""
    dest.mkdir(parents=True, exist_ok=True)
    moved = dest / found.name
    if record is not None and record.get("path") == found.relative_to(home).as_posix():
        record = {**record, "path": moved.relative_to(home).as_posix(), "split": split}
    try:
        os.replace(found, moved)
    except FileNotFoundError:  # a dropped label's file, removed meanwhile by image_metadata: fetched again
        return None, record
    return moved, record


def download_label(
    manifest_parquet: Path,
    label: str,
    home: Path,
    config: FetchConfig,
    progress: Callable[[Progress], None] | None = None,
    vanished: str = "keep",
) -> LabelFetchResult:
    """Fetch one label to quota; see the module docstring for what it writes.

    After a refresh, files whose media left the manifest are `vanished`: kept with their old
    row (`vanished="keep"`) or deleted (`"remove"`). Files beyond a stream's target (the balance
    shrank) are deleted, so the set stays balanced and every file keeps a row.
    """
    if not manifest_parquet.exists():
        raise FileNotFoundError(f"{manifest_parquet} not found: materialize `media_manifest` first")
    with label_lock(home, label):
        return _download_label(manifest_parquet, label, home, config, progress, vanished)


def _download_label(
    manifest_parquet: Path,
    label: str,
    home: Path,
    config: FetchConfig,
    progress: Callable[[Progress], None] | None,
    vanished: str,
) -> LabelFetchResult:
    started = time.monotonic()
    rows = _manifest_rows(manifest_parquet, label)
    if not rows:
        raise ValueError(f"label {label!r} has no candidates in {manifest_parquet}")
    folder = label_dir(label)
    for split in ("train", "val", "test"):
        for stale in (home / "images" / split / folder).glob(".*.part"):
            stale.unlink(missing_ok=True)  # left by a killed run; never at a final path
    kept_path = home / "metadata" / "partitions" / f"{folder}.parquet"
    log_path = home / "metadata" / "downloads" / f"{folder}.parquet"
    log = _AttemptLog(log_path)
    config = dataclasses.replace(config, closed_hosts=config.closed_hosts | closed_hosts(home))
    engine = FetchEngine(config, progress, on_attempts=log.flush)
    # a large label's shard processes start now: their start-up overlaps the planning
    with engine.shards_started_early(len(rows)):
        log.fold()  # the attempts of a run that was killed, from its journal
        previous = {r["url_sha1"]: r for r in _read_rows(kept_path)}
        on_disk = _files_of_dropped_labels(home, manifest_parquet, {r["url_sha1"] for r in rows})
        on_disk |= _files_by_sha1(home, folder)
        plan = _plan(rows, label, folder, home, config, previous, on_disk, log.sources(), log.refused())
        engine.kept_sha256 = {r["sha256"]: str(home / r["path"]) for r in plan.kept if r.get("sha256")}
        todo = plan.todo
        outcomes: list[Outcome] = asyncio.run(engine.run(todo)) if any(t for _, t in todo.values()) else []
    kept, recovered, present = plan.kept, plan.recovered, plan.present
    by_sha = {r["url_sha1"]: r for r in rows}
    for outcome in outcomes:
        if outcome.ok and outcome.path and outcome.verified:
            v = outcome.verified
            row = by_sha[outcome.candidate.url_sha1]
            source = outcome.source or "publisher"
            kept.append(
                _kept_row(
                    row,
                    label,
                    outcome.path,
                    home,
                    v.sha256,
                    v.width,
                    v.height,
                    v.size,
                    v.mime,
                    source,
                    outcome.fetched_at,
                )
            )
    _remember_hosts(home, folder, engine.host_report())
    gone, surplus = _reconcile(home, folder, rows, kept, previous, vanished, manifest_parquet)
    log.fold(engine.attempts[log.written :] + _not_logged(log_path, recovered))
    _write_parquet(pa.Table.from_pylist(kept, schema=KEPT_SCHEMA), kept_path)
    targets = {s: int(r["stream_target"]) for r in rows for s in [r["stream"]]}
    got = Counter(r["stream"] for r in kept)
    shortfall = [
        {"stream": s, "target": t, "kept": got[s], "missing": t - got[s]}
        for s, t in sorted(targets.items())
        if got[s] < t
    ]
    seconds = time.monotonic() - started
    fetched = sum(1 for o in outcomes if o.ok)
    return LabelFetchResult(
        label=label,
        target=sum(targets.values()),
        kept=len(kept),
        already_present=sum(present.values()),
        fetched=fetched,
        rescued_by_gbif_cache=sum(1 for o in outcomes if o.ok and o.source == "gbif_cache"),
        failures=dict(Counter(a["error"] for a in engine.attempts if a["error"])),
        shortfall=shortfall,
        attempts=len(engine.attempts),
        seconds=round(seconds, 2),
        images_per_second=round(fetched / seconds, 1) if seconds else 0.0,
        log_path=log_path,
        kept_path=kept_path,
        vanished=gone,
        vanished_policy=vanished,
        surplus_removed=surplus,
        notes=([f"{len(shortfall)} stream(s) short of target: candidates ran out"] if shortfall else [])
        + ([f"{gone} file(s) whose media left GBIF or the filters: {vanished}"] if gone else []),
    )


@dataclass
class _Plan:
    """What a partition run starts from: the files kept as they are, those a killed run finished,
    and per stream the candidates to fetch with how many more images the stream needs."""

    kept: list[dict[str, Any]]
    recovered: list[dict[str, Any]]
    present: Counter[str]
    todo: dict[str, tuple[list[Candidate], int]]


def _plan(
    rows: list[dict[str, Any]],
    label: str,
    folder: str,
    home: Path,
    config: FetchConfig,
    previous: dict[str, dict[str, Any]],
    on_disk: dict[str, Path],
    sources: dict[str, str],
    refused: set[str],
) -> _Plan:
    """Which files on disk stay, and which candidates each stream fetches."""
    kept: list[dict[str, Any]] = []
    recovered: list[dict[str, Any]] = []  # files a killed run finished after its journal's last batch
    streams: dict[str, tuple[list[Candidate], int]] = {}
    present: Counter[str] = Counter()
    # a stream takes its candidates in rank order, as a fresh build does: a file on disk fills a
    # place only while the candidates before it (on disk, or to fetch) leave one free, so a new
    # seed or licence list fetches what it now selects and drops what it no longer needs
    committed: Counter[str] = Counter()
    for row in rows:
        dest = home / "images" / row["split"] / folder
        found = on_disk.get(row["url_sha1"])
        record = previous.get(row["url_sha1"])
        if found is not None and _no_longer_allowed(found, record, config):
            found.unlink()
            continue
        if found is not None and found.parent != dest:  # the split changed: move the file, do not fetch it again
            found, record = _move(found, dest, home, record, row["split"])
        if found is not None and committed[row["stream"]] < row["stream_target"]:
            if _needs_check(record, found, home, config.resize_max_side):
                verified = verify_image(str(found), config.max_pixels, config.resize_max_side, formats=config.formats)
                if verified.error == "unwanted_format":
                    found.unlink()
                    continue
                if not verified.ok or _changed_in_place(record, found, home, verified.sha256, config.resize_max_side):
                    found.unlink()  # broken, or other bytes than the ones fetched: fetch it again
                    found = None
                elif _same_bytes(record, found, home, verified.sha256):
                    _trust_again(record, found)
                else:
                    if found.suffix != f".{verified.ext}":  # resized to another format (a GIF becomes a PNG)
                        found = found.rename(found.with_suffix(f".{verified.ext}"))
                    if record is None:
                        recovered.append(_recovered_attempt(row, found, verified.size))
                    # a file a killed run finished has no row yet: its source is in the attempt log
                    source = record.get("source", "publisher") if record else sources.get(row["url"], "publisher")
                    record = _kept_row(row, label, found, home, verified.sha256, verified.width, verified.height,
                                       verified.size, verified.mime, source, dt.datetime.now(dt.UTC))  # fmt: skip
            if found is not None:
                kept.append(record)
                present[row["stream"]] += 1
                committed[row["stream"]] += 1
                continue
        if found is None and row["url"] in refused:
            continue  # the publisher refused it for good before: not asked again
        committed[row["stream"]] += 1  # expected to succeed; later files on disk become reserves
        cands, _ = streams.setdefault(row["stream"], ([], int(row["stream_target"])))
        cands.append(
            Candidate(
                row["url"],
                row["url_sha1"],
                row["gbifID"],
                row["stream"],
                int(row["rank"]),
                bool(row["selected"]),
                dest,
            )
        )
    todo = {s: (c, max(0, t - present[s])) for s, (c, t) in streams.items()}
    return _Plan(kept, recovered, present, todo)


def _reconcile(
    home: Path,
    folder: str,
    rows: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    previous: dict[str, dict[str, Any]],
    vanished: str,
    manifest_parquet: Path,
) -> tuple[int, int]:
    """Files on disk that are not kept: vanished media (policy), surplus (removed), media that
    moved to another label (re-identified on GBIF: removed here, fetched under its new label), or
    media the recipe's filters now refuse (metadata/excluded.parquet: removed, whatever the policy).
    Label folders left empty are removed: ImageFolder loaders refuse an empty class folder."""
    in_manifest = {r["url_sha1"] for r in rows}
    kept_paths = {r["path"] for r in kept}
    gone = surplus = 0
    strays: list[tuple[Path, str]] = []
    for split in ("train", "val", "test"):
        for path in (home / "images" / split / folder).glob("*.*"):
            rel = path.relative_to(home).as_posix()
            if path.name.startswith(".") or rel in kept_paths:
                continue
            sha1 = path.name.split(".", 1)[0]
            if sha1 in in_manifest:
                path.unlink()
                surplus += 1
            else:
                strays.append((path, sha1))
    moved = _elsewhere_in_manifest(manifest_parquet, [sha1 for _, sha1 in strays]) if strays else set()
    excluded_file = home / "metadata" / "excluded.parquet"
    excluded = (
        set(pq.read_table(excluded_file).column("url_sha1").to_pylist()) if strays and excluded_file.exists() else set()
    )
    for path, sha1 in strays:
        if sha1 in moved or sha1 in excluded or sha1 not in previous:
            # not vanished: GBIF has it, under another label or refused by the recipe; or a file
            # this dataset never fetched (put there by hand)
            path.unlink()
            surplus += 1
            continue
        gone += 1
        if vanished == "keep":
            kept.append(previous[sha1])
        else:
            path.unlink()
    for split in ("train", "val", "test"):
        with contextlib.suppress(OSError):  # not there, or not empty
            (home / "images" / split / folder).rmdir()
    return gone, surplus


def _elsewhere_in_manifest(manifest: Path, sha1s: list[str]) -> set[str]:
    """Which of these URLs the manifest still holds, under any label."""
    con = duckdb.connect()
    try:
        con.register("wanted", pa.table({"url_sha1": pa.array(sha1s, pa.string())}))
        rows = con.execute(
            "SELECT DISTINCT m.url_sha1 FROM read_parquet(?) m JOIN wanted w USING (url_sha1)", [str(manifest)]
        ).fetchall()
    finally:
        con.close()
    return {r[0] for r in rows}


def closed_hosts(home: Path) -> dict[str, tuple[float, str, bool]]:
    """Hosts the labels fetched lately found dead (closed for HOST_MEMORY_S after) or asked to be
    left alone (until the time they gave), unless a later run saw them answer: a museum server
    that is down costs its timeouts once per HOST_MEMORY_S, not once per label. Read from every
    label's metadata/hosts/<label>.json; each partition run writes only its own."""
    latest: dict[str, dict[str, Any]] = {}
    for path in (home / "metadata" / "hosts").glob("*.json"):
        try:
            seen = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # being replaced, or damaged: that label's knowledge is lost
            continue
        for host, state in seen.items() if isinstance(seen, dict) else ():
            if isinstance(state, dict) and state.get("at", 0) > latest.get(host, {}).get("at", 0):
                latest[host] = state
    now, out = time.time(), {}
    for host, state in latest.items():
        closed = state.get("closed")
        if not closed:
            continue
        until = (
            closed["until"]
            if closed["paused"]
            else max(closed["until"], closed.get("since", state["at"]) + HOST_MEMORY_S)
        )
        if until > now:
            when = dt.datetime.fromtimestamp(closed.get("since", state["at"]), dt.UTC).strftime("%H:%M:%S UTC")
            out[host] = (until, f"closed in an earlier label's run at {when}: {closed['why']}", closed["paused"])
    return out


def _remember_hosts(home: Path, folder: str, report: dict[str, dict[str, Any]]) -> None:
    """This label's word on each host it asked: closed (dead, or pausing) or answering."""
    seen = {
        host: {"at": time.time(), "closed": r.get("closed")}
        for host, r in report.items()
        if r.get("closed") or r.get("answers")
    }
    write_json_atomic(home / "metadata" / "hosts" / f"{folder}.json", seen)


def _no_longer_allowed(found: Path, record: dict[str, Any] | None, config: FetchConfig) -> bool:
    """A kept file that the settings now refuse: max_bytes lowered, or its format left
    filters.formats. A resized copy of a JPEG is a JPEG, and of any other format a PNG, so a
    resized PNG stays while the recipe keeps any format but JPEG."""
    if found.stat().st_size > config.max_bytes:
        return True
    mime = record.get("mime") if record else None
    if not (config.formats and mime):
        return False
    if config.resize_max_side and mime == "image/png":
        return not any(kept != "image/jpeg" for kept in config.formats)
    return mime not in config.formats


def _needs_check(record: dict[str, Any] | None, found: Path, home: Path, side: int | None) -> bool:
    """A file on disk is trusted as its row says, unless there is no row, the row is for another
    path, the size changed (cut or replaced since), it was written after it was fetched (changed in
    place, or copied without its times), or it is larger than a resize set since."""
    if record is None or record.get("path") != found.relative_to(home).as_posix():
        return True
    stat = found.stat()
    if record.get("bytes") != stat.st_size:
        return True
    fetched = record.get("fetched_at")
    if fetched is not None and stat.st_mtime > fetched.timestamp() + MTIME_SLACK_S:
        return True
    return bool(side) and max(record.get("width") or 0, record.get("height") or 0) > (side or 0)


def _changed_in_place(
    record: dict[str, Any] | None, found: Path, home: Path, sha256: str | None, side: int | None
) -> bool:
    """Whether a file at its row's path now holds other bytes than the row's (damaged or replaced
    since it was fetched): it still decodes, but it is not the image the row describes. A resize
    set since changes the bytes on purpose."""
    return (record is not None and bool(record.get("sha256")) and sha256 != record.get("sha256")
            and record.get("path") == found.relative_to(home).as_posix()
            and not (side and max(record.get("width") or 0, record.get("height") or 0) > side))  # fmt: skip


def _same_bytes(record: dict[str, Any] | None, found: Path, home: Path, sha256: str | None) -> bool:
    """Whether a re-checked file is the very one its row describes (same path, same content)."""
    return (record is not None and record.get("fetched_at") is not None and sha256 == record.get("sha256")
            and record.get("path") == found.relative_to(home).as_posix())  # fmt: skip


def _trust_again(record: dict[str, Any], found: Path) -> None:
    """A re-checked file whose bytes are the ones fetched keeps its row, and its modification
    time goes back to the fetch, so the next run trusts it without a check (a copied dataset is
    checked once)."""
    fetched = int(record["fetched_at"].timestamp() * 1e9)
    os.utime(found, ns=(found.stat().st_atime_ns, fetched))


def _recovered_attempt(row: dict[str, Any], found: Path, size: int) -> dict[str, Any]:
    """The log row of a download whose file a killed run left verified on disk, after its
    journal's last batch: what the file tells (size, time); what it cannot (status, timing) stays
    empty."""
    return {
        "url": row["url"], "host": host_of(row["url"]), "final_url": None, "status": None, "error": None,
        "detail": "logged from the file on disk: the run that fetched it was killed before logging it",
        "bytes": size, "ms": None, "attempt": None, "source": "publisher", "stream": row["stream"],
        "gbifID": row["gbifID"], "fetched_at": dt.datetime.fromtimestamp(found.stat().st_mtime, dt.UTC),
    }  # fmt: skip


def _not_logged(log_path: Path, recovered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recovered rows whose URL has no successful attempt in the log yet."""
    if not recovered:
        return []
    logged = {r["url"] for r in _read_rows(log_path) if r["error"] is None}
    return [r for r in recovered if r["url"] not in logged]


def _kept_row(row: dict[str, Any], label: str, path: Path, home: Path, sha256: str | None, width: int, height: int,
              size: int, mime: str | None, source: str, fetched_at: dt.datetime | None) -> dict[str, Any]:  # fmt: skip
    return {
        "url": row["url"], "url_sha1": row["url_sha1"], "path": path.relative_to(home).as_posix(),
        "split": row["split"], "label": label, "gbifID": row["gbifID"], "stream": row["stream"],
        "rank": int(row["rank"]), "sha256": sha256, "width": width, "height": height, "bytes": size,
        "mime": mime, "source": source, "fetched_at": fetched_at,
    }  # fmt: skip
