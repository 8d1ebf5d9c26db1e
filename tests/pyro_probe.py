"""A stand-alone Pyro5 client for the TLS tests, run as its own process (Pyro5's TLS settings
are per process). It prints one JSON line: {"ok": bool, "result": ..., "error": "Type: text"}.

    python tests/pyro_probe.py call URI METHOD [JSON_ARGS] [--cert C --key K --ca CA]
                               [--serializer marshal|json|serpent]
    python tests/pyro_probe.py pickle URI MARKER [--cert C --key K --ca CA]
    python tests/pyro_probe.py answer ROOT_URI PROMPT --cert C --key K --ca CA

``call`` and ``pickle`` are the rogue: plain Pyro5 with whatever certificate it is given (or
none) and none of llmtree's restrictions. ``pickle`` sends a hand-made connect message whose
payload is a pickle that would create MARKER if anyone unpickled it. ``answer`` is a well-behaved
gateway: llmtree's own TLS set-up, a sink daemon, ``root.submit``, then it waits for the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import ssl
import sys
import threading
import time
import uuid
from typing import Any

import Pyro5
import Pyro5.api
import Pyro5.protocol
import Pyro5.socketutil

from llmtree.protocol import unpack_events

PICKLE_IDS = (4, 5, 7, 99)
"""Serializer ids a pickle-speaking client might put in its header (none is serpent's 1)."""


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def rogue_tls(args: argparse.Namespace) -> None:
    if args.cert or args.ca:
        Pyro5.config.SSL = True
        Pyro5.config.SSL_CLIENTCERT = args.cert or ""
        Pyro5.config.SSL_CLIENTKEY = args.key or ""
        Pyro5.config.SSL_CACERTS = args.ca or ""


def do_call(args: argparse.Namespace) -> Any:
    rogue_tls(args)
    proxy = Pyro5.api.Proxy(args.uri)
    proxy._pyroTimeout = 5
    if args.serializer:
        proxy._pyroSerializer = args.serializer
    return getattr(proxy, args.method)(*json.loads(args.args or "[]"))


def do_pickle(args: argparse.Namespace) -> Any:
    uri = Pyro5.api.URI(args.uri)
    answers = []
    for serializer_id in PICKLE_IDS:
        sock = socket.create_connection((uri.host, uri.port), timeout=5)
        if args.cert or args.ca:
            context = ssl.create_default_context(cafile=args.ca)
            if args.cert:
                context.load_cert_chain(args.cert, args.key)
            sock = context.wrap_socket(sock, server_hostname=uri.host)
        payload = pickle.dumps({"handshake": Evil(args.marker), "object": uri.object})
        message = Pyro5.protocol.SendingMessage(
            Pyro5.protocol.MSG_CONNECT, 0, 1, serializer_id, payload
        )
        sock.sendall(message.data)
        try:
            reply = Pyro5.protocol.recv_stub(Pyro5.socketutil.SocketConnection(sock))
            answers.append({"id": serializer_id, "type": reply.type, "data": repr(reply.data)})
        except Exception as error:  # noqa: BLE001 - the probe reports whatever happened
            answers.append({"id": serializer_id, "error": f"{type(error).__name__}: {error}"})
        finally:
            sock.close()
    accepted = [a for a in answers if a.get("type") == Pyro5.protocol.MSG_CONNECTOK]
    if accepted:
        return {"accepted": accepted, "answers": answers}
    raise PermissionError(json.dumps(answers))


@Pyro5.api.behavior(instance_mode="single")
class Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = threading.Event()

    @Pyro5.api.expose
    def deliver(self, packed: str | list[dict[str, Any]]) -> int:
        events = unpack_events(packed)
        self.events.extend(events)
        if any(e.get("finish_reason") for e in events):
            self.done.set()
        return len(events)


def do_answer(args: argparse.Namespace) -> Any:
    from llmtree.config import Settings
    from llmtree.tree.client import SINK_ID, Peers, configure_pyro, configure_tls

    settings = Settings(tls=True, tls_cert=args.cert, tls_key=args.key, tls_ca=args.ca)
    configure_pyro(16)
    configure_tls(settings)
    sink = Sink()
    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    sink_uri = str(daemon.register(sink, SINK_ID))
    threading.Thread(target=daemon.requestLoop, daemon=True).start()
    request = {
        "request_id": f"tls-{uuid.uuid4().hex[:8]}",
        "messages": [{"role": "user", "content": args.method}],
        "sampling": {"max_tokens": 8, "temperature": 0},
        "sink": sink_uri,
    }
    started = time.monotonic()
    node = Peers(10.0).call(args.uri, "submit", request)
    if not sink.done.wait(120):
        raise TimeoutError(f"no answer in 120 s; events {sink.events}")
    events = sorted(sink.events, key=lambda e: e["seq"])
    daemon.shutdown()
    return {
        "node": node,
        "text": "".join(e["text"] for e in events),
        "finish_reason": events[-1]["finish_reason"],
        "seconds": round(time.monotonic() - started, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["call", "pickle", "answer"])
    parser.add_argument("uri")
    parser.add_argument("method", help="call: the method; pickle: the marker; answer: a prompt")
    parser.add_argument("args", nargs="?")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca")
    parser.add_argument("--serializer")
    args = parser.parse_args()
    args.marker = args.method
    try:
        if args.mode == "call":
            result = do_call(args)
        elif args.mode == "pickle":
            result = do_pickle(args)
        else:
            result = do_answer(args)
        print(json.dumps({"ok": True, "result": result}, default=repr))
    except Exception as error:  # noqa: BLE001 - the probe reports whatever happened
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
