"""Who holds each GPU: the kubelet's pod-resources API, Slurm, and the GPUs' own processes."""
