// The directory page: every node registered in LDAP, drawn as the tree its parent links make,
// re-read every 2 seconds from GET /api/nodes. All values are set as text.

import { ago, api, drawIcons, h } from "./common.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
let nodes = [];
let readAt = null;

function childrenOf(all) {
  const names = new Set(all.map((n) => n.name));
  const children = new Map();
  const tops = [];
  for (const node of all) {
    if (node.parent && names.has(node.parent) && node.parent !== node.name) {
      if (!children.has(node.parent)) children.set(node.parent, []);
      children.get(node.parent).push(node);
    } else {
      tops.push(node);
    }
  }
  return { tops, children };
}

function fact(label, value, extra = null) {
  return h("div", {}, h("dt", { text: label }), h("dd", {}, value, extra));
}

function heartbeatText(node) {
  return node.heartbeat ? `${ago(node.heartbeat)}` : "never";
}

function nodeCard(node, isRoot) {
  const capacity = Number(node.capacity) || 0;
  const load = Number(node.load) || 0;
  const bar = h("span");
  const share = capacity ? Math.min(100, Math.round((100 * load) / capacity)) : 0;
  bar.style.width = `${share}%`;
  if (share >= 80) bar.classList.add("high");
  const role = isRoot ? "root" : node.parent ? `child of ${node.parent}` : "no parent";
  const status = String(node.status || "unknown");
  return h(
    "article",
    { class: `node-card${isRoot ? " is-root" : ""}`, dataset: { name: node.name, parent: node.parent || "" } },
    h("div", { class: "node-name" }, node.name, h("span", { class: "node-role", text: role })),
    h("span", { class: `badge badge-${status.replace(/[^a-z]/g, "")}`, text: status }),
    h(
      "dl",
      { class: "node-facts" },
      fact("parent", node.parent || "—"),
      fact("load", capacity ? `${load} of ${capacity} ${capacity === 1 ? "slot" : "slots"}` : `${load} (forwards only)`, h("div", { class: "load-bar" }, bar)),
      fact("model", node.model || "none (forwards only)"),
      fact("last heartbeat", h("span", { class: "heartbeat", dataset: { at: node.heartbeat || "" }, text: heartbeatText(node) })),
      fact("host", node.host || "—"),
      fact("entry TTL", node.ttl === null || node.ttl === undefined ? "—" : `${node.ttl} s`),
    ),
  );
}

function branch(node, children, seen) {
  seen.add(node.name);
  const item = h("li", { class: "node", dataset: { name: node.name } }, nodeCard(node, !node.parent));
  const kids = (children.get(node.name) || []).filter((k) => !seen.has(k.name));
  if (kids.length) item.append(h("ul", {}, kids.map((k) => branch(k, children, seen))));
  return item;
}

function render() {
  const { tops, children } = childrenOf(nodes);
  const seen = new Set();
  $("tree").replaceChildren(...tops.map((n) => branch(n, children, seen)));
  $("empty").hidden = nodes.length > 0;
  const serving = nodes.filter((n) => n.model);
  $("stat-nodes").textContent = String(nodes.length);
  $("stat-serving").textContent = String(serving.length);
  const load = serving.reduce((sum, n) => sum + (Number(n.load) || 0), 0);
  const slots = serving.reduce((sum, n) => sum + (Number(n.capacity) || 0), 0);
  $("stat-load").textContent = `${load} / ${slots}`;
  tick();
}

function tick() {
  for (const span of document.querySelectorAll(".heartbeat")) {
    span.textContent = span.dataset.at ? ago(span.dataset.at) : "never";
  }
  $("stat-updated").textContent = readAt ? ago(new Date(readAt).toISOString()) : "–";
}

function live(ok, text) {
  $("live").className = `dir-live ${ok ? "ok" : "down"}`;
  $("live-text").textContent = text;
}

async function poll() {
  try {
    const data = await api("GET", "/api/nodes");
    nodes = Array.isArray(data.nodes) ? data.nodes : [];
    readAt = Date.now();
    $("error").hidden = true;
    live(true, "live");
    render();
  } catch (error) {
    $("error").textContent = `The directory cannot be read right now: ${error.message}`;
    $("error").hidden = false;
    live(false, "disconnected, retrying");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

drawIcons();
setInterval(tick, 1000);
poll();
