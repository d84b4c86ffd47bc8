"""`python -m gpufleet.collector`."""

from gpufleet.collector.main import main

main()
