"""``llmtree chat``: a terminal chat against any OpenAI-compatible gateway, streamed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx


def find_api_key(given: str | None, var_dir: Path) -> str | None:
    """--api-key, else $LLMTREE_API_KEY, else the dev key `llmtree up` wrote under var_dir."""
    if given:
        return given
    if os.environ.get("LLMTREE_API_KEY"):
        return os.environ["LLMTREE_API_KEY"]
    try:
        return (var_dir / "dev-api-key").read_text().strip() or None
    except OSError:
        return None


def chat_loop(
    url: str, model: str | None = None, api_key: str | None = None, var_dir: Path = Path("var")
) -> int:
    history: list[dict[str, str]] = []
    key = find_api_key(api_key, var_dir)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    print(f"chatting with {url} (Ctrl-D to leave)")
    timeout = httpx.Timeout(10.0, read=300.0)
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not question:
                continue
            history.append({"role": "user", "content": question})
            body: dict[str, object] = {"messages": history, "stream": True}
            if model:
                body["model"] = model
            answer = []
            try:
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        error = json.loads(response.read() or b"{}").get("error", {})
                        print(f"error: {error.get('message', response.status_code)}")
                        history.pop()
                        continue
                    sys.stdout.write("llm> ")
                    for line in response.iter_lines():
                        if not line.startswith("data:") or line.endswith("[DONE]"):
                            continue
                        chunk = json.loads(line[5:])
                        if "error" in chunk:
                            print(f"\nerror: {chunk['error'].get('message')}")
                            break
                        for choice in chunk.get("choices", []):
                            text = choice.get("delta", {}).get("content") or ""
                            answer.append(text)
                            sys.stdout.write(text)
                            sys.stdout.flush()
                    print()
            except httpx.HTTPError as error:
                print(f"error: cannot reach {url}: {error}; is the gateway running (llmtree up)?")
                history.pop()
                continue
            history.append({"role": "assistant", "content": "".join(answer)})
