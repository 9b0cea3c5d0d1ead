"""A full or read-only data dir, on a real small file system: a 1 MiB tmpfs mounted
for the test (root only; skipped elsewhere) and always unmounted after it.

- the data dir is 0700 and broker.db, secrets.db and status.db are 0600;
- ``serve`` refuses to start on a read-only data dir, naming it;
- with the disk full, storing a connection or issuing a key answers 503 with Retry-After and stores
  nothing, and ``/api/health`` answers 503 naming the data dir; once there is room, both work again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.datadir import WritableProbe, prepare, storage_problem
from shared.errors import ConfigurationError
from shared.runtime.embedded import wait_until
from shared.services import Services
from tests.fixtures.api import api_stack, make_settings

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the duration; skips the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        # Lazy: a handle a failed test left open must not leave the mount behind.
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def fill(where: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to make room again)."""
    filler = where / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012 - written until full
            while True:
                os.write(fd, b"\0" * 65536)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_dir_is_private_and_its_files_are_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    services = Services.from_settings(make_settings(data))
    try:
        services.transport.stats("leads-incoming")
    finally:
        services.close()
    assert mode(data) == 0o700
    for name in ("broker.db", "secrets.db", "state.db", "secret.key"):
        assert mode(data / name) == 0o600, name
    for companion in data.glob("*.db-*"):
        assert mode(companion) & 0o077 == 0, companion.name


def test_prepare_refuses_a_read_only_data_dir_naming_it(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "ro") as where:
        remount_read_only(where)
        with pytest.raises(ConfigurationError, match=f"{where}.*read-only"):
            prepare(where)


def test_serve_refuses_to_start_on_a_read_only_data_dir_naming_it(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "ro") as where:
        remount_read_only(where)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_"))}
        env.update(LEADWRITER_DATA_DIR=str(where), LEADWRITER_HTTP_PORT="1", COLUMNS="200")
        done = subprocess.run(
            [sys.executable, "-m", "shared.tools.cli", "serve"],
            cwd=REPO,
            env=env,
            capture_output=True,
            encoding="utf-8",
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert str(where) in done.stderr
    assert "read-only" in done.stderr
    assert "Traceback" not in done.stderr


def test_with_the_disk_full_keys_and_connections_answer_503_store_nothing_and_health_names_it(
    tmp_path: Path,
) -> None:
    with small_filesystem(tmp_path / "small") as where:
        data = where / "data"
        with api_stack(data) as stack:
            key = stack.key_for("contoso")  # works while there is room
            assert stack.client.get("/api/health").status_code == 200
            filler = fill(where)
            try:
                body = {
                    "url": "https://contoso.crm4.dynamics.com",
                    "auth": {"kind": "password", "username": "svc@contoso.example", "password": "p" * 40},
                }
                stored = stack.client.put(
                    "/api/publishers/contoso/connection", params={"verify": "false"}, json=body, headers=stack.admin()
                )
                assert stored.status_code == 503, stored.text
                assert int(stored.headers["Retry-After"]) >= 1
                assert "full" in stored.json()["error"]
                issued = stack.client.post("/api/admin/publishers/fabrikam/keys", headers=stack.admin())
                assert issued.status_code == 503, issued.text
                assert int(issued.headers["Retry-After"]) >= 1

                # Nothing half-written: no connection, no new key; the old key still works.
                assert stack.client.get("/api/publishers/contoso/connection", headers=stack.admin()).status_code == 404
                assert stack.services.secrets.list_names("key-fabrikam") == []
                assert stack.client.get("/api/publishers/contoso/status", headers=stack.bearer(key)).status_code == 200

                def health_says_full() -> bool:
                    answer = stack.client.get("/api/health")
                    return answer.status_code == 503 and answer.json()["checks"].get("dataDir") == "full"

                assert wait_until(health_says_full, timeout=30)
            finally:
                filler.unlink()

            def healthy() -> bool:
                return stack.client.get("/api/health").status_code == 200

            assert wait_until(healthy, timeout=30)
            stored = stack.client.put(
                "/api/publishers/contoso/connection", params={"verify": "false"}, json=body, headers=stack.admin()
            )
            assert stored.status_code == 200, stored.text


def test_the_writable_probe_is_cached_so_health_stays_cheap(tmp_path: Path) -> None:
    now = [0.0]
    probe = WritableProbe(tmp_path, clock=lambda: now[0])
    assert probe.problem() is None
    tmp_path.chmod(0o500)
    try:
        assert probe.problem() is None  # cached: not probed again within the window
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize(
    ("exc", "problem"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "full"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only"),
        (OSError(errno.ECONNRESET, "reset"), None),
    ],
)
def test_storage_problems_are_recognised_from_the_error(exc: BaseException, problem: str | None) -> None:
    assert storage_problem(exc) == problem
