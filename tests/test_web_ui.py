"""The web UI in a real headless Chromium (Debian's, driven by Playwright) against a real tree:
`llmtree up` with the real default model, the real gateway, OpenLDAP and SQLite.

The main flow is the issue's: register -> log in -> new chat -> the answer streams in -> a
follow-up that needs the first answer -> reload -> history -> rename -> stop a long answer ->
delete the chat -> delete the account. Then: API keys and password, a phone-size layout, XSS
strings as user text and as model output, another user's chat, the directory page, the busy
message. Screenshots go to var/screenshots/. The first tests check the served files without a
browser: headers, MIME types, no inline script or style, the vendored libraries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import Pyro5.api
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from llmtree.gateway.web import CONTENT_SECURITY_POLICY, mount_web

from cluster import REPO, Proc, free_port, model_cache, wait_for

WEB = REPO / "web"
SCREENSHOTS = REPO / "var" / "screenshots"
PASSWORD = "correct horse battery"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
XSS_USER = (
    '<img src=x onerror="window.__xss=1;alert(1)"> <script>window.__xss=2;alert(2)</script> '
    "[x](javascript:window.__xss=3;alert(3)) "
    '<b onmouseover="alert(4)">raw</b> <iframe src="javascript:alert(5)"></iframe>'
)
XSS_MARKDOWN = [
    '<img src=x onerror="window.__xss=11;alert(11)">',
    "<script>window.__xss=12;alert(12)</script>",
    "[click me](javascript:window.__xss=13;alert(13))",
    "<a href=\"javascript:alert(14)\">raw link</a> <b onmouseover='alert(15)'>raw bold</b>",
    '<svg onload="alert(16)"><circle r="5"/></svg> <iframe srcdoc="<script>alert(17)</script>">',
    "![pic](javascript:alert(18)) <form action=javascript:alert(19)><button>go</button></form>",
    "```html\n<script>alert(20)</script>\n```",
]
# Elements and attributes that must never come out of user or model text.
INERT_CHECK = """(root) => {
  const bad = [];
  for (const el of root.querySelectorAll('*')) {
    if (el.closest('svg.icon')) continue;  // the UI's own icons (no sanitized node keeps that class)
    const tag = el.tagName.toLowerCase();
    if (['script', 'img', 'iframe', 'svg', 'form', 'object', 'embed', 'style'].includes(tag)
        && !el.closest('.msg-avatar')) bad.push('<' + tag + '>');
    for (const attr of el.attributes) {
      if (attr.name.startsWith('on')) bad.push(tag + '[' + attr.name + ']');
      if (/^\\s*javascript:/i.test(attr.value)) bad.push(tag + '[' + attr.name + '=javascript:]');
      if (attr.name === 'srcdoc') bad.push(tag + '[srcdoc]');
    }
  }
  return bad;
}"""


# ---------------------------------------------------------------------- the served files


class _PageScan(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            if "src" not in names:
                self.problems.append("inline <script>")
            self.scripts.append(dict(attrs).get("src") or "")
        if tag == "style":
            self.problems.append("inline <style>")
        self.problems += [f"{tag}[{n}]" for n in names if n == "style" or n.startswith("on")]


@pytest.mark.parametrize("page", ["index.html", "directory.html"])
def test_pages_have_no_inline_script_or_style(page: str) -> None:
    scan = _PageScan()
    scan.feed((WEB / page).read_text())
    assert scan.problems == []
    assert scan.scripts and all(src.startswith("/static/") for src in scan.scripts)
    for src in scan.scripts:
        assert (
            WEB / src.replace("/static/vendor/", "vendor/").replace("/static/", "static/")
        ).is_file()


def test_scripts_never_assign_unsanitized_html() -> None:
    for path in sorted((WEB / "static").glob("*.js")):
        text = path.read_text()
        for line in text.splitlines():
            if "innerHTML" in line or "outerHTML" in line or "insertAdjacentHTML" in line:
                assert "innerHTML = DOMPurify.sanitize(" in line, f"{path.name}: {line.strip()}"
        assert "document.write" not in text and "eval(" not in text


def test_vendored_libraries_match_their_pinned_versions() -> None:
    pins = dict(
        line.split() for line in (WEB / "vendor" / "VERSIONS").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    script = (WEB / "update-vendor.sh").read_text()
    assert f"MARKED={pins['marked']}" in script and f"DOMPURIFY={pins['dompurify']}" in script
    assert f"HIGHLIGHT={pins['@highlightjs/cdn-assets']}" in script
    assert f"marked v{pins['marked']}" in (WEB / "vendor/marked/marked.umd.js").read_text()[:200]
    assert (
        f"DOMPurify {pins['dompurify']}"
        in (WEB / "vendor/dompurify/purify.min.js").read_text()[:200]
    )
    assert (
        f"v{pins['@highlightjs/cdn-assets']}"
        in (WEB / "vendor/highlight/highlight.min.js").read_text()[:300]
    )
    for name in ("marked", "dompurify", "highlight"):
        assert (WEB / "vendor" / name / "LICENSE").stat().st_size > 500


def test_routes_mime_types_caching_and_headers() -> None:
    app = FastAPI()
    mount_web(app)
    client = TestClient(app)
    expected = {
        "/": "text/html",
        "/c/0123abcd": "text/html",
        "/directory": "text/html",
        "/manifest.webmanifest": "application/manifest+json",
        "/static/app.js": "text/javascript",
        "/static/app.css": "text/css",
        "/static/icons/icon.svg": "image/svg+xml",
        "/static/icons/icon-192.png": "image/png",
        "/static/vendor/dompurify/purify.min.js": "text/javascript",
        "/static/vendor/highlight/github.min.css": "text/css",
    }
    for url, media_type in expected.items():
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"].startswith(media_type), url
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-cache", url
        etag = response.headers["etag"]
        assert client.get(url, headers={"If-None-Match": etag}).status_code in (200, 304)
    etag = client.get("/static/app.js").headers["etag"]
    assert client.get("/static/app.js", headers={"If-None-Match": etag}).status_code == 304
    csp = CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "unsafe" not in csp
    for bad in ("/static/../pyproject.toml", "/static/%2e%2e/index.html", "/static/nope.js"):
        response = client.get(bad)
        assert response.status_code == 404, bad
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    manifest = json.loads(client.get("/manifest.webmanifest").text)
    assert manifest["start_url"] == "/" and manifest["display"] == "standalone"
    assert manifest["theme_color"].startswith("#")
    sizes = {icon["sizes"] for icon in manifest["icons"]}
    assert {"192x192", "512x512"} <= sizes
    for icon in manifest["icons"]:
        assert client.get(icon["src"]).status_code == 200


# ---------------------------------------------------------------------- the real tree


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    var: Path
    proc: Proc

    @property
    def dev_key(self) -> str:
        return (self.var / "dev-api-key").read_text().strip()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmtree", *args],
            env=self.env, capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip

    def running(self) -> dict[str, int]:
        """Requests running on each serving node, asked of the nodes themselves (Pyro5)."""
        counts = {}
        for node in httpx.get(f"{self.url}/api/nodes", timeout=10).json()["nodes"]:
            if not node["model"]:
                continue
            with Pyro5.api.Proxy(node["uri"]) as proxy:
                proxy._pyroTimeout = 5
                status = proxy.status()
            counts[node["name"]] = status["running"] + status["queued"]
        return counts


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("webvar")
    ports = {"LDAP": free_port(), "ROOT": free_port(), "GATEWAY": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTREE_")}
    env.update(
        LLMTREE_VAR_DIR=str(var),
        LLMTREE_LDAP_URL=f"ldap://127.0.0.1:{ports['LDAP']}",
        LLMTREE_ROOT_PORT=str(ports["ROOT"]),
        LLMTREE_GATEWAY_PORT=str(ports["GATEWAY"]),
        LLMTREE_MODEL_CACHE=model_cache(),
        LLMTREE_NODE_TTL_S="4",
        LLMTREE_HEARTBEAT_S="1",
        # one slot per worker and no queue: two answers at once fill the tree (the busy test)
        LLMTREE_SLOTS="1",
        LLMTREE_MAX_QUEUE="0",
        PYTHONUNBUFFERED="1",
    )
    proc = Proc("up", ["up", "--workers", "2"], env, var)

    def up() -> bool:
        assert proc.alive(), proc.output()[-4000:]
        return "llmtree is up" in proc.output()

    try:
        wait_for(up, 600, "llmtree up")
        yield Stack(f"http://127.0.0.1:{ports['GATEWAY']}", env, var, proc)
    finally:
        proc.stop(signal.SIGINT, timeout_s=40)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Watch:
    """What a page did that it must not: dialogs (alert...), uncaught errors, CSP violations."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.dialogs == [] and self.errors == [] and self.csp == [], self


