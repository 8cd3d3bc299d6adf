"""The GBIF API emulator: occurrence search, downloads, DOIs, derived datasets, image cache.

Answers follow the recordings in `data/recorded/`: status codes, bodies, and Content-Type exactly
`application/json` (pygbif rejects a charset suffix). Behaviour the recordings cannot show
(300 cap, 100,000 offset limit, 420, 410, Basic auth) follows GBIF's documented rules.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gbif_assets.emulator import archives
from gbif_assets.emulator.imagehosts import image_bytes
from gbif_assets.emulator.pool import OccurrencePool, facet_counts

JSON = "application/json"
STATE: web.AppKey[GbifEmulator] = web.AppKey("state")
MAX_LIMIT = 300
MAX_OFFSET_WINDOW = 100_000
RESERVED = {
    "limit",
    "offset",
    "facet",
    "facetLimit",
    "facetOffset",
    "facetMincount",
    "facetMultiselect",
}
ACCEPTED_REQUEST_KEYS = {
    "creator", "notificationAddresses", "notification_address", "sendNotification", "format",
    "predicate", "type", "verbatimExtensions", "description", "machineDescription", "checklistKey",
}  # fmt: skip
FORMATS = {"DWCA", "SIMPLE_CSV", "SPECIES_LIST", "SIMPLE_PARQUET"}
RUNNING_STATES = {"PREPARING", "RUNNING"}
BULK_429 = [
    "To download GBIF occurrence data in bulk, please request a download through the website "
    "<https://www.gbif.org/occurrence/search>, the API <https://techdocs.gbif.org/en/data-use/api-downloads>, "
    "or use the free public cloud datasets <https://www.gbif.org/occurrence-snapshot>.",
    "We can also provide data about downloads, datasets, citations and so on in CSV or some other "
    "format, please contact helpdesk@gbif.org.",
]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with GBIF's exact content type."""
    response = web.Response(status=status, body=json.dumps(data).encode(), headers=headers)
    response.headers["Content-Type"] = JSON
    return response


def text_response(text: str, status: int, content_type: str = "text/plain") -> web.Response:
    response = web.Response(status=status, body=text.encode())
    response.headers["Content-Type"] = content_type
    return response


@dataclass
class EmulatorConfig:
    """Knobs tests turn: timings, injected faults, users."""

    users: dict[str, str] = field(default_factory=lambda: {"gbif_user": "gbif_password"})
    preparing_s: float = 0.2
    running_s: float = 0.2
    max_running_per_user: int = 3
    search_429_every: int = 0  # every Nth search answers 429 (0 = never)
    search_429_count: int = 0  # the next N searches answer 429
    retry_after: str = "1"
    media_layout: str = "current"  # or "2014"
    with_multimedia: bool = True
    next_download_status: str | None = None  # force the next download into a state
    cut_file_transfers: int = 0  # the next N archive transfers stop half-way


@dataclass
class Download:
    key: str
    user: str
    predicate: dict[str, Any]
    fmt: str
    created: float
    doi: str
    forced: str | None = None
    path: Path | None = None
    records: int = 0
    datasets: dict[str, int] = field(default_factory=dict)
    license: str = "unspecified"


