"""The Prometheus text format: content type, label escaping, value formatting, family headers.

Shared by every view of the collector (the gpufleet exposition and the dcgm-compatible one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(value: str) -> str:
    """Escape per the text format: backslash, double quote and newline."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def format_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def with_label(text: bytes, label: bytes) -> bytes:
    """Every sample line of ``text`` with one more label first (``label``: 'name="value"')."""
    if not label:
        return text
    out = []
    for line in text.split(b"\n"):
        if not line or line.startswith(b"#"):
            out.append(line)
            continue
        brace, space = line.find(b"{"), line.find(b" ")
        if brace == -1 or brace > space:
            out.append(line[:space] + b"{" + label + b"}" + line[space:])
        elif line[brace + 1 : brace + 2] == b"}":
            out.append(line[: brace + 1] + label + line[brace + 1 :])
        else:
            out.append(line[: brace + 1] + label + b"," + line[brace + 1 :])
    return b"\n".join(out)


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    help: str

    def header(self) -> str:
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.type}\n"


FAMILIES: list[Family] = []
