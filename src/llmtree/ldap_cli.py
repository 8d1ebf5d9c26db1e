"""``llmtree ldap init|start|stop|status|serve``: the private slapd of a local tree.

``serve`` runs it in the foreground (for a container, see ``llmtree.ldap_serve``); the others
manage the background slapd that ``llmtree up`` and the tests use (``llmtree.slapd``).
"""

from __future__ import annotations

import argparse

from llmtree.config import Settings


def run_ldap(args: argparse.Namespace, settings: Settings) -> int:
    from llmtree.slapd import PrivateSlapd

    if args.action == "serve":
        from llmtree.ldap_serve import serve

        return serve(settings)
    slapd = PrivateSlapd(settings)
    if args.action == "init":
        slapd.init(force=args.force)
        print(f"initialised {settings.ldap_data_dir} (base {settings.ldap_base})")
    elif args.action == "start":
        if not slapd.is_initialized():
            slapd.init()
            print(f"initialised {settings.ldap_data_dir}")
        pid = slapd.start()
        print(f"slapd running at {settings.ldap_url} (pid {pid})")
    elif args.action == "stop":
        print("slapd stopped" if slapd.stop() else "slapd was not running")
    else:
        running = slapd.pid() if slapd.is_running() else None
        print(
            f"slapd running at {settings.ldap_url} (pid {running})" if running else "slapd stopped"
        )
    return 0
