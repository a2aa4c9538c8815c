"""The cluster's life: the local multi-node launcher, status, shutdown and rendering for ray up / KubeRay."""
