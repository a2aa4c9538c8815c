"""Settings every test process shares: no stray Ray address, auth or usage stats."""

from __future__ import annotations

import os

# Tests start their own clusters; an inherited address would send them to someone else's.
for _name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
    os.environ.pop(_name, None)
# A stray ~/.ray/auth_token turns token auth on for some processes only unless this is set.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
