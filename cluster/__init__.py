"""The cluster's life: local multi-node launcher, status, shutdown, ray up / KubeRay rendering."""
