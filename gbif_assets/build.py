"""In-process builds for the command line: the Dagster definitions, run in dependency order.

Dagster's `materialize` runs one partition per run, and a GBIF download is ready only minutes or
hours after it is requested, so the command line plays the part of the sensor and the backfill:
request, wait for GBIF, run the unpartitioned upstream, one run per label, then the reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gbif_assets import steps
from gbif_assets.defs.definitions import build_definitions
from gbif_assets.defs.resources import ProgressSink, default_resources
from gbif_assets.recipe import Recipe
from gbif_assets.settings import Settings

if TYPE_CHECKING:
    from dagster_shared.error import SerializableErrorInfo

UPSTREAM = ("download_request", "occurrence_archive", "occurrences", "media_manifest")
DOWNSTREAM = (
    "image_metadata",
    "license_report",
    "attribution",
    "citation",
    "link_rot_report",
    "exports",
)


def _caused_by(error: SerializableErrorInfo | None, *names: str) -> bool:
    while error is not None:
        if error.cls_name in names:
            return True
        error = error.cause
    return False


def _cause(error: SerializableErrorInfo | None) -> str:
    """The innermost error's own words: Dagster wraps an asset's exception in "Error occurred
    while executing op", which says nothing about what went wrong."""
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()  # "module.Class: text"
    where, _, text = message.partition(": ")
    if not text or not where.endswith(error.cls_name or "?"):
        return message
    return text if where.startswith("gbif_assets.") else f"{error.cls_name}: {text}"  # our own errors say enough


@dataclass
class BuildOptions:
    """What `gbif-assets build` was asked to do."""

    select: str | None = None
    partitions: list[str] = field(default_factory=list)
    verbose: bool = False
    poll_seconds: float = 30.0
    wait_timeout_s: float = 6 * 3600


class BuildFailed(RuntimeError):
    """An asset or a blocking check failed; the message says which and why."""


