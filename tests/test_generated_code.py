"""The committed gencode matches the .proto files, and proto/ is no Python package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "gpufleet").rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "gpufleet").rglob("*_pb2*.py*"))
    assert fresh == committed
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"stale generated code, run `python tools/generate_proto.py`: {stale}"


def test_proto_folder_is_not_a_python_package() -> None:
    assert not list((ROOT / "proto").rglob("*.py"))


def test_protobuf_runs_the_upb_backend() -> None:
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
