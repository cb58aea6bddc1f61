"""Console-script entry point.

``infer-plan loadtest`` runs Locust, which needs gevent's monkey-patching before
anything imports ``ssl`` or ``socket``; so it is applied here, first, for that command
only, and the other commands keep plain asyncio.
"""

from __future__ import annotations

import sys


def main() -> None:
    if "loadtest" in sys.argv[1:2]:
        from gevent import monkey

        monkey.patch_all()
    from .app import main as app_main

    sys.exit(app_main())
