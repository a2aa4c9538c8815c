"""What runs on the cluster (``python -m jobs.<name> CONFIG``) and how it is submitted."""
