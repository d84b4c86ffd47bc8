"""The private PostgreSQL of the tests: connections, restarts, a killed server, the proxy, cleanup."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.abc import Query

from tests.postgres_server import PostgresServer, TcpProxy, postgres


async def rows(dsn: str, query: Query = "SELECT name FROM gpus ORDER BY name") -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=5) as connection:
        cursor = await connection.execute(query)
        return await cursor.fetchall()


async def add_gpus(dsn: str, *names: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=5) as connection:
        await connection.execute("CREATE TABLE IF NOT EXISTS gpus (name text PRIMARY KEY)")
        for name in names:
            await connection.execute("INSERT INTO gpus VALUES (%s)", (name,))


async def test_a_private_server_with_a_password_user(postgresql_module: PostgresServer) -> None:
    server = postgresql_module
    assert server.port != 5432 and server.dsn.startswith("postgresql://gpufleet:")
    await add_gpus(server.dsn, "gpu-0", "gpu-1")
    assert await rows(server.dsn) == [("gpu-0",), ("gpu-1",)]
    assert await rows(server.dsn, "SELECT current_user, current_database(), inet_server_addr()::text") == [
        ("gpufleet", "gpufleet", "127.0.0.1/32")
    ]
    assert await rows(server.dsn, "SELECT current_setting('port')") == [(str(server.port),)]


async def test_a_wrong_password_is_refused(postgresql_module: PostgresServer) -> None:
    wrong = postgresql_module.dsn.replace(postgresql_module.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await psycopg.AsyncConnection.connect(wrong, connect_timeout=5)


async def test_stop_and_start_keep_the_data(postgresql: PostgresServer) -> None:
    await add_gpus(postgresql.dsn, "gpu-0")
    postgresql.stop()
    assert not postgresql.running
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(postgresql.dsn, connect_timeout=5)
    postgresql.start()
    assert await rows(postgresql.dsn) == [("gpu-0",)]


async def test_a_killed_server_recovers_every_commit(postgresql: PostgresServer) -> None:
    async with await psycopg.AsyncConnection.connect(postgresql.dsn, autocommit=True) as connection:
        await connection.execute("CREATE TABLE gpus (name text PRIMARY KEY)")
        for index in range(200):
            await connection.execute("INSERT INTO gpus VALUES (%s)", (f"gpu-{index}",))
        postgresql.kill()
        with pytest.raises(psycopg.OperationalError):
            await connection.execute("SELECT 1")
    postgresql.start()
    assert await rows(postgresql.dsn, "SELECT count(*) FROM gpus") == [(200,)]


async def test_the_proxy_forwards_and_cuts_off_its_clients_only(postgresql: PostgresServer) -> None:
    await add_gpus(postgresql.proxy_dsn, "gpu-0")
    async with await psycopg.AsyncConnection.connect(postgresql.proxy_dsn) as connection:
        assert postgresql.proxy.connections == 1
        postgresql.block()
        with pytest.raises(psycopg.OperationalError):
            await connection.execute("SELECT 1")
    # Accepted and never answered: the client's own timeout ends the wait.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(psycopg.AsyncConnection.connect(postgresql.proxy_dsn), 0.5)
    assert await rows(postgresql.dsn) == [("gpu-0",)]
    postgresql.unblock()
    assert await rows(postgresql.proxy_dsn) == [("gpu-0",)]


async def test_a_refusing_proxy_fails_connections_at_once(postgresql_module: PostgresServer) -> None:
    server = postgresql_module
    with TcpProxy(server.host, server.port) as proxy:
        dsn = server.dsn.replace(f":{server.port}/", f":{proxy.port}/")
        assert await rows(dsn, "SELECT 1") == [(1,)]
        proxy.block(refuse=True)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="refused"):
            await psycopg.AsyncConnection.connect(dsn, connect_timeout=5)
        assert time.monotonic() - started < 1
        proxy.unblock()
        assert await rows(dsn, "SELECT 1") == [(1,)]


async def test_each_database_is_its_own(postgresql_module: PostgresServer) -> None:
    first = postgresql_module.database("first")
    second = postgresql_module.database("second", proxied=True)
    assert f":{postgresql_module.proxy.port}/second" in second
    await add_gpus(first, "gpu-0")
    await add_gpus(second, "gpu-9")
    assert await rows(first) == [("gpu-0",)]
    assert await rows(second) == [("gpu-9",)]


def test_failures_say_why(postgresql: PostgresServer) -> None:
    with pytest.raises(AssertionError, match=r"initdb failed \(exit 1\).*not empty"):
        postgresql.create()
    postgresql.stop()
    with (postgresql.data / "postgresql.conf").open("a") as conf:
        conf.write("shared_buffers = 'plenty'\n")
    with pytest.raises(AssertionError, match=r"exited \(1\) on start:(.|\n)*shared_buffers"):
        postgresql.start()


def shared_memory_ids() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[1]) for line in lines}


@pytest.mark.parametrize("end", ["running", "killed"])
def test_everything_goes_on_exit(tmp_path: Path, end: str) -> None:
    with postgres(tmp_path) as server:
        pid = server.process.pid if server.process else 0
        # postmaster.pid's seventh line: the key and the id of the server's System V shared memory.
        memory = int((server.data / "postmaster.pid").read_text().splitlines()[6].split()[1])
        assert memory in shared_memory_ids()
        if end == "killed":
            server.kill()
    assert not Path(f"/proc/{pid}").exists() and not server.directory.exists()
    assert memory not in shared_memory_ids()
    assert not server.proxy.running and (tmp_path / "postgres.log").exists()


def test_a_proxy_to_nothing_closes_its_clients() -> None:
    with TcpProxy("127.0.0.1", 9) as proxy, pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://u:p@127.0.0.1:{proxy.port}/d", connect_timeout=2)
