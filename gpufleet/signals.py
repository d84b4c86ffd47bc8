"""Graceful shutdown for the daemons: the first SIGTERM/SIGINT drains, a second forces; and the
same asked of a child process."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess

log = logging.getLogger(__name__)


def stop_on_signals(stop: asyncio.Event, draining: str) -> None:
    """Set ``stop`` on the first SIGTERM or SIGINT (logging ``draining``); cancel every task on the second."""
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal() -> None:
        nonlocal received
        received += 1
        if received == 1:
            log.info("%s (signal again to exit at once)", draining)
            stop.set()
            return
        for task in asyncio.all_tasks(loop):
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Ask a child to stop (SIGTERM); kill it if it has not within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
