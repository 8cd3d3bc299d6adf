"""Shared fixtures: a live GBIF emulator on loopback and an isolated environment per test."""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "datasets"

GBIF_TEST_USER = "gbif_assets_test"
GBIF_TEST_PASSWORD = "emulator-only-password"


@pytest.fixture(scope="session")
def emulator() -> Iterator[object]:
    """One emulator for the session: GBIF API, archives and publisher image hosts on 127.0.0.x."""
    from gbif_assets.emulator import Emulator

    with Emulator(users={GBIF_TEST_USER: GBIF_TEST_PASSWORD}) as emu:
        yield emu


@pytest.fixture
def gbif_env(emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment of a user pointed at the emulator, with a fresh dataset home and recipes dir."""
    home = tmp_path / "data"
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    monkeypatch.setenv("GBIF_API_URL", emulator.api_url)
    monkeypatch.setenv("GBIF_ASSETS_HOME", str(home))
    monkeypatch.setenv("GBIF_ASSETS_DATASETS", str(datasets))
    monkeypatch.setenv("GBIF_ASSETS_ALLOW_PRIVATE_HOSTS", "1")
    monkeypatch.setenv("GBIF_USERNAME", GBIF_TEST_USER)
    monkeypatch.setenv("GBIF_PASSWORD", GBIF_TEST_PASSWORD)
    monkeypatch.setenv("GBIF_EMAIL", "test@example.org")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return tmp_path


def copy_recipe(source: str, dest_dir: Path, name: str | None = None) -> Path:
    """Copy a shipped recipe into a test's datasets dir, optionally renaming it."""
    src = DATASETS / f"{source}.yaml"
    new_name = name or source
    text = src.read_text(encoding="utf-8").replace(f"name: {source}\n", f"name: {new_name}\n")
    # the emulator's hostile hosts make a few requests wait for the timeout: keep tests quick
    if "timeout_s:" in text:
        text = re.sub(r"timeout_s: [0-9.]+", "timeout_s: 3", text)
    else:
        text = text.replace("download:\n", "download:\n  timeout_s: 3\n", 1)
    dest = dest_dir / f"{new_name}.yaml"
    dest.write_text(text, encoding="utf-8")
    return dest


@pytest.fixture
def clean_copy(tmp_path: Path) -> Path:
    """A copy of the shipped recipes folder (tests must not edit the real one)."""
    dest = tmp_path / "datasets_copy"
    shutil.copytree(DATASETS, dest)
    return dest


def corrupt_member(src: Path, dest: Path, member: str) -> Path:
    """`src` with bytes flipped in the middle of `member`'s compressed data (a bit rot, a bad disk)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = archive.getinfo(member)
    name_and_extra = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little") + int.from_bytes(
        data[info.header_offset + 28 : info.header_offset + 30], "little"
    )
    middle = info.header_offset + 30 + name_and_extra + info.compress_size // 2
    data[middle : middle + 8] = b"\xff" * 8  # a deflate stream zlib itself refuses, not only a CRC mismatch
    dest.write_bytes(bytes(data))
    return dest
