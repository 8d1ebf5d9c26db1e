"""Test client of the chat product's API (CHAT_API.md): a logged-in user with the CSRF header
set, SSE parsing, and a gateway process on a given database."""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path
from typing import Any

import httpx

from llmtree.config import Settings

from cluster import Proc, free_port, llmtree_env, wait_for

JWT_SECRET = "test-secret-" + "x" * 40


class WebUser:
    def __init__(
        self, url: str, username: str | None = None, password: str = "correct horse 1"
    ) -> None:
        self.url = url
        self.username = username or f"u{secrets.token_hex(4)}"
        self.password = password
        self.client = httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=180.0))

    def register(self) -> dict[str, Any]:
        r = self.client.post(
            "/api/auth/register", json={"username": self.username, "password": self.password}
        )
        assert r.status_code == 201, r.text
        return dict(r.json()["user"])

    def login(self) -> WebUser:
        r = self.client.post(
            "/api/auth/login", json={"username": self.username, "password": self.password}
        )
        assert r.status_code == 200, r.text
        self.client.headers["X-CSRF-Token"] = self.client.cookies["llmtree_csrf"]
        return self

    def signup(self) -> WebUser:
        self.register()
        return self.login()

    def new_chat(self, **body: Any) -> str:
        r = self.client.post("/api/chats", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["chat"]["id"])

    def chat(self, chat_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/chats/{chat_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def send(self, chat_id: str, content: str | None = None, **extra: Any) -> list[dict[str, Any]]:
        """POST a message and read the whole SSE answer; returns its ChatEvents."""
        body: dict[str, Any] = {"temperature": 0, **extra}
        if content is not None:
            body["content"] = content
        with self.client.stream("POST", f"/api/chats/{chat_id}/messages", json=body) as r:
            assert r.status_code == 200, r.read().decode()
            assert r.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]

    def cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.client.cookies.items())

    def close(self) -> None:
        self.client.close()


def answer_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


class Gateway:
    """One ``llmtree gateway`` process on its own database; can be killed and started again."""

    def __init__(
        self, name: str, settings: Settings, logs: Path, database_url: str, **env: str
    ) -> None:
        self.name, self.logs = name, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.env = llmtree_env(
            settings,
            LLMTREE_GATEWAY_PORT=str(self.port),
            LLMTREE_DATABASE_URL=database_url,
            LLMTREE_JWT_SECRET=JWT_SECRET,
            **env,
        )
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> Gateway:
        self.starts += 1
        self.proc = Proc(f"{self.name}-{self.starts}", ["gateway"], self.env, self.logs)
        proc = self.proc

        def ready() -> bool:
            assert proc.alive(), proc.output()[-3000:]
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_for(ready, 90, f"gateway {self.name}")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.stop(signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
