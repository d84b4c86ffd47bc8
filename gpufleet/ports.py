"""Free TCP ports on the loopback address, for the demo, the benchmark and the tests."""

from __future__ import annotations

import socket


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")