def open_page(browser: Any, stack: Stack, phone: bool = False) -> tuple[Any, Watch]:
    if phone:
        context = browser.new_context(
            base_url=stack.url, viewport={"width": 390, "height": 844},
            device_scale_factor=2, is_mobile=True, has_touch=True,
        )  # fmt: skip
    else:
        context = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 820})
    context.set_default_timeout(30_000)
    page = context.new_page()
    watch = Watch()

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: watch.errors.append(str(error)))
    page.on(
        "console",
        lambda m: watch.csp.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return page, watch


def register_and_login(page: Any, username: str, password: str = PASSWORD) -> None:
    page.goto("/")
    page.click("#tab-register")
    page.fill("#register-username", username)
    page.fill("#register-password", password)
    page.fill("#register-password2", password)
    page.click("#register-submit")
    message = page.locator("#login-message")
    message.wait_for()
    assert "Account created" in message.inner_text()
    assert page.input_value("#login-username") == username
    page.fill("#login-password", password)
    page.click("#login-submit")
    page.locator("#app").wait_for()
    assert page.locator("#account-name").text_content() == username


def set_temperature(page: Any, value: str) -> None:
    if page.locator("#open-sidebar").is_visible():  # a phone: the account is in the drawer
        page.click("#open-sidebar")
    page.click("#open-account")
    page.fill("#temperature", value)
    page.dispatch_event("#temperature", "change")
    page.click("#account-dialog [data-close]")


def wait_js(page: Any, expression: str, timeout_s: float = 30, arg: Any = None) -> Any:
    """Poll a JS predicate (``page.wait_for_function`` evals a string, which the CSP forbids)."""
    return wait_for(lambda: page.evaluate(expression, arg), timeout_s, expression)


def answers(page: Any) -> Any:
    return page.locator(".msg-assistant .msg-content")


def ask(page: Any, text: str, count: int, timeout_s: float = 120) -> str:
    """Type a question, send it with Enter, wait for answer number ``count`` to be complete."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    done = page.locator('.msg-assistant[data-status="complete"]')
    try:
        wait_for(lambda: done.count() >= count, timeout_s, f"answer {count}")
    except AssertionError as error:
        statuses = page.evaluate(
            "() => [...document.querySelectorAll('.msg')].map(m => m.dataset.role + ':' + m.dataset.status)"
        )
        notice = page.locator("#notice").text_content()
        raise AssertionError(f"{error}; messages {statuses}; notice {notice!r}") from None
    text_out: str = answers(page).nth(count - 1).inner_text()
    return text_out


def record_stream(page: Any) -> None:
    """Record every state of the streaming answer's text as the page draws it."""
    page.evaluate(
        """() => {
          window.__states = [];
          const log = document.getElementById('messages');
          new MutationObserver(() => {
            const el = log.querySelector('.msg-assistant.streaming .msg-content');
            if (!el) return;
            const text = el.textContent;
            const last = window.__states[window.__states.length - 1];
            if (text && (!last || last.text !== text)) {
              window.__states.push({text, stopShown: !document.getElementById('stop').hidden});
            }
          }).observe(log, {childList: true, subtree: true, characterData: true});
        }"""
    )


def chat_id(page: Any) -> str:
    match = re.fullmatch(r".*/c/([A-Za-z0-9_-]+)", page.url)
    assert match, page.url
    return match.group(1)


def api_get(page: Any, path: str) -> Any:
    return page.request.get(path)


def overflow(page: Any) -> dict[str, list[int]]:
    """Elements wider than the viewport (scrollWidth > clientWidth) among the page's frames."""
    result: dict[str, list[int]] = page.evaluate(
        """() => {
          const out = {};
          const check = (name, el) => {
            if (el && el.scrollWidth > el.clientWidth) out[name] = [el.scrollWidth, el.clientWidth];
          };
          check('html', document.documentElement);
          check('body', document.body);
          for (const sel of ['.app', '.main', '.scroller', '.messages', '.composer-wrap', '.topbar']) {
            check(sel, document.querySelector(sel));
          }
          return out;
        }"""
    )
    return result


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_chat_flow_in_a_real_browser(stack: Stack, browser: Any) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page, watch = open_page(browser, stack)
    username = f"ada_{uuid.uuid4().hex[:6]}"
    register_and_login(page, username)
    set_temperature(page, "0")

    # new chat: the answer appears token by token
    assert page.locator("#welcome").is_visible()
    record_stream(page)
    first = ask(page, "Hi! My name is Zorblax. Tell me a fun fact about octopuses.", 1)
    states = page.evaluate("window.__states")
    texts = [s["text"] for s in states]
    assert len(set(texts)) >= 3, texts  # several intermediate states were drawn
    assert len(texts[0]) < len(first.strip()) and all(s["stopShown"] for s in states)
    cid = chat_id(page)
    assert page.locator(f'.chat-item[data-id="{cid}"]').count() == 1
    # the model titles the chat after the first exchange
    wait_js(page, "() => document.getElementById('chat-title').textContent !== 'New chat'", 90)
    generated_title = page.locator("#chat-title").inner_text()
    assert generated_title and generated_title in page.locator(".chat-list").inner_text()

    # a follow-up that needs the first answer (the same question alone does not know the name)
    second = ask(page, "What is my name?", 2)
    assert "Zorblax" in second, second
    alone = httpx.post(
        f"{stack.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.dev_key}"},
        json={"messages": [{"role": "user", "content": "What is my name?"}], "temperature": 0},
        timeout=120,
    ).json()["choices"][0]["message"]["content"]
    assert "Zorblax" not in alone

    # reload: the history is there, the same
    before = page.locator(".msg .msg-content").all_inner_texts()
    page.reload()
    page.locator('.msg-assistant[data-status="complete"]').nth(1).wait_for()
    assert page.locator(".msg .msg-content").all_inner_texts() == before
    assert len(before) == 4 and page.locator("#chat-title").inner_text() == generated_title
    page.screenshot(path=str(SCREENSHOTS / "chat-desktop.png"))

    # rename from the chat list
    item = page.locator(f'.chat-item[data-id="{cid}"]')
    item.hover()
    item.locator(".rename-chat").click()
    page.fill(".chat-item .rename-input", "Name test")
    page.press(".chat-item .rename-input", "Enter")
    wait_js(page, "() => document.getElementById('chat-title').textContent === 'Name test'")
    assert item.locator(".chat-link-title").inner_text() == "Name test"
    page.reload()
    page.locator("#messages .msg").first.wait_for()
    assert page.locator("#chat-title").inner_text() == "Name test"
    assert api_get(page, f"/api/chats/{cid}").json()["chat"]["title"] == "Name test"

    # stop a long answer mid-way: the text so far is kept, status interrupted, nothing runs on
    page.fill("#prompt", "Write a very long story about a brave dragon who travels the world.")
    page.press("#prompt", "Enter")
    wait_js(
        page,
        """() => { const el = document.querySelector('.msg-assistant.streaming .msg-content');
                   return el && el.textContent.length > 80; }""",
        120,
    )
    page.click("#stop")
    stopped = page.locator('.msg-assistant[data-status="interrupted"]')
    stopped.wait_for(timeout=10_000)
    shown = stopped.locator(".msg-content").inner_text()
    assert len(shown) > 80 and "Stopped" in stopped.inner_text()
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    wait_for(lambda: sum(stack.running().values()) == 0, 10, "the nodes to run nothing")
    stored = api_get(page, f"/api/chats/{cid}").json()["messages"]
    assert [m["status"] for m in stored] == ["complete"] * 4 + ["complete", "interrupted"]
    assert len(stored[-1]["content"]) >= 80 and stored[-1]["content"].split()[0] in shown
    time.sleep(1.5)  # the answer really ended: it does not grow any more
    assert api_get(page, f"/api/chats/{cid}").json()["messages"][-1] == stored[-1]
    page.reload()
    page.locator('.msg-assistant[data-status="interrupted"]').wait_for()

    # delete the chat
    page.click("#delete-chat")
    page.click("#confirm-ok")
    wait_js(page, "(id) => !document.querySelector(`.chat-item[data-id='${id}']`)", arg=cid)
    assert page.url.rstrip("/") == stack.url and page.locator("#welcome").is_visible()
    assert api_get(page, f"/api/chats/{cid}").status == 404

    # delete the account
    page.click("#open-account")
    page.fill("#delete-password", PASSWORD)
    page.click("#delete-account-form button[type=submit]")
    page.click("#confirm-ok")
    page.locator("#auth").wait_for()
    assert "deleted" in page.locator("#login-message").inner_text()
    assert api_get(page, "/api/me").status == 401
    page.fill("#login-username", username)
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    wait_js(page, "() => document.getElementById('login-message').textContent.includes('Wrong')")
    watch.assert_clean()
    page.context.close()


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_api_keys_and_password_panels(stack: Stack, browser: Any) -> None:
    page, watch = open_page(browser, stack)
    username = f"keys_{uuid.uuid4().hex[:6]}"
    register_and_login(page, username)

    page.click("#open-keys")
    page.fill("#key-name", "my script")
    page.click("#key-form button[type=submit]")
    secret = page.locator("#key-secret-value")
    secret.wait_for()
    key = secret.inner_text()
    assert key.startswith("llmt-") and len(key) > 20
    item = page.locator(".key-item", has_text="my script")
    item.wait_for()
    assert key not in page.locator("#key-list").inner_text()  # the list shows a prefix only
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{stack.url}/v1/models", headers=auth).status_code == 200
    item.locator(".revoke-key").click()
    page.click("#confirm-ok")
    page.locator(".key-item", has_text="my script").wait_for(state="detached")
    assert httpx.get(f"{stack.url}/v1/models", headers=auth).status_code == 401
    page.click("#keys-dialog [data-close]")

    page.click("#open-account")
    page.fill("#current-password", PASSWORD)
    page.fill("#new-password", "a brand new password")
    page.click("#password-form button[type=submit]")
    wait_js(
        page,
        """() => !document.getElementById('auth').hidden ||
                 document.getElementById('password-message').textContent.includes('changed')""",
    )
    if page.locator("#app").is_visible():
        page.click("#account-dialog [data-close]")
        page.click("#open-account")
    page.click("#logout")
    page.locator("#auth").wait_for()
    page.fill("#login-username", username)
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    wait_js(page, "() => document.getElementById('login-message').textContent.includes('Wrong')")
    page.fill("#login-password", "a brand new password")
    page.click("#login-submit")
    page.locator("#app").wait_for()
    watch.assert_clean()
    page.context.close()


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_phone_layout_has_no_horizontal_overflow(stack: Stack, browser: Any) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page, watch = open_page(browser, stack, phone=True)
    register_and_login(page, f"phone_{uuid.uuid4().hex[:6]}")
    assert overflow(page) == {}
    set_temperature(page, "0")
    long_url = "https://example.com/" + "a-very-long-path-segment" * 12
    answer = ask(page, f"Write a Python function that adds two numbers. (see {long_url})", 1)
    assert answer
    wait_js(page, "() => document.getElementById('chat-title').textContent !== 'New chat'", 90)
    assert overflow(page) == {}, overflow(page)
    assert page.locator("#sidebar").is_hidden() or not page.locator("#sidebar").is_visible()
    page.screenshot(path=str(SCREENSHOTS / "chat-phone.png"))
    page.click("#open-sidebar")
    page.locator("#sidebar .chat-item").first.wait_for()
    page.wait_for_timeout(400)  # the drawer's slide-in transition
    assert overflow(page) == {}
    page.screenshot(path=str(SCREENSHOTS / "chat-phone-menu.png"))
    page.click("#scrim", position={"x": 370, "y": 400})
    # installable: Chromium finds no problem with the manifest and icons
    cdp = page.context.new_cdp_session(page)
    errors = cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]
    # a Playwright context is off the record, which no manifest can change
    assert [e for e in errors if e["errorId"] != "in-incognito"] == [], errors
    watch.assert_clean()
    page.context.close()


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_xss_strings_stay_inert(stack: Stack, browser: Any) -> None:
    page, watch = open_page(browser, stack)
    register_and_login(page, f"xss_{uuid.uuid4().hex[:6]}")
    set_temperature(page, "0")
    # as user text, and as model output: the model is asked to write markup back (a prompt
    # this model answers with a <script> element on the fused kernels and the PyTorch path)
    ask(page, XSS_USER, 1)
    ask(page, "Show me an HTML example with <script>alert(1)</script> in it.", 2)
    cid = chat_id(page)
    stored = api_get(page, f"/api/chats/{cid}").json()["messages"]
    assert stored[0]["content"] == XSS_USER
    assert "<script>" in stored[3]["content"]  # the model really wrote markup back

    def check() -> None:
        page.mouse.move(200, 200)
        for bold in page.locator("#messages b").all():
            bold.hover()
        assert page.evaluate(INERT_CHECK, page.locator("#messages").element_handle()) == []
        assert page.evaluate("window.__xss") is None
        user_text = page.locator(".msg-user .msg-content").first.inner_text()
        assert user_text == XSS_USER  # shown literally, as typed
        assert "<script>" in page.locator(".msg-assistant .msg-content").nth(1).inner_text()

    check()
    page.reload()
    page.locator('.msg-assistant[data-status="complete"]').nth(1).wait_for()
    check()

    # the markdown path that renders every answer, fed each string as model output
    rendered = page.evaluate(
        """async (sources) => {
          const { renderMarkdown } = await import('/static/markdown.js');
          const box = document.createElement('div');
          box.id = 'xss-box';
          document.body.append(box);
          renderMarkdown(box, sources.join('\\n\\n'));
          return box.textContent;
        }""",
        XSS_MARKDOWN,
    )
    assert page.evaluate(INERT_CHECK, page.locator("#xss-box").element_handle()) == []
    for link in page.locator("#xss-box a").all():
        assert link.get_attribute("href") in (None, "")
        link.click()
    page.wait_for_timeout(500)
    # raw HTML is shown as the text it is
    assert (
        XSS_MARKDOWN[0] in rendered and XSS_MARKDOWN[1] in rendered and "raw link</a>" in rendered
    )
    assert page.evaluate("window.__xss") is None
    watch.assert_clean()
    page.context.close()


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_other_users_chat_is_not_found(stack: Stack, browser: Any) -> None:
    alice, alice_watch = open_page(browser, stack)
    register_and_login(alice, f"alice_{uuid.uuid4().hex[:6]}")
    csrf = next(c["value"] for c in alice.context.cookies() if c["name"] == "llmtree_csrf")
    made = alice.request.post(
        "/api/chats", data={"title": "Alice's secret plans"}, headers={"X-CSRF-Token": csrf}
    )
    assert made.status == 201
    cid = made.json()["chat"]["id"]

    bob, bob_watch = open_page(browser, stack)
    register_and_login(bob, f"bob_{uuid.uuid4().hex[:6]}")
    assert bob.request.get(f"/api/chats/{cid}").status == 404
    bob_csrf = next(c["value"] for c in bob.context.cookies() if c["name"] == "llmtree_csrf")
    headers = {"X-CSRF-Token": bob_csrf}
    assert (
        bob.request.patch(f"/api/chats/{cid}", data={"title": "x"}, headers=headers).status == 404
    )
    assert bob.request.delete(f"/api/chats/{cid}", headers=headers).status == 404
    bob.goto(f"/c/{cid}")
    bob.locator("#not-found").wait_for()
    assert "Chat not found" in bob.locator("#not-found").inner_text()
    assert "secret plans" not in bob.content()
    socket_opened = bob.evaluate(
        """(id) => new Promise((resolve) => {
          const ws = new WebSocket(`ws://${location.host}/api/chats/${id}/ws`);
          ws.onopen = () => resolve(true);
          ws.onclose = () => resolve(false);
        })""",
        cid,
    )
    assert socket_opened is False
    # Alice still has it
    alice.goto(f"/c/{cid}")
    wait_js(alice, "() => document.getElementById('chat-title').textContent.includes('secret')")
    alice_watch.assert_clean()
    bob_watch.assert_clean()
    alice.context.close()
    bob.context.close()


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_directory_page_is_a_live_tree(stack: Stack, browser: Any) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page, watch = open_page(browser, stack)
    page.goto("/directory")  # public, like the directory itself
    nested = 'li.node[data-name="root"] li.node[data-name="{}"]'
    for name in ("worker-1", "worker-2"):
        page.locator(nested.format(name)).wait_for()
    nodes = {n["name"]: n for n in httpx.get(f"{stack.url}/api/nodes").json()["nodes"]}
    for name, node in nodes.items():
        card = page.locator(f'.node-card[data-name="{name}"]')
        text = card.inner_text()
        assert node["status"] in text
        assert (node["parent"] or "—") in text
        if node["model"]:
            assert node["model"] in text and f"of {node['capacity']} slot" in text
        heartbeat = card.locator(".heartbeat").inner_text()
        assert heartbeat == "just now" or heartbeat.endswith("ago"), heartbeat
    assert page.locator("#stat-nodes").inner_text() == str(len(nodes))

    # live: a node that joins under worker-1 appears one level deeper, and leaves by itself
    leaf = Proc("leaf", ["node", "--name", "leaf-1", "--parent", "worker-1"], stack.env, stack.var)
    try:
        page.locator(nested.format("worker-1") + ' li.node[data-name="leaf-1"]').wait_for(
            timeout=120_000
        )
        card = page.locator('.node-card[data-name="leaf-1"]')
        assert "child of worker-1" in card.inner_text()
        wait_for(lambda: "of 1 slot" in card.inner_text(), 20, "leaf-1 with its model loaded")
        page.locator("#stat-nodes").filter(has_text="4").wait_for()
        page.screenshot(path=str(SCREENSHOTS / "directory.png"), full_page=True)
    finally:
        leaf.stop(signal.SIGTERM, timeout_s=30)
    page.locator('li.node[data-name="leaf-1"]').wait_for(state="detached", timeout=20_000)
    assert page.locator("#stat-nodes").inner_text() == "3"
    watch.assert_clean()
    page.context.close()