def _instance(settings: Settings) -> dg.DagsterInstance:
    """The user's instance when DAGSTER_HOME is set, else a SQLite one beside the data."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    root = settings.home / ".dagster"
    root.mkdir(parents=True, exist_ok=True)
    # no compute-log capture: the command line shows progress itself, and the capture's watcher
    # processes would each print a traceback on Ctrl-C
    no_capture = {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
    return dg.DagsterInstance.local_temp(
        tempdir=str(root), overrides={"telemetry": {"enabled": False}, "compute_logs": no_capture}
    )


def _resolve_selection(select: str | None, defs: dg.Definitions, recipe: Recipe) -> set[dg.AssetKey]:
    graph = defs.resolve_asset_graph()
    everything = {k for k in graph.get_all_asset_keys() if k.path[0] == recipe.name}
    if not select:
        return everything
    names = ", ".join(sorted(k.to_user_string() for k in everything))
    text = select.strip()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        if any(token in text for token in (":", " ", "(")):
            keys = dg.AssetSelection.from_string(text).resolve(graph)
        else:
            unknown = [part for part in parts if dg.AssetKey.from_user_string(part) not in everything]
            if unknown or not parts:
                raise BuildFailed(f"--select {select!r}: no asset {', '.join(unknown) or select!r}; assets: {names}")
            keys = dg.AssetSelection.from_coercible(parts).resolve(graph)
    except BuildFailed:
        raise
    except Exception as exc:  # Dagster raises several types for a selection it cannot parse
        raise BuildFailed(f"--select {select!r}: {exc}; assets: {names}") from None
    keys &= everything
    if not keys:
        raise BuildFailed(f"--select {select!r} matches no asset of {recipe.name}; assets: {names}")
    return keys


def check_problems(evaluation: dg.AssetCheckEvaluation, shown: int = 3) -> str:
    """The first problems a failed check lists, and how many more it found (9 labels short of
    their quota must not read as 3)."""
    examples = evaluation.metadata.get("examples")
    listed = list(examples.value) if examples is not None and examples.value else []
    problems = evaluation.metadata.get("problems")
    total = int(problems.value) if problems is not None else len(listed)
    return "; ".join(map(str, listed[:shown])) + (f"; and {total - shown} more" if total > shown else "")


class _Runner:
    """Runs selected assets through Dagster and remembers every failure for the summary."""

    def __init__(self, recipe: Recipe, options: BuildOptions, console: Console) -> None:
        self.recipe = recipe
        self.options = options
        self.console = console
        self.settings = Settings.from_env()
        self.home = self.settings.dataset_home(recipe.name)
        self.instance = _instance(self.settings)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, int] = {}
        sink = ProgressSink(self._on_progress)
        self.defs = build_definitions([recipe], progress=sink)
        self.resources = default_resources(sink)
        self.assets = list(self.defs.assets or []) + list(self.defs.asset_checks or [])
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []  # what the assets said of their input (rows skipped, media source...)
        self.gbif_failed = False  # GBIF refused or could not be reached: exit 2, as for a bad recipe
        self.usage_error = False  # the command asked for something the dataset does not have: exit 2
        self.interrupted: Callable[[], None] = lambda: None  # raises KeyboardInterrupt after a Ctrl-C

    def _on_progress(self, stage: str, figures: dict) -> None:
        task = self._tasks.get(stage)
        if task is None:
            task = self.progress.add_task(f"images {stage}", total=figures.get("target") or None, info="")
            self._tasks[stage] = task
        info = f"{figures.get('rate', 0):.1f} img/s"
        failed = figures.get("failures") or {}
        if failed:
            info += "  failed " + ", ".join(f"{k}={v}" for k, v in sorted(failed.items()))
        self.progress.update(task, completed=figures.get("done", 0), total=figures.get("target") or None, info=info)

    def _run_config(self) -> dict:
        level = "INFO" if self.options.verbose else "CRITICAL"
        return {"loggers": {"console": {"config": {"log_level": level}}}}

    def materialize(self, keys: Iterable[dg.AssetKey], partition: str | None = None) -> bool:
        keys = list(keys)
        if not keys:
            return True
        what = ", ".join(k.path[-1] for k in keys) + (f" [{partition}]" if partition else "")
        self.console.print(f"[cyan]>[/cyan] {what}")
        result = dg.materialize(
            self.assets,
            selection=dg.AssetSelection.assets(*keys),
            instance=self.instance,
            resources=self.resources,
            partition_key=partition,
            raise_on_error=False,
            run_config=self._run_config(),
        )
        self.interrupted()  # a Ctrl-C that Dagster caught between its checkpoints, or that failed a query
        for event in result.get_asset_materialization_events():
            materialization = event.event_specific_data.materialization
            notes = materialization.metadata.get("notes")
            if isinstance(notes, dg.JsonMetadataValue) and isinstance(notes.data, list):
                self.notes += [f"{materialization.asset_key.path[-1]}: {note}" for note in notes.data]
        for event in result.get_step_failure_events():
            error = event.event_specific_data.error
            if _caused_by(error, "DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                raise KeyboardInterrupt  # Ctrl-C became a step failure: stop the build, not just this step
            self.gbif_failed = self.gbif_failed or _caused_by(error, "GbifError", "GbifAuthError", "DownloadGone")
            message = _cause(error)
            self.failures.append(f"{event.step_key}{f' [{partition}]' if partition else ''}: {message}")
            self.console.print(f"[red]FAILED[/red] {event.step_key}: {message}")
        for evaluation in result.get_asset_check_evaluations():
            if evaluation.passed:
                continue
            name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            why = check_problems(evaluation)
            if evaluation.severity == dg.AssetCheckSeverity.ERROR:
                self.failures.append(f"check {name} failed" + (f": {why}" if why else ""))
                self.console.print(f"[red]CHECK FAILED[/red] {name}")
            else:
                self.warnings.append(f"check {name} warns" + (f": {why}" if why else ""))
                self.console.print(f"[yellow]check warning[/yellow] {name}")
        return result.success and not any(f.startswith("check ") for f in self.failures)

    def wait_for_download(self) -> bool:
        """Poll GBIF like the sensor does, so a terminal build needs no daemon."""
        deadline = time.monotonic() + self.options.wait_timeout_s
        last = None
        while True:
            status = steps.pending_download_status(self.settings, self.home)
            if status is None:
                return True
            key, state = status
            if state != last:
                self.console.print(f"  GBIF download {key}: {state}")
                last = state
            if state == "SUCCEEDED":
                return True
            if state in ("FAILED", "KILLED", "CANCELLED", "FILE_ERASED"):
                hint = " (re-run to request a new download)" if state == "FILE_ERASED" else ""
                self.failures.append(f"GBIF download {key} ended {state}{hint}")
                self.gbif_failed = state != "FILE_ERASED"  # a GBIF error (exit 2); an erased file is asked for again
                return False
            if time.monotonic() > deadline:
                self.failures.append(f"GBIF download {key} still {state} after {self.options.wait_timeout_s:.0f} s")
                return False
            time.sleep(self.options.poll_seconds)
            self.interrupted()


def run_build(recipe: Recipe, options: BuildOptions) -> int:
    """Build what was selected; 0 when every asset and blocking check passed."""
    console = Console(stderr=False)
    errors = Console(stderr=True)
    if recipe.source.mode == "download" and not options.select:
        try:  # before anything is written: a missing account is a setup error, not a failed step
            steps.require_credentials(Settings.from_env(), "download mode")
        except steps.StepError as exc:
            errors.print(f"[red]error:[/red] {exc}")
            return 2
    try:
        runner = _Runner(recipe, options, console)
        runner.home.mkdir(parents=True, exist_ok=True)
        lock = (runner.home / ".build.lock").open("a")
    except OSError as exc:
        where = exc.filename or Settings.from_env().home
        errors.print(f"[red]error:[/red] GBIF_ASSETS_HOME (--home): cannot write {where}: {exc.strerror or exc}")
        return 2
    with lock:
        try:  # two builds of one dataset would fight over its warehouse and files
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            errors.print(f"[red]error:[/red] another build of {recipe.name} is running in {runner.home}; wait for it")
            return 2
        try:
            with _signals_seen() as runner.interrupted:
                return _build(runner, recipe, options, console)
        finally:  # closed here, not by the garbage collector at exit (which printed a traceback after Ctrl-C)
            runner.instance.dispose()


@contextlib.contextmanager
def _signals_seen() -> Iterator[Callable[[], None]]:
    """A check that raises KeyboardInterrupt once Ctrl-C (or SIGTERM) reached this process.

    Dagster catches SIGINT while it runs a step and acts on it only at its checkpoints; one that
    lands elsewhere (a step posting the GBIF request, writing events) is dropped when the run ends,
    and the build went on. Python writes every signal it handles to a wakeup file descriptor,
    whoever's handler runs, so the build reads that after each run and while it polls GBIF."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def interrupted() -> None:
        with contextlib.suppress(BlockingIOError):
            seen = os.read(read, 4096)
            if signal.SIGINT in seen or signal.SIGTERM in seen:
                raise KeyboardInterrupt

    try:
        yield interrupted
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def _build(runner: _Runner, recipe: Recipe, options: BuildOptions, console: Console) -> int:
    name = recipe.name
    key = lambda asset: dg.AssetKey([name, asset])  # noqa: E731
    try:
        selected = _resolve_selection(options.select, runner.defs, recipe)
        if options.partitions:
            _check_partitions(runner, key("images") in selected)
        if key("download_request") in selected and recipe.source.mode == "download":
            steps.require_credentials(runner.settings, "download mode")
    except (BuildFailed, steps.StepError) as exc:  # before anything runs: a usage or setup error
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        return 2
    upstream = [key(a) for a in UPSTREAM if key(a) in selected]
    ok = True
    if key("download_request") in upstream:
        ok = runner.materialize([key("download_request")])
        upstream.remove(key("download_request"))
    if ok and key("occurrence_archive") in upstream and recipe.source.mode == "download":
        ok = runner.wait_for_download()
    if ok:
        ok = runner.materialize(upstream)
    if ok and key("images") in selected:
        ok = _run_partitions(runner, key("images"))
    if ok:
        ok = runner.materialize([key(a) for a in DOWNSTREAM if key(a) in selected])
    nothing = ok and key("images") in selected and not options.partitions and not steps.image_counts(runner.home)
    if nothing and (reasons := steps.failure_counts(runner.home)):  # links were tried and none gave an image
        runner.failures.append(_why_no_images(reasons))
    summarize(console, recipe, runner.home, runner.failures, runner.warnings, runner.notes)
    if ok and not runner.failures:
        return 0
    return 2 if runner.gbif_failed or runner.usage_error else 1


