"""The web UI: pages and static files from ``web/`` and the security headers every response carries.

Routes: ``/`` and ``/c/<chat id>`` (the chat app), ``/directory`` (the LDAP directory as a live
tree), ``/manifest.webmanifest`` (install as an app), ``/static/...`` (``web/static``: scripts,
styles, icons) and ``/static/vendor/...`` (``web/vendor``: marked, DOMPurify and highlight.js from
npm). Nothing is inline, so the Content-Security-Policy forbids inline script and style. Static
files are revalidated on each load (``no-cache`` + ETag, 304 when unchanged).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'; manifest-src 'self'; worker-src 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
# The files the UI ships, by suffix; set here so the answer does not depend on /etc/mime.types.
MEDIA_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain",
}
for _suffix, _media_type in MEDIA_TYPES.items():
    mimetypes.add_type(_media_type, _suffix)

PAGES = {"/": "index.html", "/directory": "directory.html"}
NO_CACHE = "no-cache"


def web_dir() -> Path:
    """The web UI files: shipped in the wheel as ``llmtree/_web``, else the repo's ``web/``."""
    packaged = Path(__file__).resolve().parents[1] / "_web"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "web"


def _file(name: str, media_type: str) -> FileResponse:
    path = web_dir() / name
    if not path.is_file():
        raise HTTPException(404, f"{name} is not part of this build of the web UI")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": NO_CACHE})


class SecurityHeaders:
    """ASGI middleware: adds ``SECURITY_HEADERS`` (and ``no-cache`` under ``/static/``) to every
    HTTP response that does not set them itself. Plain ASGI, not ``BaseHTTPMiddleware``: it only
    edits the response start message, so streamed bodies (SSE) pass through untouched instead of
    being re-queued chunk by chunk."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if static:
                    headers.setdefault("Cache-Control", NO_CACHE)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_web(app: FastAPI) -> None:
    """Serve the UI and add the security headers to every response."""

    app.add_middleware(SecurityHeaders)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return _file(PAGES["/"], "text/html; charset=utf-8")

    @app.get("/c/{chat_id}", include_in_schema=False)
    async def chat_page(chat_id: str) -> FileResponse:
        return _file(PAGES["/"], "text/html; charset=utf-8")  # the app opens the chat itself

    @app.get("/directory", include_in_schema=False)
    async def directory() -> FileResponse:
        return _file(PAGES["/directory"], "text/html; charset=utf-8")

    @app.get("/manifest.webmanifest", include_in_schema=False)
    async def manifest() -> FileResponse:
        return _file("manifest.webmanifest", MEDIA_TYPES[".webmanifest"])

    # StaticFiles refuses paths outside the folder and answers If-None-Match with 304;
    # its 404 goes through the app's handler, so it is OpenAI-shaped like every other error.
    app.mount("/static/vendor", StaticFiles(directory=web_dir() / "vendor"), name="vendor")
    app.mount("/static", StaticFiles(directory=web_dir() / "static"), name="static")
