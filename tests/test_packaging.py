"""The installed product works away from the checkout: the wheel carries the migrations and the sample.

An ops laptop or a site worker gets the wheel (from the offline wheelhouse), not the source tree; the
ledger's migrations and the sample estate must come with it. The wheel is built in-process with the
build backend (no package index), unpacked into a temporary directory and put first on the path, and the
commands run from a directory that has nothing of the checkout in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The PEP 517 hook runs in a child, in the project's directory, as a build frontend would.
    build = subprocess.run(
        [sys.executable, "-c", f"import hatchling.build as b; print(b.build_wheel({str(out)!r}))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    wheel = out / build.stdout.strip().splitlines()[-1]
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _restore(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "RESTORE_DATA_DIR": str(cwd / "data"),
        "RESTORE_DATABASE_URL": f"sqlite:///{cwd / 'data' / 'ledger.sqlite3'}",
    }
    return subprocess.run(
        [sys.executable, "-m", "restore_flows", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_wheel_carries_migrations_and_sample(installed: Path) -> None:
    package = installed / "restore_flows"
    assert (package / "alembic" / "env.py").is_file()
    assert sorted(p.name for p in (package / "alembic" / "versions").glob("2*.py")) == sorted(
        p.name for p in (ROOT / "alembic" / "versions").glob("2*.py")
    )
    assert (package / "sample" / "inventory" / "sites.yaml").is_file()
    assert (package / "sample" / "schema" / "inventory.schema.json").is_file()


def test_an_installed_restore_starts_an_estate_and_a_ledger_outside_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import restore_flows; print(restore_flows.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().startswith(str(installed)), probe.stdout

    init = _restore(installed, tmp_path, "init")
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "inventory" / "sites.yaml").is_file()
    assert (tmp_path / "schema" / "inventory.schema.json").is_file()

    validate = _restore(installed, tmp_path, "validate")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "inventory OK" in validate.stdout

    upgrade = _restore(installed, tmp_path, "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "(empty) ->" in upgrade.stdout
    current = _restore(installed, tmp_path, "db", "current")
    assert current.returncode == 0, current.stderr
    head = sorted((ROOT / "alembic" / "versions").glob("2*.py"))[-1].name.split("_")[1]
    assert head in current.stdout


def test_init_never_overwrites_an_inventory(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "inventory").mkdir()
    mine = tmp_path / "inventory" / "sites.yaml"
    mine.write_text("sites: {}\n")
    refused = _restore(installed, tmp_path, "init")
    assert refused.returncode == 2
    assert "never overwrites" in refused.stderr
    assert mine.read_text() == "sites: {}\n"
    assert not (tmp_path / "schema").exists()