def _labels(runner: _Runner) -> list[str]:
    """The labels Dagster knows for this dataset, registered from the manifest on disk if need be."""
    partitions_name = f"{runner.recipe.name}_labels"
    registered = runner.instance.get_dynamic_partitions(partitions_name)
    if not registered:  # a fresh instance: the manifest on disk knows the labels
        registered = steps.manifest_labels(runner.home)
        if registered:
            runner.instance.add_dynamic_partitions(partitions_name, registered)
    return list(registered)


def _unknown_labels(wanted: list[str], labels: list[str]) -> str | None:
    unknown = [p for p in wanted if p not in labels]
    if not unknown:
        return None
    return f"unknown label(s) {', '.join(unknown)}; labels: {', '.join(labels[:30]) or 'none'}"


def _check_partitions(runner: _Runner, images_selected: bool) -> None:
    """--partition before anything runs: it applies to `images` only, and to labels the manifest has
    (when there is none yet, the labels are checked once `media_manifest` has run)."""
    if not images_selected:
        raise BuildFailed("--partition picks labels of the images asset, which --select leaves out")
    labels = _labels(runner)
    if labels and (problem := _unknown_labels(runner.options.partitions, labels)):
        raise BuildFailed(problem)


def _run_partitions(runner: _Runner, images_key: dg.AssetKey) -> bool:
    registered = _labels(runner)
    wanted = runner.options.partitions or registered
    if problem := _unknown_labels(wanted, registered):
        runner.failures.append(problem)
        runner.usage_error = True
        runner.console.print(f"[red]error:[/red] {problem}")
        return False
    ok = True
    with runner.progress:
        for label in wanted:
            ok = runner.materialize([images_key], partition=label) and ok
    return ok


