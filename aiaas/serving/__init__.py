"""The Serve control plane: typed pins (:mod:`.pins`), our apps' kinds and ``Args``
(:mod:`.apps`), Serve's state and changes over the dashboard (:mod:`.control_plane`), and what
the CLI does with them (:mod:`.operations`, :mod:`.switch`).

Importing this package never imports Ray: Serve's schemas load inside the functions that use
them.
"""

from aiaas.serving.operations import AppStatus, apps_serving, delete, deploy, read_config, status
from aiaas.serving.switch import follow_alias, rollback

__all__ = [
    "AppStatus",
    "apps_serving",
    "delete",
    "deploy",
    "follow_alias",
    "read_config",
    "rollback",
    "status",
]
