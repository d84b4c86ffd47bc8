"""`python -m gpufleet.cli`."""

from gpufleet.cli.main import main

main()
