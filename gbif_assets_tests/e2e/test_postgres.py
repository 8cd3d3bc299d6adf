"""The scale-out profile: PostgreSQL instance storage from deploy/postgres/dagster.yaml, for real."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from gbif_assets.defs.definitions import build_definitions
from gbif_assets.defs.resources import default_resources
from gbif_assets.recipe import load_recipe
from gbif_assets_tests.conftest import ROOT, copy_recipe

pytestmark = pytest.mark.slow
BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres_user() -> list[str]:
    """initdb refuses to run as root; run the server as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed")
    if not BIN or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("no PostgreSQL server binaries on this machine")
    # pytest's tmp dirs are private to root; the server runs as `postgres`, so it gets its own
    tmp_path = Path(tempfile.mkdtemp(prefix="gbif-assets-pg-"))
    data = tmp_path / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp_path, "postgres")
        shutil.chown(data, "postgres")
    prefix = _as_postgres_user()
    subprocess.run(
        [*prefix, str(BIN[-1] / "initdb"), "-D", str(data), "-U", "dagster", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    port = str(_free_port())
    options = f"-k {tmp_path} -h 127.0.0.1 -p {port}"
    subprocess.run(
        [
            *prefix,
            str(BIN[-1] / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "start",
            "-l",
            str(tmp_path / "pg.log"),
        ],
        check=True,
        capture_output=True,
    )
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(
            [str(BIN[-1] / "pg_isready"), "-h", "127.0.0.1", "-p", port], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.5)
        subprocess.run(
            [str(BIN[-1] / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "dagster", "dagster"], check=True
        )
        yield {"DAGSTER_PG_URL": f"postgresql+psycopg2://dagster@127.0.0.1:{port}/dagster"}
    finally:
        subprocess.run([*prefix, str(BIN[-1] / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_materialize_with_postgres_instance(
    gbif_env: Path, postgres: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in postgres.items():
        monkeypatch.setenv(key, value)
    home = gbif_env / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    recipe = load_recipe(copy_recipe("invasive_plants", gbif_env / "datasets"))
    defs = build_definitions([recipe])
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = dg.materialize(
            list(defs.assets) + list(defs.asset_checks),
            selection=dg.AssetSelection.assets(
                dg.AssetKey(["invasive_plants", "occurrences"]), dg.AssetKey(["invasive_plants", "media_manifest"])
            ),
            instance=instance,
            resources=default_resources(),
        )
        assert result.success
        assert set(instance.get_dynamic_partitions("invasive_plants_labels")) == {"5352251", "3190653", "3189866"}
        event = instance.get_latest_materialization_event(dg.AssetKey(["invasive_plants", "media_manifest"]))
        assert event is not None and event.run_id == result.run_id