class GbifEmulator:
    """State of the emulated GBIF: pool, downloads, derived datasets."""

    def __init__(self, pool: OccurrencePool, workdir: Path, config: EmulatorConfig | None = None) -> None:
        self.pool = pool
        self.workdir = workdir
        self.config = config or EmulatorConfig()
        self.downloads: dict[str, Download] = {}
        self.derived: list[dict[str, Any]] = []
        self.search_requests: list[str] = []
        self._counter = 0
        self._search_count = 0
        self._lock = asyncio.Lock()

    # -- downloads ---------------------------------------------------------------------------

    def status_of(self, download: Download) -> str:
        if download.forced:
            return download.forced
        elapsed = time.time() - download.created
        if elapsed < self.config.preparing_s:
            return "PREPARING"
        if elapsed < self.config.preparing_s + self.config.running_s:
            return "RUNNING"
        return "SUCCEEDED"

    def set_status(self, key: str, status: str) -> None:
        """Force a download into any GBIF state (tests, admin endpoint)."""
        if status not in {
            "PREPARING",
            "RUNNING",
            "SUCCEEDED",
            "CANCELLED",
            "KILLED",
            "FAILED",
            "SUSPENDED",
            "FILE_ERASED",
        }:
            raise ValueError(f"unknown status {status}")
        self.downloads[key].forced = status

    def _new_key(self) -> str:
        self._counter += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%y%m%d%H%M%S") + "000"
        return f"{self._counter:07d}-{stamp}"

    def _ensure_file(self, download: Download) -> Path:
        if download.path is None:
            records = [r for r in self.pool.snapshot() if archives.evaluate(download.predicate, r)]
            path = self.workdir / "files" / f"{download.key}.zip"
            download.records = archives.build_archive(
                path,
                download.key,
                download.doi,
                records,
                fmt=download.fmt,
                media_layout=self.config.media_layout,
                with_multimedia=self.config.with_multimedia,
            )
            for record in records:
                dataset = record.get("datasetKey")
                if dataset:
                    download.datasets[dataset] = download.datasets.get(dataset, 0) + 1
            download.path = path
        return download.path

    def describe(self, download: Download, base: str) -> dict[str, Any]:
        status = self.status_of(download)
        done = status in ("SUCCEEDED", "FILE_ERASED")
        if status == "SUCCEEDED":
            self._ensure_file(download)
        created = dt.datetime.fromtimestamp(download.created, dt.UTC)
        return {
            "key": download.key,
            "doi": download.doi,
            "license": download.license,
            "request": {
                "predicate": download.predicate,
                "sendNotification": False,
                "format": download.fmt,
                "type": "OCCURRENCE",
                "verbatimExtensions": [],
            },
            "created": created.isoformat(timespec="milliseconds"),
            "modified": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "eraseAfter": (created + dt.timedelta(days=182)).isoformat(timespec="milliseconds"),
            "status": status,
            "downloadLink": f"{base}/occurrence/download/request/{download.key}.zip",
            "size": download.path.stat().st_size if done and download.path else 0,
            "totalRecords": download.records if done else 0,
            "numberDatasets": len(download.datasets) if done else 0,
        }


def _auth_user(request: web.Request, state: GbifEmulator) -> str | web.Response:
    header = request.headers.get("Authorization", "")
    user = ""
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
        if user and state.config.users.get(user) == password:
            return user
    return text_response(f"Failed to authenticate user {user}\n", 401)


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/v1"


def _find(state: GbifEmulator, ident: str) -> Download | None:
    if ident in state.downloads:
        return state.downloads[ident]
    for download in state.downloads.values():
        if download.doi.lower() == ident.lower():
            return download
    return None