@pytest.mark.slow
@pytest.mark.ldap
@pytest.mark.model
def test_busy_tree_gives_a_polite_message_and_retry_works(stack: Stack, browser: Any) -> None:
    page, watch = open_page(browser, stack)
    register_and_login(page, f"busy_{uuid.uuid4().hex[:6]}")
    set_temperature(page, "0")
    wait_for(lambda: sum(stack.running().values()) == 0, 30, "an idle tree")
    # fill both workers' single slots with long answers over the OpenAI API
    release = threading.Event()
    started: list[int] = []

    def hog() -> None:
        body = {
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
            "stream": True, "max_tokens": 1500, "temperature": 0.8,
        }  # fmt: skip
        headers = {"Authorization": f"Bearer {stack.dev_key}"}
        with httpx.stream(
            "POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as response:
            for _ in response.iter_lines():
                if not started or started[-1] != id(response):
                    started.append(id(response))
                if release.is_set():
                    return

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(2)]
    try:
        for thread in hogs:
            thread.start()
        wait_for(lambda: sum(stack.running().values()) >= 2 and len(started) >= 2, 60, "full tree")
        page.fill("#prompt", "Hello there!")
        page.press("#prompt", "Enter")
        notice = page.locator("#notice")
        notice.wait_for(timeout=30_000)
        assert "busy" in notice.inner_text() and "try again" in notice.inner_text().lower()
        assert page.locator("#notice-retry").is_visible()
        assert page.locator("#send").is_visible()  # ready for another try
    finally:
        release.set()
        for thread in hogs:
            thread.join(30)
    wait_for(lambda: sum(stack.running().values()) == 0, 20, "the hogs to be cancelled")
    page.click("#notice-retry")
    page.locator('.msg-assistant[data-status="complete"]').wait_for(timeout=120_000)
    assert page.locator("#notice").is_hidden()
    assert page.locator(".msg-user").count() == 1  # the retry answered the same question
    watch.assert_clean()
    page.context.close()
