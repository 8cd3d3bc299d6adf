"""End to end: recipes built through the Dagster definitions against the live emulator."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gbif_assets.build import BuildOptions, check_problems, run_build
from gbif_assets.recipe import load_recipe
from gbif_assets_tests.conftest import ROOT, copy_recipe

CONTRACT_COLUMNS = {
    "path", "split", "label", "gbifID", "datasetKey", "publishingOrgKey", "url", "references",
    "license", "license_raw", "rightsHolder", "creator", "sha256", "width", "height", "bytes",
    "fetched_at",
}  # fmt: skip


def _assert_dataset(home: Path, recipe_labels: set[str] | None = None) -> set[str]:
    """The contract's layout: ImageFolder tree, metadata with its columns, logs and reports."""
    table = pq.read_table(home / "metadata" / "images.parquet")
    assert table.num_rows > 0
    assert set(table.column_names) >= CONTRACT_COLUMNS
    rows = table.to_pylist()
    labels = {r["label"] for r in rows}
    if recipe_labels is not None:
        assert labels == recipe_labels
    for row in rows:
        path = home / row["path"]
        assert path.is_file(), path
        parts = Path(row["path"]).parts
        assert parts[0] == "images" and parts[1] == row["split"] and parts[2] == row["label"]
        with Image.open(path) as img:
            assert img.size == (row["width"], row["height"])
    for label in labels:
        log = pq.read_table(home / "metadata" / "downloads" / f"{label}.parquet")
        assert log.num_rows >= sum(1 for r in rows if r["label"] == label)
    reports = home / "reports"
    for name in ("attribution.csv", "CITATION.cff", "citation.bib"):
        assert (reports / name).is_file(), name
    assert list(reports.glob("*link_rot*")), "link-rot report missing"
    assert list(reports.glob("*licen*")), "licence report missing"
    return labels


