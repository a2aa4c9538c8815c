"""A small real Ray job: run one task on every alive node and print where each ran.

Run it with Ray's own CLI from the repository root::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.node_report
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
def _where_am_i() -> dict[str, Any]:
    context = ray.get_runtime_context()
    import torch  # proves the node's python is the project's environment

    return {
        "node_id": context.get_node_id(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "python": sys.executable,
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def main() -> int:
    """Run one task pinned to each alive node; print one line per node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init()
    started = time.perf_counter()
    nodes = [node for node in ray.nodes() if node["Alive"]]
    names = {node["NodeID"]: node.get("NodeName") or node["NodeManagerAddress"] for node in nodes}
    tasks = [
        _where_am_i.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        ).remote()
        for node in nodes
    ]
    results = ray.get(tasks)
    print(f"Ran {len(results)} tasks on {len(nodes)} nodes ({platform.node()}):")
    for result in sorted(results, key=lambda item: names[item["node_id"]]):
        print(
            f"  node {names[result['node_id']]:<10} id={result['node_id'][:12]} "
            f"pid={result['pid']:<7} "
            f"python={result['python']} torch={result['torch']} ray={result['ray']}"
        )
    print(f"Done in {time.perf_counter() - started:.2f}s")
    return 0 if len({result["node_id"] for result in results}) == len(nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
