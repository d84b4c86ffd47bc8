"""A private PostgreSQL for the tests (Debian package `postgresql`), never the system's own.

Each server has its own data directory (on tmpfs where there is room), port and password, listens
on 127.0.0.1 only, and runs with settings that trade durability against an operating-system crash
for speed. A `TcpProxy` in front of it lets a test cut the database off for the clients that
connect through the proxy only.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.abc import Query

from gpufleet.ports import free_port

HOST = "127.0.0.1"
# PostgreSQL refuses to run as root: as root, the server runs as the user the Debian package creates.
SERVER_USER = "postgres"
SUPERUSER = "postgres"
USER = "gpufleet"
DATABASE = "gpufleet"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# A data directory takes 40 MB: tmpfs only where it has room for many (Docker's default is 64 MB).
SCRATCH_NEEDED_BYTES = 1 << 30

# Fast and small. No fsync: only an operating-system crash loses data, never a killed server.
# synchronous_commit stays on so that a commit the client saw survives `kill()`; with fsync off
# it costs one write() per commit.
SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "'16MB'",
    "max_connections": "50",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "jit": "off",
    "log_line_prefix": "'%m [%p] '",
}

T = TypeVar("T")


def binaries() -> Path:
    """The bin folder of the newest PostgreSQL installed: Debian keeps it off PATH."""
    found = sorted(
        (path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    if not found:
        raise AssertionError(
            "PostgreSQL not found in /usr/lib/postgresql/*/bin: run the tests with `make test`, "
            "which installs the Debian package postgresql"
        )
    return found[-1]


def _scratch() -> str | None:
    """Where data directories go: tmpfs when it has room (initdb there takes half the time), else /tmp."""
    shm = Path("/dev/shm")
    with suppress(OSError):
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > SCRATCH_NEEDED_BYTES:
            return str(shm)
    return None


def _as_server_user() -> list[str]:
    """The prefix that runs a command as the server's user, killed if this process dies first."""
    prefix = ["setpriv", "--pdeathsig", "KILL"]
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise AssertionError(
                f"running as root, and there is no {SERVER_USER!r} user to run PostgreSQL as: "
                "install the Debian package postgresql (`make test` does)"
            ) from None
        prefix += ["--reuid", SERVER_USER, "--regid", SERVER_USER, "--clear-groups"]
    return [*prefix, "--"]


