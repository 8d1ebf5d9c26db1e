"use strict";
const log = document.getElementById("log");
const input = document.getElementById("input");
const send = document.getElementById("send");
const stop = document.getElementById("stop");
const history = [];
let controller = null;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;            // never innerHTML: model output is untrusted
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function ask(question) {
  history.push({ role: "user", content: question });
  bubble("user", question);
  const out = bubble("assistant", "");
  const meta = document.createElement("div");
  meta.className = "meta";
  controller = new AbortController();
  send.hidden = true; stop.hidden = false;
  let answer = "", tokens = 0, node = "";
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        messages: history, stream: true, stream_options: { include_usage: true },
        temperature: Number(document.getElementById("temperature").value) || 0,
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { answer += delta.content; out.textContent = answer; log.scrollTop = log.scrollHeight; }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    meta.textContent = tokens ? `${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s)` : "";
    out.appendChild(meta);
  } catch (err) {
    if (err.name === "AbortError") { meta.textContent = "stopped"; out.appendChild(meta); }
    else { out.classList.add("error"); out.textContent = answer + (answer ? "\n" : "") + "Error: " + err.message; }
  } finally {
    history.push({ role: "assistant", content: answer });
    controller = null; send.hidden = false; stop.hidden = true; input.focus();
  }
}

document.getElementById("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = input.value.trim();
  if (!question || controller) return;
  input.value = "";
  ask(question);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("form").requestSubmit(); }
});
stop.addEventListener("click", () => controller && controller.abort());
fetch("/v1/models").then(r => r.json()).then(m => {
  if (m.data && m.data[0]) document.getElementById("model").textContent = "model: " + m.data[0].id;
}).catch(() => {});
