"""One installed namespace: the wheel holds only `gpufleet`, and everything runs from it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = out.glob("gpufleet-*.whl")
    return built


def test_the_wheel_holds_only_the_gpufleet_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert top == {"gpufleet", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("gpufleet/agent/main.py", "gpufleet/collector/main.py", "gpufleet/cli/main.py"):
        assert module in names
    assert "gpufleet/collector/py.typed" in names and "gpufleet/agent/py.typed" in names


def test_in_a_fresh_venv_only_the_namespace_imports(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (its dependencies borrowed from this environment, read-only)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # The dependencies, as a plain path: this environment's own .pth hooks (our editable install) stay out.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *args], cwd=outside, capture_output=True, text=True, timeout=60)

    for name in ("agent", "collector"):
        assert run("-c", f"import {name}").returncode != 0, f"`import {name}` should fail"
    located = run("-c", "import gpufleet.collector.state as s; print(s.__file__)")
    assert located.returncode == 0 and located.stdout.startswith(str(site)), located.stderr
    for module in ("gpufleet.collector", "gpufleet.agent", "gpufleet.cli"):
        answer = run("-m", module, "--help")
        assert answer.returncode == 0 and "usage:" in answer.stdout, (module, answer.stderr)