def _environment() -> dict[str, str]:
    """This process's environment without the PG* variables that would point libpq elsewhere."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends and workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            # The command name, in parentheses, may hold spaces: the fields after it are fixed.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has already let go of its shared memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class PostgresServer:
    """One PostgreSQL server: a data directory of its own, a postmaster on a free port, a proxy.

    ``dsn`` connects as the password-authenticated user ``gpufleet`` to the database ``gpufleet``;
    ``proxy_dsn`` does the same through the proxy that ``block()`` cuts off.
    """

    def __init__(self, log_dir: Path) -> None:
        self.bin = binaries()
        self.host = HOST
        self.port = free_port()
        self.user = USER
        self.password = secrets.token_urlsafe(16)
        self.dbname = DATABASE
        self.log_path = log_dir / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.proxy = TcpProxy(self.host, self.port)
        # The server's user cannot enter pytest's tmp_path (root's, mode 0700): its own folder.
        self.directory = Path(tempfile.mkdtemp(prefix="gpufleet-pg-", dir=_scratch()))
        self.data = self.directory / "data"
        self.socket_dir = self.directory

    @property
    def dsn(self) -> str:
        return self._dsn(self.dbname, self.port)

    @property
    def proxy_dsn(self) -> str:
        return self._dsn(self.dbname, self.proxy.port)

    @property
    def admin_dsn(self) -> str:
        """The superuser, over the unix socket (no password): for what a test does behind a client's back."""
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname=postgres"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _dsn(self, dbname: str, port: int) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{port}/{quote(dbname, safe='')}"

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*_as_server_user(), *command], capture_output=True, cwd=self.directory, env=_environment()
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{Path(command[0]).name} failed (exit {result.returncode}): "
                + (result.stderr or result.stdout).decode(errors="replace").strip()
            )

    def create(self) -> None:
        """initdb, our settings, then a first start that creates the user and its database."""
        if os.geteuid() == 0:
            shutil.chown(self.directory, SERVER_USER, SERVER_USER)
        self._run(
            str(self.bin / "initdb"),
            f"--pgdata={self.data}",
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        settings = {
            **SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres_server.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        # The superuser on the unix socket (in a folder only the server's user and root can enter);
        # everyone on TCP with a password.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.start()
        self.admin(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(self.user), sql.Literal(self.password)
            )
        )
        self.database(self.dbname)

    def admin(self, query: Query) -> None:
        """Run ``query`` as the superuser."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as connection:
            connection.execute(query)

    def database(self, name: str, *, proxied: bool = False) -> str:
        """A new, empty database ``name`` owned by the user; its DSN (through the proxy if ``proxied``)."""
        self.admin(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(self.user))
        )
        return self._dsn(name, self.proxy.port if proxied else self.port)

    def start(self) -> None:
        """Start the postmaster on the same data directory and port; return once it takes connections."""
        if self.running:
            raise AssertionError("PostgreSQL is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*_as_server_user(), str(self.bin / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                env=_environment(),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"PostgreSQL exited ({code}) on start:\n{self._log_tail()}")
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                # Not listening yet, or "the database system is starting up" (or recovering).
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(
                        f"PostgreSQL not ready in {START_TIMEOUT_S:.0f} s ({exc}):\n{self._log_tail()}"
                    ) from exc
            time.sleep(0.02)

    def stop(self) -> None:
        """A fast shutdown, as `pg_ctl stop -m fast` does it: SIGINT, and wait until it has exited."""
        if self.process is None or not self.running:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"PostgreSQL did not stop in {STOP_TIMEOUT_S:.0f} s:\n{self._log_tail()}"
            ) from None

    def kill(self) -> None:
        """The database dies: SIGKILL to the postmaster and every backend. `start()` then recovers."""
        if self.process is None or not self.running:
            return
        # Stopped, the postmaster forks no backend between the listing and the killing.
        self.process.send_signal(signal.SIGSTOP)
        children = _children(self.process.pid)
        self.process.kill()
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        # A backend still attached to the shared memory would stop the next start.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"backends {children} outlived SIGKILL"
            time.sleep(0.01)

    def block(self, *, refuse: bool = False) -> None:
        """Cut off the clients of ``proxy_dsn`` (see `TcpProxy.block`); ``dsn`` still works."""
        self.proxy.block(refuse=refuse)

    def unblock(self) -> None:
        self.proxy.unblock()

    def close(self) -> None:
        """Stop the proxy and the server (left running or not) and delete the data directory."""
        try:
            self.proxy.close()
        finally:
            self._shut_down()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _shut_down(self) -> None:
        """Stop the server, which removes its shared memory (that outlives the data directory).

        A killed server left its memory behind: it is started once more, and finds and removes it.
        """
        try:
            if not self.running and (self.data / "postmaster.pid").exists():
                self.start()
            self.stop()
        except AssertionError:
            self.kill()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


@contextmanager
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A new PostgreSQL, running, with its log in ``tmp_path``; stopped and deleted on exit."""
    server = PostgresServer(tmp_path)
    try:
        server.create()
        yield server
    finally:
        server.close()


class TcpProxy:
    """A TCP forwarder from 127.0.0.1 to one target, in a thread of its own, that a test can cut.

    It runs its own event loop, so it serves sync and async tests alike, and keeps serving while a
    test's loop waits on something else.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = HOST
        self.port = 0
        self._blocked = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._call(self._listen())

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def connections(self) -> int:
        """Client connections being forwarded now."""
        return len(self._links) // 2

    def block(self, *, refuse: bool = False) -> None:
        """Drop every forwarded connection, and forward no new one until `unblock()`.

        New connections are accepted and then never answered, as behind a network partition: a
        client waits out its own connect timeout. With ``refuse``, the port is closed instead, as on
        a host whose database is down: a connection attempt fails at once.
        """
        self._call(self._block(refuse))

    def unblock(self) -> None:
        """Forward again, on the same port; connections held while blocked are closed."""
        self._call(self._unblock())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        if self._blocked:
            self._held.add(client)
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            client.close()
            return
        self._links.update((client, upstream))
        try:
            await asyncio.gather(self._pump(reader, upstream), self._pump(upstream_reader, client))
        finally:
            self._links.difference_update((client, upstream))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            # One side gone: the other goes too (the PostgreSQL protocol has no half-closed state).
            writer.close()

    def _drop(self) -> None:
        for writer in (*self._links, *self._held):
            writer.transport.abort()
        self._held.clear()

    async def _block(self, refuse: bool) -> None:
        self._blocked = True
        if refuse and self._server is not None:
            self._server.close()
            self._server = None
        self._drop()

    async def _unblock(self) -> None:
        self._blocked = False
        for writer in self._held:
            writer.transport.abort()
        self._held.clear()
        if self._server is None:
            await self._listen()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._drop()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
