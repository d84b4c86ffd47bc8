"""Coverage-guided fuzzing of the collector's ingest path with atheris (libFuzzer).

What an input is and what counts as a crash: ``ingest_harness.py``. The seed
corpus (valid streams from the simulator) is written at start into a fresh
directory, unless corpus directories are given; libFuzzer's flags pass through::

    .venv/bin/python fuzz/ingest_fuzz.py -max_total_time=60
    .venv/bin/python fuzz/ingest_fuzz.py -max_total_time=600 corpus/   # keep what it learns
    .venv/bin/python fuzz/ingest_fuzz.py crash-1234abcd                # replay one input
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

# Coverage of the project's own code guides the fuzzer (protobuf's decoder is C: upb).
with atheris.instrument_imports(include=["agent", "collector", "gpufleet"]):
    import ingest_harness


def main() -> None:
    ingest_harness.quiet()
    argv = list(sys.argv)
    given = [arg for arg in argv[1:] if not arg.startswith("-")]
    with tempfile.TemporaryDirectory(prefix="ingest-corpus-") as directory:
        if not given:
            ingest_harness.write_seeds(Path(directory))
            argv.append(directory)
        atheris.Setup(argv, ingest_harness.one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