def _why_no_images(reasons: dict[str, int]) -> str:
    """The failure line of a build whose every fetch failed, with the likeliest cause. (A recipe
    whose filters select nothing is an empty dataset, said by a warning, not a failure.)"""
    top = max(reasons, key=reasons.__getitem__)
    hint = BLOCKED_HINT if top == "blocked" else "see reports/link_rot.md"
    return f"the dataset has no images: every fetch failed, most often {top} ({reasons[top]:,}); {hint}"


BLOCKED_HINT = (
    "`blocked` is this client's own refusal: the image URLs resolve to loopback, private or link-local "
    "addresses (set GBIF_ASSETS_ALLOW_PRIVATE_HOSTS=1 only for a local test server), or are not http(s)"
)


def dataset_paths(home: Path) -> dict[str, Path]:
    """Where the user finds the output (printed by the summary)."""
    return {
        "images": home / "images",
        "metadata": home / "metadata" / "images.parquet",
        "reports": home / "reports",
        "warehouse": home / "warehouse.duckdb",
    }


def summarize(
    console: Console, recipe: Recipe, home: Path, failures: list[str], warnings: list[str], notes: list[str]
) -> None:
    """Images per split and label, failures by reason, where the files are, and what the assets
    noted of their input (rows skipped and why, where the media came from)."""
    counts = steps.image_counts(home)
    if counts:
        splits = sorted({s for _, s in counts}, key=("train", "val", "test").index)
        table = Table(title=f"{recipe.name}: images per label and split")
        table.add_column("label")
        for split in splits:
            table.add_column(split, justify="right")
        table.add_column("total", justify="right")
        for label in sorted({lbl for lbl, _ in counts}):
            row = [counts.get((label, s), 0) for s in splits]
            table.add_row(label, *map(str, row), str(sum(row)))
        console.print(table)
    reasons = steps.failure_counts(home)
    if reasons:
        console.print("failed fetch attempts by reason: " + ", ".join(f"{k}={v}" for k, v in reasons.items()))
        if reasons.get("blocked", 0) * 2 > sum(reasons.values()):
            console.print(f"  {BLOCKED_HINT}")
    for what, path in dataset_paths(home).items():
        if path.exists():
            console.print(f"  {what:<10} {path}")
    for note in notes:
        console.print(f"note: {note}")
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if failures:
        console.print(f"[red]{len(failures)} failure(s):[/red]")
        for failure in failures:
            console.print(f"  - {failure}")
    else:
        console.print("[green]build succeeded[/green]")
