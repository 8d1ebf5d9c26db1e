"""``llmtree``: one entry point for every process and tool.

    llmtree up [--workers N] [--fanout K]     a whole local tree: slapd, root, workers, gateway
    llmtree node --name N --parent P | --root  one node
    llmtree gateway                            the HTTP gateway and web UI
    llmtree nodes [--table]                    the directory as a tree (or a table)
    llmtree status N                           a node's live status and the end of its log
    llmtree parent N P                         move a running node under another parent
    llmtree drain N                            stop new work to N, finish its requests, remove it
    llmtree ldap init|start|stop|status|serve  the private slapd (serve: foreground, containers)
    llmtree chat                               chat in the terminal
    llmtree keys create|list|revoke            API keys for /v1/* in the chat database
    llmtree users list|set-tier U T|tiers      users' rate-limit tiers
    llmtree bench URL ...                      load test an OpenAI-compatible endpoint
    llmtree simulate [--nodes N] [--fanout K]  a discrete-event model of a large tree
    llmtree certs init | issue NAME            the project CA and TLS certificates

Errors print one line saying what to do and exit 1; nothing prints a traceback at a user.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from llmtree.config import NODE_NAME_PATTERN, Settings
from llmtree.errors import ConfigError, LlmTreeError

logger = logging.getLogger("llmtree")


def configure_logging(tag: str, level: str | None = None) -> None:
    level = (level or os.environ.get("LLMTREE_LOG_LEVEL") or "INFO").upper()
    if log_format() == "json":
        from llmtree.logs import configure_json

        configure_json(tag.strip("[]"), level)
    else:
        logging.basicConfig(
            level=level,
            format=f"%(asctime)s %(levelname)-5s {tag} %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
    for noisy in ("Pyro5", "ldap3", "urllib3", "httpx", "transformers", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_format() -> str:
    """'json' or 'text', from LLMTREE_LOG_FORMAT (``--log-format`` sets it for child processes)."""
    return "json" if os.environ.get("LLMTREE_LOG_FORMAT", "").lower() == "json" else "text"


def make_settings(args: argparse.Namespace, **fields: Any) -> Settings:
    """Settings from the environment, overridden by the CLI flags that were given."""
    overrides = {k: v for k, v in fields.items() if v is not None}
    if getattr(args, "ldap_url", None):
        overrides["ldap_url"] = args.ldap_url
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"bad setting {where}: {first['msg']}") from None
    if settings.tls and getattr(args, "command", None) != "certs":
        from llmtree.tree.client import configure_tls

        configure_tls(settings)  # every Pyro5 daemon and proxy of this process: mutual TLS
    return settings


def check_name(name: str, what: str = "node name") -> str:
    import re

    if not re.match(NODE_NAME_PATTERN, name):
        raise ConfigError(
            f"bad {what} {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


# -- commands ----------------------------------------------------------------------------------
def cmd_node(args: argparse.Namespace) -> int:
    if args.parent_from_ordinal:
        from llmtree.tree.ordinal import place_by_ordinal

        root_name = make_settings(args).root_name
        args.name, args.parent = place_by_ordinal(args.name, args.fanout, root_name)
    if args.root == (args.parent is not None):
        raise ConfigError("give either --root or --parent NAME")
    name = check_name(args.name or ("root" if args.root else ""))
    if args.parent:
        check_name(args.parent, "parent name")
    configure_logging(f"[{name}]", args.log_level)
    settings = make_settings(
        args,
        model=args.model,
        slots=args.slots,
        max_queue=args.max_queue,
        node_host=args.host,
        node_port=args.port if not args.root else None,
        root_port=args.port if args.root else None,
        threads=args.threads,
        policy=args.policy,
        lazy_load=True if args.lazy else None,
        idle_unload_s=args.idle_unload_s,
    )
    from llmtree.tree.server import NodeServer

    NodeServer(settings, name, args.parent, args.root).run()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    configure_logging("[gateway]", args.log_level)
    settings = make_settings(args, gateway_host=args.host, gateway_port=args.port)
    import uvicorn

    from llmtree.gateway.app import create_app
    from llmtree.logs import uvicorn_log_config

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level="warning",
        log_config=uvicorn_log_config(log_format()),
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    configure_logging("[up]", args.log_level)
    if args.tls:
        from llmtree.certs import ensure_local

        issued = ensure_local(Settings().certs_path)
        os.environ["LLMTREE_TLS"] = "1"  # the launcher's children inherit it
        os.environ["LLMTREE_TLS_CERT"], os.environ["LLMTREE_TLS_KEY"] = (
            str(issued.cert.resolve()),
            str(issued.key.resolve()),
        )
        os.environ["LLMTREE_TLS_CA"] = str((issued.cert.parent / "ca.crt").resolve())
    settings = make_settings(
        args, model=args.model, slots=args.slots, gateway_port=args.port, threads=args.threads
    )
    from llmtree.launcher import Launcher

    return Launcher(settings, workers=args.workers, fanout=args.fanout).run()


def cmd_ldap(args: argparse.Namespace) -> int:
    from llmtree.ldap_cli import run_ldap

    return run_ldap(args, make_settings(args))


def cmd_nodes(args: argparse.Namespace) -> int:
    from llmtree.views import print_nodes

    print_nodes(make_settings(args), table=args.table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from llmtree.views import print_status

    print_status(make_settings(args), check_name(args.name), lines=args.lines)
    return 0


def cmd_parent(args: argparse.Namespace) -> int:
    from llmtree.views import move_node

    move_node(make_settings(args), check_name(args.name), check_name(args.parent, "parent name"))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from llmtree.tree.drain import drain_node

    name = check_name(args.name)
    result = drain_node(make_settings(args), name, args.wait)
    print(f"{name} draining ({result['held']} requests held)")
    if args.wait > 0:
        if not result["left"]:
            raise ConfigError(f"{name} has not left after {args.wait:g} s; it is still draining")
        print(f"{name} finished its requests and left the tree")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from llmtree.gateway.users_cli import run_users

    return run_users(args, make_settings(args))


def cmd_chat(args: argparse.Namespace) -> int:
    from llmtree.chat_client import chat_loop

    settings = make_settings(args)
    url = args.url or f"http://{settings.gateway_host}:{settings.gateway_port}"
    return chat_loop(url, args.model, args.api_key, settings.var_dir)


def cmd_keys(args: argparse.Namespace) -> int:
    from llmtree.gateway.keys_cli import run_keys

    return run_keys(args, make_settings(args))


def cmd_certs(args: argparse.Namespace) -> int:
    from llmtree.certs import describe, init_ca, issue

    directory = make_settings(args).certs_path
    if args.action == "init":
        paths = init_ca(directory, force=args.force)
        print(f"created the project CA {describe(paths.cert)}")
    elif args.action == "issue":
        if not args.name:
            raise ConfigError("give the certificate's NAME: llmtree certs issue NAME")
        issued = issue(directory, args.name, args.host)
        print(f"issued {describe(issued.cert)}; key {issued.key} (mode 0600)")
    else:
        for path in sorted(directory.glob("*.crt")):
            print(describe(path))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from llmtree.bench.cli import run_bench

    result: int = run_bench(args)
    return result


def cmd_simulate(args: argparse.Namespace) -> int:
    from llmtree.sim.cli import run_simulate

    return run_simulate(args)


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtree", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ldap-url", help="LDAP server (default ldap://127.0.0.1:3389)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text (default) or JSON"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a whole local tree (slapd, root, workers, gateway)")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--fanout", type=int, default=2, help="children per node (default 2)")
    up.add_argument("--model", help="'smollm2', a HF model folder or a GGUF file")
    up.add_argument("--slots", type=int, help="requests each worker serves at once")
    up.add_argument("--threads", type=int, help="torch threads per worker (default: share cores)")
    up.add_argument("--port", type=int, help="gateway port (default 8000)")
    up.add_argument("--tls", action="store_true", help="mutual TLS between all processes")
    up.set_defaults(func=cmd_up)

    node = sub.add_parser("node", help="run one node")
    node.add_argument("--name", help="node name (unique in the directory)")
    node.add_argument("--parent", help="name of the parent node")
    node.add_argument("--root", action="store_true", help="run the root node")
    node.add_argument(
        "--parent-from-ordinal",
        action="store_true",
        help="name = pod name (or --name) NAME-i; parent from i in a tree of --fanout (Kubernetes)",
    )
    node.add_argument("--fanout", type=int, default=2, help="with --parent-from-ordinal (2)")
    node.add_argument("--model", help="'smollm2', a HF model folder or a GGUF file")
    node.add_argument("--slots", type=int, help="requests served at once (default 32)")
    node.add_argument("--max-queue", type=int, help="requests held waiting (default 64)")
    node.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    node.add_argument("--host", help="address to listen on and publish (default 127.0.0.1)")
    node.add_argument("--port", type=int, help="Pyro5 port (root 9100, workers any free)")
    node.add_argument(
        "--policy",
        choices=["seed", "weighted-rr", "p2c"],
        help="routing to children: seed (default), weighted-rr (by subtree size), p2c (load)",
    )
    node.add_argument("--lazy", action="store_true", help="load the model on the first request")
    node.add_argument(
        "--idle-unload-s", type=float, help="with --lazy: release the model after this idle time"
    )
    node.set_defaults(func=cmd_node)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway and web UI")
    gateway.add_argument("--host", help="address (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (default 8000)")
    gateway.set_defaults(func=cmd_gateway)

    nodes = sub.add_parser("nodes", help="show the directory as a tree")
    nodes.add_argument("--table", action="store_true", help="a table instead of a tree")
    nodes.set_defaults(func=cmd_nodes)

    status = sub.add_parser("status", help="a node's status and the end of its log")
    status.add_argument("name")
    status.add_argument("--lines", type=int, default=15, help="log lines to show (default 15)")
    status.set_defaults(func=cmd_status)

    parent = sub.add_parser("parent", help="move a running node under another parent")
    parent.add_argument("name")
    parent.add_argument("parent")
    parent.set_defaults(func=cmd_parent)

    drain = sub.add_parser("drain", help="stop new work to a node, let it finish, remove it")
    drain.add_argument("name")
    drain.add_argument(
        "--wait", type=float, default=300, help="seconds to wait until it has left (0: do not)"
    )
    drain.set_defaults(func=cmd_drain)

    ldap = sub.add_parser("ldap", help="the private slapd: init, start, stop, status")
    ldap.add_argument("action", choices=["init", "start", "stop", "status", "serve"])
    ldap.add_argument("--force", action="store_true", help="init: wipe existing data")
    ldap.set_defaults(func=cmd_ldap)

    chat = sub.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--url", help="gateway URL (default http://127.0.0.1:8000)")
    chat.add_argument("--model", help="model name")
    chat.add_argument("--api-key", help="API key (default $LLMTREE_API_KEY, <var>/dev-api-key)")
    chat.set_defaults(func=cmd_chat)

    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    from llmtree.gateway.keys_cli import add_arguments as add_keys_arguments

    add_keys_arguments(keys)
    keys.set_defaults(func=cmd_keys)

    users = sub.add_parser("users", help="users' rate-limit tiers: list, set-tier, tiers")
    from llmtree.gateway.users_cli import add_arguments as add_users_arguments

    add_users_arguments(users)
    users.set_defaults(func=cmd_users)

    certs = sub.add_parser("certs", help="the project CA and TLS certificates")
    certs.add_argument("action", choices=["init", "issue", "list"])
    certs.add_argument("name", nargs="?", help="issue: the node or gateway name")
    certs.add_argument("--host", action="append", default=[], help="issue: an extra address")
    certs.add_argument("--force", action="store_true", help="init: replace an existing CA")
    certs.set_defaults(func=cmd_certs)

    bench = sub.add_parser("bench", help="load test an OpenAI-compatible endpoint")
    from llmtree.bench.cli import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    simulate = sub.add_parser("simulate", help="simulate a large tree (queueing, load spread)")
    from llmtree.sim.cli import add_arguments as add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_format:
        os.environ["LLMTREE_LOG_FORMAT"] = args.log_format  # child processes log the same way
    try:
        result: int = args.func(args)
        return result
    except LlmTreeError as error:
        print(f"llmtree: error: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
