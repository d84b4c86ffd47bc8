"""Generated code for the kubelet's pod-resources API (proto/gpufleet/kubelet)."""
