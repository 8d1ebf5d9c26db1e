"""``llmtree chat``: a terminal chat against any OpenAI-compatible gateway, streamed."""

from __future__ import annotations

import json
import sys

import httpx


def chat_loop(url: str, model: str | None = None) -> int:
    history: list[dict[str, str]] = []
    print(f"chatting with {url} (Ctrl-D to leave)")
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=300.0)) as client:
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