def test_build_search_mode(gbif_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy_recipe("invasive_plants", gbif_env / "datasets")
    recipe = load_recipe(path)
    assert run_build(recipe, BuildOptions()) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "note: image_metadata: " in out and "near-duplicate image(s) flagged" in out  # the assets' notes
    home = gbif_env / "data" / recipe.name
    labels = _assert_dataset(home, {"5352251", "3190653", "3189866"})
    for label in labels:  # every label is in train
        assert any((home / "images" / "train" / label).iterdir())
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    assert con.execute("select count(*) from occurrences").fetchone()[0] > 0
    assert con.execute("select count(*) from media_manifest where selected").fetchone()[0] > 0
    con.close()


def test_build_download_mode_and_rebuild_is_idempotent(gbif_env: Path) -> None:
    path = copy_recipe("invasive_plants_download", gbif_env / "datasets")
    recipe = load_recipe(path)
    options = BuildOptions(poll_seconds=0.2, wait_timeout_s=120)
    assert run_build(recipe, options) == 0
    home = gbif_env / "data" / recipe.name
    archives = list((home / "archive").glob("*.zip"))
    assert len(archives) == 1
    _assert_dataset(home, {"5352251", "3190653", "3189866"})
    files_before = {p: p.stat().st_mtime_ns for p in (home / "images").rglob("*.jp*g")}
    archive_mtime = archives[0].stat().st_mtime_ns
    assert run_build(recipe, options) == 0
    assert archives[0].stat().st_mtime_ns == archive_mtime  # not fetched again
    for path_, mtime in files_before.items():  # verified images are not fetched again
        assert path_.stat().st_mtime_ns == mtime


def test_select_one_asset_reuses_upstream(gbif_env: Path) -> None:
    recipe = load_recipe(copy_recipe("invasive_plants", gbif_env / "datasets"))
    assert (
        run_build(
            recipe,
            BuildOptions(select="invasive_plants/occurrences,invasive_plants/media_manifest"),
        )
        == 0
    )
    manifest = gbif_env / "data" / "invasive_plants" / "metadata" / "manifest.parquet"
    assert manifest.is_file()
    assert not (gbif_env / "data" / "invasive_plants" / "images").exists()
    # one partition only, in a fresh Dagster instance: labels come from the manifest on disk
    assert run_build(recipe, BuildOptions(select="invasive_plants/images", partitions=["5352251"])) == 0
    assert (gbif_env / "data" / "invasive_plants" / "metadata" / "downloads" / "5352251.parquet").is_file()
    assert not (gbif_env / "data" / "invasive_plants" / "metadata" / "downloads" / "3190653.parquet").exists()


def test_select_errors_name_the_problem(gbif_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe(copy_recipe("invasive_plants", gbif_env / "datasets"))
    for select in ("invasive_plants/nonexistent", ","):
        assert run_build(recipe, BuildOptions(select=select)) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--select {select!r}" in err and "assets: invasive_plants/attribution" in err, err
    assert run_build(recipe, BuildOptions(select="invasive_plants/occurrences", partitions=["5352251"])) == 2
    assert "--partition picks labels of the images asset" in " ".join(capsys.readouterr().err.split())
    assert (
        run_build(
            recipe,
            BuildOptions(select="invasive_plants/occurrences,invasive_plants/media_manifest"),
        )
        == 0
    )
    manifest = gbif_env / "data" / "invasive_plants" / "metadata" / "manifest.parquet"
    built = manifest.stat().st_mtime_ns
    assert run_build(recipe, BuildOptions(partitions=["999"])) == 2  # checked before the upstream runs again
    assert "unknown label(s) 999" in capsys.readouterr().err
    assert manifest.stat().st_mtime_ns == built


def test_cli_validate_prints_predicate() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gbif_assets.cli", "validate", str(ROOT / "datasets" / "invasive_plants_download.yaml")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    predicate = json.loads(out.stdout.split("GBIF download predicate:\n", 1)[1])
    assert predicate["type"] == "and"
    text = json.dumps(predicate)
    assert "SPECIES_KEY" in text and "DATASET_KEY" in text and "MEDIA_TYPE" in text


def test_cli_bad_recipe_exits_2_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsource: {mode: search}\n")
    out = subprocess.run([sys.executable, "-m", "gbif_assets.cli", "build", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert str(bad) in out.stderr and "source" in out.stderr and "needs source.query" in out.stderr


@pytest.mark.slow
def test_demo_command_offline(tmp_path: Path) -> None:
    """The README's main command, as a user runs it: a subprocess from the project folder."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("GBIF_", "DAGSTER_HOME"))}
    out = subprocess.run(
        [sys.executable, "-m", "gbif_assets.cli", "demo", "--home", str(tmp_path / "data")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "build succeeded" in out.stdout
    _assert_dataset(tmp_path / "data" / "invasive_plants", {"5352251", "3190653", "3189866"})


@pytest.mark.parametrize(
    ("setting", "value", "said"),
    [
        ("GBIF_ASSETS_FETCH_PROCESSES", "many", "GBIF_ASSETS_FETCH_PROCESSES must be a whole number"),
        ("GBIF_API_URL", "not a url", "GBIF_API_URL 'not a url' must be an http(s) URL with a host"),
        ("GBIF_API_URL", "ftp://127.0.0.1/v1", "GBIF_API_URL 'ftp://127.0.0.1/v1' must be an http(s) URL"),
        ("GBIF_API_URL", "http://127.0.0.1:99999/v1", "GBIF_API_URL 'http://127.0.0.1:99999/v1' is not a usable URL"),
        ("GBIF_ASSETS_DUCKDB_MEMORY", "lots", "GBIF_ASSETS_DUCKDB_MEMORY must be a size such as 1500MB"),
        ("--poll-seconds", "-5", "argument --poll-seconds: '-5': give a number of seconds above 0"),
        ("--poll-seconds", "0", "argument --poll-seconds: '0': give a number of seconds above 0"),
    ],
)
def test_a_bad_setting_is_one_clear_line_and_nothing_is_written(
    tmp_path: Path, setting: str, value: str, said: str
) -> None:
    env = {**os.environ, "GBIF_API_URL": "http://127.0.0.1:9/v1", "GBIF_ASSETS_HOME": str(tmp_path / "data")}
    args = [setting, value] if setting.startswith("--") else []
    if not args:
        env[setting] = value
    recipe = ROOT / "datasets" / "invasive_plants.yaml"
    done = subprocess.run([sys.executable, "-m", "gbif_assets.cli", "build", str(recipe), *args], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert said in " ".join(done.stderr.split()) and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()


def test_a_home_that_cannot_be_written_is_a_setup_error(tmp_path: Path) -> None:
    env = {**os.environ, "GBIF_API_URL": "http://127.0.0.1:9/v1", "GBIF_ASSETS_HOME": "/proc/gbif-assets-home"}
    recipe = ROOT / "datasets" / "invasive_plants.yaml"
    done = subprocess.run([sys.executable, "-m", "gbif_assets.cli", "build", str(recipe)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "GBIF_ASSETS_HOME (--home): cannot write /proc/gbif-assets-home" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_a_build_whose_every_fetch_failed_fails_and_says_why(
    gbif_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The emulator's image hosts are on loopback: without GBIF_ASSETS_ALLOW_PRIVATE_HOSTS every
    link is refused by this client. That is no successful build, and `blocked` is explained."""
    monkeypatch.delenv("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS")
    path = copy_recipe("invasive_plants", gbif_env / "datasets", name="all_blocked")
    assert run_build(load_recipe(path), BuildOptions()) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "the dataset has no images: every fetch failed, most often blocked" in out
    assert "set GBIF_ASSETS_ALLOW_PRIVATE_HOSTS=1 only for a local test server" in out
    assert "build succeeded" not in out
    report = (gbif_env / "data" / "all_blocked" / "reports" / "link_rot.md").read_text()
    assert "0 links tried" in report and "refused by this client, not judged" in report
    monkeypatch.setenv("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS", "1")  # as the hint says, for this local test server
    assert run_build(load_recipe(path), BuildOptions()) == 0  # blocked links are asked again, not written off
    assert pq.read_table(gbif_env / "data" / "all_blocked" / "metadata" / "images.parquet").num_rows > 0


def test_setup_and_gbif_errors_say_why_and_exit_2(
    gbif_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing account is found before anything runs; a GBIF error inside a step shows GBIF's
    words, not Dagster's "Error occurred while executing op" wrapper. Both exit 2 (README)."""
    monkeypatch.delenv("GBIF_USERNAME")
    recipe = load_recipe(copy_recipe("invasive_plants_download", gbif_env / "datasets"))
    assert run_build(recipe, BuildOptions(poll_seconds=0.2)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "download mode needs a GBIF account: set GBIF_USERNAME" in err
    assert not (gbif_env / "data").exists()  # nothing written, not even Dagster's storage
    path = gbif_env / "datasets" / "gone.yaml"
    path.write_text("name: gone\nsource: {mode: existing, key: 9999999-999999999999999}\n")
    assert run_build(load_recipe(path), BuildOptions()) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "9999999-999999999999999" in out and "Error occurred while executing" not in out


@pytest.mark.parametrize(
    ("state", "code", "said"),
    [
        ("RUNNING", 1, "is RUNNING at GBIF, not SUCCEEDED yet: run again once it is"),
        ("KILLED", 2, "ended KILLED at GBIF and has no file: give another key, or use download mode"),
    ],
)
def test_an_existing_download_that_is_not_ready_says_what_to_do(
    gbif_env: Path, emulator, capsys: pytest.CaptureFixture[str], state: str, code: int, said: str
) -> None:
    """Existing mode has no sensor to wait for GBIF: a download still running says to run again,
    one that ended without a file is a GBIF error (exit 2) that says what to do instead."""
    import asyncio

    from gbif_assets.gbif import GbifClient
    from gbif_assets_tests.conftest import GBIF_TEST_PASSWORD, GBIF_TEST_USER

    async def request() -> str:
        async with GbifClient(emulator.api_url, GBIF_TEST_USER, GBIF_TEST_PASSWORD, "t@example.org") as client:
            return await client.request_download({"type": "equals", "key": "YEAR", "value": "1888"})

    key = asyncio.run(request())
    emulator.set_status(key, state)
    path = gbif_env / "datasets" / "waiting.yaml"
    path.write_text(f"name: waiting\nsource: {{mode: existing, key: {key}}}\n")
    assert run_build(load_recipe(path), BuildOptions()) == code
    out = " ".join(capsys.readouterr().out.split())
    assert said in out and "sensor" not in out, out[-2000:]


@pytest.mark.parametrize(("state", "code"), [("KILLED", 2), ("FAILED", 2), ("FILE_ERASED", 1)])
def test_a_download_that_ends_without_a_file_is_a_gbif_error(
    gbif_env: Path, emulator, capsys: pytest.CaptureFixture[str], state: str, code: int
) -> None:
    """Download mode: GBIF ends the request KILLED or FAILED: a GBIF error, exit 2 as in existing
    mode; an erased file is asked for again by the next run (exit 1)."""
    path = copy_recipe("invasive_plants_download", gbif_env / "datasets", name=f"ended_{state.lower()}")
    # a predicate of its own: GBIF (and the emulator) give back an earlier download of the same one
    text = path.read_text()
    path.write_text(text.replace("    speciesKey: [", f"    recordNumber: [ended-{state}]\n    speciesKey: [", 1))
    recipe = load_recipe(path)
    emulator.config.next_download_status = state
    try:
        assert run_build(recipe, BuildOptions(poll_seconds=0.2, wait_timeout_s=60)) == code
    finally:
        emulator.config.next_download_status = None
    out = " ".join(capsys.readouterr().out.split())
    assert f"ended {state}" in out


def test_filters_that_remove_everything_end_clearly(gbif_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing selected is an empty dataset with its reports, and the build says why."""
    path = copy_recipe("invasive_plants", gbif_env / "datasets", name="nothing_left")
    path.write_text(path.read_text().replace("hosts: {allow: []", "hosts: {allow: [nowhere.invalid]"))
    assert run_build(load_recipe(path), BuildOptions()) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "candidates_selected" in out and "the recipe's filters (licences, publishers, hosts, formats) removed" in out
    home = gbif_env / "data" / "nothing_left"
    assert pq.read_table(home / "metadata" / "images.parquet").num_rows == 0
    assert set(pq.read_schema(home / "metadata" / "images.parquet").names) >= CONTRACT_COLUMNS
    for name in ("attribution.csv", "CITATION.cff", "link_rot.md", "licenses.md"):
        assert (home / "reports" / name).is_file(), name


def _build_then_sigint(path: Path, log: Path, ready: Callable[[str], bool], *args: str,
                       ignore_sigint: bool = False) -> tuple[subprocess.Popen, int, float]:  # fmt: skip
    """Run `gbif-assets build` in its own process group, send it SIGINT once `ready(output)`;
    the process, its exit code, and how long it took to exit."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gbif_assets.cli", "build", str(path), *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not ready(log.read_text()):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        code = proc.wait(timeout=60)
    return proc, code, time.monotonic() - sent


def test_ctrl_c_stops_the_build_not_just_one_label(gbif_env: Path) -> None:
    """Ctrl-C (SIGINT to the process group) ends the whole build within seconds, exit 130, with
    no fetch process left and no traceback; the next label does not start."""
    path = copy_recipe("invasive_plants", gbif_env / "datasets")
    log = gbif_env / "build.log"
    proc, code, seconds = _build_then_sigint(path, log, lambda text: "> images [" in text)
    assert code == 130 and seconds < 10
    text = log.read_text()
    assert text.count("> images [") == 1 and "interrupted; re-run the same command to resume" in text
    assert "Traceback" not in text
    leftover = [p for p in Path("/proc").glob("[0-9]*") if f"--parent {proc.pid}" in _cmdline(p)]
    assert leftover == []


@pytest.mark.parametrize("step", ["occurrences", "media_manifest", "image_metadata"])
def test_ctrl_c_at_any_step_exits_130(gbif_env: Path, step: str) -> None:
    """Ctrl-C as each step starts ends the build with 130 and no traceback (after each Dagster
    run the build also reads every SIGINT that reached it: one Dagster caught between its
    checkpoints, or one that failed a DuckDB query as 'Query interrupted')."""
    path = copy_recipe("invasive_plants", gbif_env / "datasets", name=f"stop_{step}")
    log = gbif_env / f"build_{step}.log"
    _, code, _ = _build_then_sigint(
        path, log, lambda text: any(line.startswith(">") and step in line for line in text.splitlines())
    )
    assert code == 130, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


def test_sigint_ends_a_build_started_with_sigint_ignored(gbif_env: Path, emulator) -> None:
    """A script that starts the build in the background (`gbif-assets build ... &`) hands it
    SIGINT ignored. Dagster takes SIGINT over only while a step runs, so `kill -INT` stopped a
    step but not the wait for GBIF's download, and the build went on (exit 0)."""
    path = copy_recipe("invasive_plants_download", gbif_env / "datasets", name="backgrounded")
    path.write_text(path.read_text().replace("speciesKey: [5352251, 3190653, 3189866]", "speciesKey: [5352251]"))
    log = gbif_env / "backgrounded.log"
    emulator.config.preparing_s = 120
    seen: dict[str, float] = {}

    def polling(text: str) -> bool:  # half a second after PREPARING shows: outside any Dagster step
        return "PREPARING" in text and time.monotonic() > seen.setdefault("at", time.monotonic()) + 0.5

    try:
        _, code, _ = _build_then_sigint(path, log, polling, "--poll-seconds", "0.2", ignore_sigint=True)
        assert code == 130, log.read_text()[-2000:]
    finally:
        emulator.config.preparing_s = 0.2


def test_a_second_build_of_the_same_dataset_is_refused(gbif_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe(copy_recipe("invasive_plants", gbif_env / "datasets"))
    home = gbif_env / "data" / recipe.name
    home.mkdir(parents=True)
    with (home / ".build.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_build(recipe, BuildOptions()) == 2
    assert "another build of invasive_plants is running" in " ".join(capsys.readouterr().err.split())
    assert not (home / "warehouse.duckdb").exists()


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_rebuilt_citation_keeps_its_derived_dataset_doi(gbif_env: Path, emulator) -> None:
    """GBIF mints a new DOI for every derived-dataset registration: building `citation` again with
    the same images must not register (and cite) a second one."""
    recipe = load_recipe(copy_recipe("invasive_plants", gbif_env / "datasets", name="cited"))
    assert run_build(recipe, BuildOptions()) == 0
    posts = len(emulator.state.derived)
    doi = json.loads((gbif_env / "data" / "cited" / "reports" / "derived_dataset.json").read_text())["doi"]
    assert run_build(recipe, BuildOptions(select="cited/citation")) == 0
    assert len(emulator.state.derived) == posts
    assert doi in (gbif_env / "data" / "cited" / "reports" / "CITATION.cff").read_text()
    related = emulator.state.derived[-1]["request"]["relatedDatasets"]
    rows = pq.read_table(gbif_env / "data" / "cited" / "metadata" / "images.parquet").to_pylist()
    assert sum(related.values()) == len({r["gbifID"] for r in rows})  # records, not images


def test_a_check_summary_says_how_many_problems_it_leaves_out() -> None:
    short = [f"label {n}: 6 images < 7" for n in range(9)]

    def failed(problems: list[str]) -> dg.AssetCheckEvaluation:
        return dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(["d", "image_metadata"]),
            check_name="quota_met_per_label",
            passed=False,
            metadata={"problems": len(problems), "examples": dg.MetadataValue.json(problems)},
        )

    assert check_problems(failed(short)) == (
        "label 0: 6 images < 7; label 1: 6 images < 7; label 2: 6 images < 7; and 6 more"
    )
    assert check_problems(failed(short[:2])) == "label 0: 6 images < 7; label 1: 6 images < 7"
