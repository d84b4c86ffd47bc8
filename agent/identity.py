"""Who this node is: a stable id, the current boot, the hostname."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

MACHINE_ID_PATHS = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def machine_id() -> str:
    """/etc/machine-id, which survives reboots and reinstalls of the agent."""
    for path in MACHINE_ID_PATHS:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value:
            return value
    raise RuntimeError("no /etc/machine-id on this host: pass --node-id")


def boot_id() -> str:
    """The kernel's id of the current boot; a new one means the node rebooted."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return str(uuid.uuid4())


def hostname() -> str:
    return socket.gethostname()
