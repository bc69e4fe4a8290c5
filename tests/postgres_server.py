"""A throwaway PostgreSQL server on a loopback port, for tests of the usage ledger.

`initdb` into a temporary directory, `pg_ctl start` on a free port with its
unix socket in the same directory, stopped by `pg_ctl stop` (fast) and
removed. initdb refuses to run as root, so as root the server runs as the
`postgres` system user (Debian's package creates it) through `runuser`, and
the directory is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _run_as() -> str | None:
    """The user to run the server as: None for the current one, unless that is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


def postgres_available() -> bool:
    return postgres_bin() is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed")
        self.port = free_port()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="klein-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self._started = False

    @property
    def role(self) -> str:
        return self.user or pwd.getpwuid(os.geteuid()).pw_name

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def _chown(self) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.data, self.sockets):
                if path.exists():
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            self.root.chmod(0o700)

    def start(self, timeout: float = 30.0) -> PostgresServer:
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._chown()
        initdb = self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.role, "--no-sync", "-E", "UTF8", "--locale", "C")
        subprocess.run(initdb, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        start = self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", str(int(timeout)), "start")
        subprocess.run(start, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout + 10)
        self._started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("PostgreSQL did not accept connections in time")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # a test's own name
        return self.url(name)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
