"""``python -m llmtree.probe [URL]``: exit 0 when URL answers 2xx within 3 s, else 1.

The container image's HEALTHCHECK (the slim image has no curl). Without URL it probes
``$LLMTREE_PROBE_URL``, else a node's ``/metrics`` when ``LLMTREE_METRICS_PORT`` is set (that port
opens once the model is loaded), else the gateway's ``/healthz``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def default_url() -> str:
    if url := os.environ.get("LLMTREE_PROBE_URL"):
        return url
    if (port := os.environ.get("LLMTREE_METRICS_PORT", "0")) not in ("", "0"):
        return f"http://127.0.0.1:{port}/metrics"
    return f"http://127.0.0.1:{os.environ.get('LLMTREE_GATEWAY_PORT', '8000')}/healthz"


def probe(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - loopback
            return 200 <= int(reply.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    url = argv[0] if argv else default_url()
    ok = probe(url)
    if not ok:
        print(f"probe failed: {url}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
