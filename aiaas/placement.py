"""Can a group of workers ever be placed on a cluster? Answered before anything is submitted."""

from __future__ import annotations


def problem(
    nodes: list[dict[str, float]], per_worker: dict[str, float], num_workers: int
) -> str | None:
    """Why ``num_workers`` workers needing ``per_worker`` each cannot fit, or None when they can.

    Args:
        nodes: Total resources of each alive node, e.g. ``[{"CPU": 2, "memory": ...}, ...]``.
        per_worker: Resources one worker reserves.
        num_workers: Workers to place (each whole on one node).
    """
    wanted = {key: value for key, value in per_worker.items() if value > 0}
    fits = 0
    for node in nodes:
        per_node = [int(node.get(key, 0) // value) for key, value in wanted.items()]
        fits += min(per_node) if per_node else num_workers
    if fits >= num_workers:
        return None
    totals = {key: sum(node.get(key, 0) for node in nodes) for key in wanted}
    have = ", ".join(f"{key}={totals[key]:g}" for key in wanted)
    need = ", ".join(f"{key}={value:g}" for key, value in wanted.items())
    return (
        f"{num_workers} workers with {{{need}}} each can never be placed: the cluster's nodes "
        f"fit {fits} (cluster total {have})"
    )
