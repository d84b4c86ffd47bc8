"""The ingest path under fuzzing: fuzz/ingest_fuzz.py (atheris, coverage-guided) for a bounded time.

What an input is and what counts as a crash is in fuzz/ingest_harness.py. A crash
leaves its input in the test's tmp_path; replay it with
``.venv/bin/python fuzz/ingest_fuzz.py PATH`` (or ``ingest_harness.one_input``).
"""

from __future__ import annotations

import importlib.util
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

FUZZ = ROOT / "fuzz"
FUZZ_SECONDS = 20


def load_harness() -> ModuleType:
    """fuzz/ingest_harness.py: a script folder, not a package, so loaded by path."""
    spec = importlib.util.spec_from_file_location("ingest_harness", FUZZ / "ingest_harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = load_harness()
SEEDS: list[bytes] = harness.seeds()


def test_the_seed_streams_reach_the_fleet_and_every_exposition() -> None:
    """The fuzzer starts from valid streams: registered nodes whose reports were taken in."""
    for seed in SEEDS:
        state = harness.one_input(seed)
        nodes = list(state.nodes())
        assert nodes and all(node.last_sequence >= 1 for node in nodes), seed
        assert all(gpu.sample is not None for node in nodes for gpu in node.gpus.values())
    assert len(list(harness.one_input(SEEDS[1]).nodes())) == 2


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few bytes flipped, inserted, deleted or duplicated, or the input cut short."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        position = rng.randint(0, len(out))
        operation = rng.randrange(5)
        if operation == 0 and out:
            out[min(position, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif operation == 1:
            out[position:position] = rng.randbytes(rng.randint(1, 8))
        elif operation == 2:
            del out[position : position + rng.randint(1, 16)]
        elif operation == 3:
            start = rng.randint(0, len(out))
            out[position:position] = out[start : start + rng.randint(1, 64)]
        else:
            del out[position:]
    return bytes(out)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), mutations=st.integers(0, 2**32 - 1))
def test_mutated_streams_are_taken_in_or_refused_as_documented(seed: bytes, mutations: int) -> None:
    """The same target without coverage guidance: quick, and runs wherever the tests do."""
    harness.one_input(mutate(seed, random.Random(mutations)))


def test_the_fuzzer_finds_no_crash_in_the_ingest_path(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        assert platform.machine() != "x86_64", "atheris is missing: pip install -e '.[dev]'"
        # No atheris wheel for this machine (its dev extra installs it on x86_64 only): the same
        # target, mutating the seeds at random for the same time, without coverage guidance.
        rng = random.Random(0)
        deadline = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < deadline:
            harness.one_input(mutate(rng.choice(SEEDS), rng))
        return
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "ingest_fuzz.py"),
            f"-max_total_time={FUZZ_SECONDS}",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
    )
    output = result.stdout + result.stderr
    crashes = sorted(str(path) for path in tmp_path.glob("*-*") if path.is_file())
    assert result.returncode == 0 and not crashes, (
        f"the fuzzer found a crash (replay: .venv/bin/python fuzz/ingest_fuzz.py {' '.join(crashes)}):\n"
        + output[-6000:]
    )
    runs = re.search(r"Done (\d+) runs", output)
    assert runs and int(runs.group(1)) >= 1000, f"the fuzzer hardly ran:\n{output[-3000:]}"
