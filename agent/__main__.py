"""`python -m gpufleet.agent`."""

from gpufleet.agent.main import main

main()
