"""The supervisor of a fault-tolerant local cluster: ``python -m cluster.supervisor CONFIG``.

``cluster up`` starts it in a session of its own, outside every node's session, so killing all
of the head's processes leaves it running. Every ``supervise_interval_s`` it checks the recorded
processes and starts again what died, in dependency order (Redis, the head, the workers, MLflow,
Prometheus) through :func:`cluster.launcher.heal`, the same code ``cluster up`` repairs with;
then it puts back the Serve apps if the restarted GCS came back without them.

Why our own loop rather than supervisord or systemd units: on real machines those (or KubeRay's
operator) restart a head; here there is no init system to rely on, and a restart must follow
Ray's order and end with aiaas's own restore step, which no generic supervisor knows.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.dashboard import Dashboard
from cluster import launcher, serve_restore, state

#: After a failed repair, wait this long before the next try (the machine may be overloaded).
_BACKOFF_S = 5.0


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


def supervise_once(config: ClusterConfig, own_pid: int) -> bool:
    """One check and repair; False once this supervisor has nothing left to watch."""
    with launcher.held(config, wait=False) as holding:
        if not holding:
            return True  # `up` or `down` is at work; look again later
        recorded = state.load(config)
        if recorded is None:
            return False
        ours = [s for s in recorded.services if s.group == "supervisor"]
        if not ours or ours[0].pid != own_pid:
            return False  # the cluster was started again with another supervisor
        if not [p for p in launcher.lost_parts(recorded) if p.group != "supervisor"]:
            return True
        head_lost = recorded.head() in launcher.lost_parts(recorded)
        with Dashboard(recorded.dashboard_url, config.auth_mode) as dashboard:
            result = launcher.heal(config, recorded, dashboard, log, skip=frozenset({"supervisor"}))
        log(f"restarted: {', '.join(result.restarted)}")
    if head_lost:
        restored = serve_restore.restore(config)
        if restored:
            log(f"put Serve apps back from the last applied config: {', '.join(restored)}")
    return True


def main(argv: list[str]) -> int:
    config = loader.load(Path(argv[1]), ClusterConfig)
    interval = config.gcs_fault_tolerance.supervise_interval_s

    def stop(_signal: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log(f"supervising cluster '{config.name}' every {interval:g}s")
    import os

    while True:
        time.sleep(interval)
        try:
            if not supervise_once(config, os.getpid()):
                log("the cluster is no longer recorded with this supervisor; exiting")
                return 0
        except Exception:  # a failed repair is logged and tried again, never fatal
            log("repair failed:\n" + traceback.format_exc())
            time.sleep(_BACKOFF_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
