"""A private PostgreSQL server for tests: initdb into a temp dir, pg_ctl on a free loopback port.

PostgreSQL refuses to run as root; then it runs as the ``postgres`` system user (via ``runuser``)
in a temp dir that user owns. Binaries are found under /usr/lib/postgresql/*/bin.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from cluster import free_port


def pg_bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        raise AssertionError("PostgreSQL is not installed; run `make test-deps`")
    return Path(found[-1]).parent


class PrivatePostgres:
    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="llmtree-pg-"))
        self.data = self.base / "data"
        self.user = "llmtree"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.base
        )
        if result.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {result.stdout}\n{result.stderr}")
        return result

    def start(self) -> str:
        """Start the server; returns the asyncpg URL of a fresh database."""
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
            "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        return self.create_database("llmtree")

    def create_database(self, name: str) -> str:
        self._run(
            str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", self.user, name,
        )  # fmt: skip
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
