"""A real Mosquitto broker on a free port, that tests can stop and start again."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt

from gpufleet.ports import free_port


class Broker:
    def __init__(self, directory: Path, users: dict[str, str] | None = None) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise AssertionError("mosquitto not found: run the tests with `make test`, which installs it")
        self.binary = binary
        self.port = free_port()
        self.directory = directory
        # As root, mosquitto would switch to its own user, which cannot read the test's files.
        config = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr", "user root"]
        if users:
            passwords = directory / "passwords"
            passwords.touch()
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True)
            config += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            config.append("allow_anonymous true")
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(config) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not start: {(self.directory / 'mosquitto.log').read_text()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Subscriber:
    """Collects JSON messages from a topic filter, in arrival order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, dict[str, Any], bool]] = []

    async def collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, (bytes, str)) else str(message.payload)
            self.messages.append((str(message.topic), json.loads(payload), message.retain))

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.messages) < count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"got {len(self.messages)} of {count} messages"
            )
            await asyncio.sleep(0.05)


@asynccontextmanager
async def subscribed(broker: Broker, topic: str, **credentials: str) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client("127.0.0.1", broker.port, **credentials) as client:  # type: ignore[arg-type]
        await client.subscribe(topic, qos=1)
        subscriber = Subscriber(client)
        task = asyncio.create_task(subscriber.collect())
        try:
            yield subscriber
        finally:
            task.cancel()