async def search(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    state.search_requests.append(request.query_string)
    state._search_count += 1
    config = state.config
    if config.search_429_count > 0 or (config.search_429_every and state._search_count % config.search_429_every == 0):
        config.search_429_count = max(0, config.search_429_count - 1)
        return json_response(BULK_429, status=429, headers={"Retry-After": config.retry_after})
    try:
        limit = int(request.query.get("limit", "20"))
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return json_response({"message": "limit and offset must be integers"}, status=400)
    if limit < 0 or offset < 0:
        return json_response({"message": "limit and offset must not be negative"}, status=400)
    if offset + limit > MAX_OFFSET_WINDOW:
        return text_response(f"Max offset of {MAX_OFFSET_WINDOW} exceeded: {offset} + {limit}", 400)
    limit = min(limit, MAX_LIMIT)
    filters: dict[str, list[str]] = {}
    for name, value in request.query.items():
        if name not in RESERVED:
            filters.setdefault(name, []).append(value)
    matched = state.pool.search(filters)
    body: dict[str, Any] = {
        "offset": offset,
        "limit": limit,
        "endOfRecords": offset + limit >= len(matched),
        "count": len(matched),
        "results": [_public(r) for r in matched[offset : offset + limit]],
    }
    facets = request.query.getall("facet", [])
    if facets:
        facet_limit = int(request.query.get("facetLimit") or 10)
        facet_offset = int(request.query.get("facetOffset") or 0)
        body["facets"] = []
        for facet in facets:
            counts = facet_counts(matched, facet)
            ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            window = ordered[facet_offset : facet_offset + facet_limit]
            body["facets"].append(
                {
                    "field": _facet_name(facet),
                    "counts": [{"name": n, "count": c} for n, c in window],
                }
            )
    return json_response(body)


def _facet_name(facet: str) -> str:
    out = "".join("_" + c if c.isupper() else c for c in facet)
    return out.upper()


def _public(record: dict[str, Any]) -> dict[str, Any]:
    if not any("original_identifier" in m for m in record.get("media", [])):
        return record
    out = dict(record)
    out["media"] = [{k: v for k, v in m.items() if k != "original_identifier"} for m in record["media"]]
    return out


async def occurrence(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    record = state.pool.get(request.match_info["key"])
    if record is None:
        return text_response("Occurrence not found", 404)
    return json_response(_public(record))


async def _authed_json(request: web.Request) -> tuple[str, Any] | web.Response:
    """(user, JSON body) of a Basic-auth POST, or GBIF's 401/400 answer."""
    user = _auth_user(request, request.app[STATE])
    if isinstance(user, web.Response):
        return user
    try:
        return user, await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return text_response("Request body is not valid JSON", 400)


async def request_download(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    authed = await _authed_json(request)
    if isinstance(authed, web.Response):
        return authed
    user, body = authed
    if not isinstance(body, dict):
        return text_response("Request body must be a JSON object", 400)
    unknown = sorted(set(body) - ACCEPTED_REQUEST_KEYS)
    if unknown:
        return text_response(f'Unrecognized field "{unknown[0]}"', 400)
    fmt = body.get("format", "DWCA")
    if fmt not in FORMATS:
        return text_response(f"Unknown download format {fmt}", 400)
    predicate = body.get("predicate")
    try:
        archives.validate(predicate)
    except archives.PredicateError as exc:
        return text_response(f"Invalid predicate: {exc}", 400)
    creator = body.get("creator")
    if creator and creator != user:
        return text_response(f"Creator {creator} does not match authenticated user {user}", 400)
    async with state._lock:
        canonical = json.dumps(predicate, sort_keys=True)
        for existing in state.downloads.values():
            fresh = time.time() - existing.created < 48 * 3600
            usable = state.status_of(existing) in ("PREPARING", "RUNNING", "SUCCEEDED")
            same = json.dumps(existing.predicate, sort_keys=True) == canonical and existing.fmt == fmt
            if existing.user == user and same and fresh and usable:
                return text_response(existing.key, 201, JSON)
        running = sum(1 for d in state.downloads.values() if d.user == user and state.status_of(d) in RUNNING_STATES)
        if running >= state.config.max_running_per_user:
            return text_response(f"Too many simultaneous downloads: user {user} already has {running} running", 420)
        key = state._new_key()
        doi = "10.15468/dl." + hashlib.sha1(key.encode()).hexdigest()[:6]
        download = Download(key=key, user=user, predicate=predicate, fmt=fmt, created=time.time(), doi=doi)
        if state.config.next_download_status:
            download.forced = state.config.next_download_status
            state.config.next_download_status = None
        state.downloads[key] = download
    return text_response(key, 201, JSON)


async def download_status(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    ident = request.match_info["ident"]
    download = _find(state, ident)
    if download is None:
        return text_response("Download was not found", 404)
    return json_response(state.describe(download, _base(request)))


async def cancel_download(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    user = _auth_user(request, state)
    if isinstance(user, web.Response):
        return user
    download = state.downloads.get(request.match_info["key"])
    if download is None:
        return text_response("Download was not found", 404)
    download.forced = "CANCELLED"
    return web.Response(status=204)


async def download_file(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    download = state.downloads.get(request.match_info["key"])
    if download is None:
        return text_response("Download was not found", 404)
    status = state.status_of(download)
    if status == "FILE_ERASED":
        return text_response(f"Download {download.key} has been erased", 410)
    if status != "SUCCEEDED":
        return text_response(f"Download {download.key} is not ready ({status})", 404)
    state._ensure_file(download)
    raise web.HTTPFound(f"{request.scheme}://{request.host}/files/{download.key}.zip")


async def serve_file(request: web.Request) -> web.StreamResponse:
    state: GbifEmulator = request.app[STATE]
    download = state.downloads.get(request.match_info["key"])
    if download is None or download.path is None or state.status_of(download) == "FILE_ERASED":
        return text_response("Not Found", 404)
    data = download.path.read_bytes()
    start, end = 0, len(data) - 1
    status = 200
    range_header = request.headers.get("Range")
    if range_header and range_header.startswith("bytes="):
        first, _, last = range_header[6:].partition("-")
        start = int(first or 0)
        end = int(last) if last else len(data) - 1
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        status = 206
    body = data[start : end + 1]
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(body)),
        "Accept-Ranges": "bytes",
    }
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    if state.config.cut_file_transfers > 0:
        state.config.cut_file_transfers -= 1
        await response.write(body[: len(body) // 2])
        assert request.transport is not None
        request.transport.abort()
        return response
    for i in range(0, len(body), 1 << 16):
        await response.write(body[i : i + (1 << 16)])
    await response.write_eof()
    return response


async def citation(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    download = _find(state, request.match_info["ident"])
    if download is None:
        return text_response("Download was not found", 404)
    day = dt.datetime.fromtimestamp(download.created, dt.UTC).strftime("%-d %B %Y")
    text = f"GBIF.org ({day}) GBIF Occurrence Download https://doi.org/{download.doi}\n"
    return text_response(text, 200, JSON)


async def download_datasets(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    download = _find(state, request.match_info["ident"])
    if download is None:
        return text_response("Download was not found", 404)
    if state.status_of(download) == "SUCCEEDED":
        state._ensure_file(download)
    limit = min(int(request.query.get("limit", "20")), 1000)
    offset = int(request.query.get("offset", "0"))
    items = sorted(download.datasets.items(), key=lambda kv: -kv[1])
    results = [
        {
            "downloadKey": download.key,
            "datasetKey": k,
            "numberRecords": n,
            "publishingCountryCode": "ZZ",
        }
        for k, n in items[offset : offset + limit]
    ]
    return json_response(
        {
            "offset": offset,
            "limit": limit,
            "endOfRecords": offset + limit >= len(items),
            "count": len(items),
            "results": results,
        }
    )


async def derived_dataset(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    authed = await _authed_json(request)
    if isinstance(authed, web.Response):
        return authed
    user, body = authed
    if not isinstance(body, dict):
        return text_response("Request body must be a JSON object", 400)
    missing = [k for k in ("title", "sourceUrl", "relatedDatasets") if not body.get(k)]
    if missing:
        return text_response(f"Missing required field(s): {', '.join(missing)}", 400)
    if not isinstance(body["relatedDatasets"], dict) or not all(
        isinstance(v, int) and v > 0 for v in body["relatedDatasets"].values()
    ):
        return text_response("relatedDatasets must map datasetKey to a positive record count", 400)
    doi = "10.15468/dd." + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:6]
    day = dt.date.today().strftime("%-d %B %Y")
    answer = {
        "doi": doi,
        **({"originalDownloadDOI": body["originalDownloadDOI"]} if body.get("originalDownloadDOI") else {}),
        **({"description": body["description"]} if body.get("description") else {}),
        "citation": f"Derived dataset GBIF.org ({day}) {body['title']} https://doi.org/{doi}",
        "title": body["title"],
        "sourceUrl": body["sourceUrl"],
        "createdBy": user,
        "modifiedBy": user,
    }
    state.derived.append({"request": body, "response": answer})
    return json_response(answer, status=201)


async def image_cache(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    identifier = state.pool.media_identifier(request.match_info["gbif_id"], request.match_info["md5"])
    if identifier is None:
        return text_response("Not Found", 404)
    return web.Response(body=image_bytes(identifier), headers={"Content-Type": "image/jpeg"})


async def admin_status(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    body = await request.json()
    if request.match_info["key"] not in state.downloads:
        return text_response("Download was not found", 404)
    try:
        state.set_status(request.match_info["key"], body["status"])
    except (KeyError, ValueError) as exc:
        return text_response(str(exc), 400)
    return json_response({"key": request.match_info["key"], "status": body["status"]})


async def admin_pool(request: web.Request) -> web.Response:
    state: GbifEmulator = request.app[STATE]
    body = await request.json()
    added = state.pool.add(body.get("add", []))
    removed = state.pool.remove(body.get("remove", []))
    return json_response({"added": added, "removed": removed, "size": len(state.pool)})


def make_app(state: GbifEmulator) -> web.Application:
    """The aiohttp application; the image hosts run as separate servers."""
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/v1/occurrence/search", search)
    app.router.add_get("/v1/occurrence/{key:\\d+}", occurrence)
    app.router.add_post("/v1/occurrence/download/request", request_download)
    app.router.add_get("/v1/occurrence/download/request/{key}.zip", download_file)
    app.router.add_delete("/v1/occurrence/download/request/{key}", cancel_download)
    app.router.add_get("/v1/occurrence/download/{ident:.+}/citation", citation)
    app.router.add_get("/v1/occurrence/download/{ident:.+}/datasets", download_datasets)
    app.router.add_get("/v1/occurrence/download/{ident:.+}", download_status)
    app.router.add_post("/v1/derivedDataset", derived_dataset)
    app.router.add_get("/v1/image/cache/occurrence/{gbif_id}/media/{md5}", image_cache)
    app.router.add_get("/v1/image/cache/{size}/occurrence/{gbif_id}/media/{md5}", image_cache)
    app.router.add_get("/files/{key}.zip", serve_file)
    app.router.add_post("/_emulator/downloads/{key}/status", admin_status)
    app.router.add_post("/_emulator/pool", admin_pool)
    return app
