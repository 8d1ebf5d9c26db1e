// The llmtree chat app: accounts, the chat list, streaming answers over a WebSocket, API keys.
// Everything the user or the model wrote reaches the page as text (textContent) or as markdown
// sanitized by DOMPurify (markdown.js); nothing else is ever assigned as HTML.

import { ago, api, copyText, drawIcons, formatDate, h, icon } from "./common.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

const state = {
  user: null,
  chats: [], // Chat objects, most recently updated first
  chat: null, // the open chat, null for a new one not created yet
  messages: [], // the open chat's messages, oldest first
  socket: null,
  socketChatId: null,
  socketReady: null,
  generation: null, // the answer being written: {userEl, el, message, content, kind, stopTimer}
  renderTimer: null,
};

const TEMPERATURE_KEY = "llmtree.temperature";
const SUGGESTIONS = [
  "What is the capital of France?",
  "Write a short poem about trees.",
  "Explain recursion with a small Python example.",
  "Give me three tips for a good night's sleep.",
];
const ERROR_TEXT = {
  overloaded:
    "llmtree is busy right now: every model slot is taken. Please try again in a few seconds.",
  queue_timeout:
    "Your question waited too long in the queue and timed out. The service is very busy; please try again.",
  context_length:
    "This conversation is too long for the model. Start a new chat or ask a shorter question.",
  failed: "Something went wrong while writing the answer. Please try again.",
  busy: "An answer is already being written. Wait for it to finish, or press Stop.",
  network: "The connection to llmtree was lost. What arrived so far is kept; please try again.",
};
const BUSY_RETRIES = 120; // x 0.5 s
const RETRYABLE = new Set(["overloaded", "queue_timeout", "failed", "network"]);

// ---------------------------------------------------------------- small UI helpers

function showMessage(id, text, kind = "error") {
  const node = $(id);
  node.textContent = text;
  node.className = `form-message form-message-${kind}`;
  node.hidden = !text;
}

function toast(text, kind = "info") {
  const node = h("div", { class: `toast toast-${kind}`, role: "status", text });
  $("toasts").append(node);
  setTimeout(() => node.classList.add("toast-leaving"), 2600);
  setTimeout(() => node.remove(), 3000);
}

function iconButton(name, label, onclick, extra = "") {
  return h(
    "button",
    { class: `icon-button ${extra}`.trim(), type: "button", "aria-label": label, title: label, onclick },
    icon(name),
  );
}

async function withBusy(button, work) {
  button.disabled = true;
  button.classList.add("is-busy");
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.classList.remove("is-busy");
  }
}

function confirmDialog({ title, body, ok = "Delete" }) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-body").textContent = body;
  $("confirm-ok").textContent = ok;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").removeEventListener("click", yes);
      $("confirm-cancel").removeEventListener("click", no);
      dialog.removeEventListener("close", no);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    $("confirm-ok").addEventListener("click", yes);
    $("confirm-cancel").addEventListener("click", no);
    dialog.addEventListener("close", no);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

/** A failed API call: a dead session goes back to the login screen, the rest becomes a toast. */
function apiFailed(error) {
  if (error.status === 401 || error.code === "csrf_failed") {
    showAuth("Your session has ended. Please log in again.");
  } else {
    toast(error.message, "error");
  }
}

// ---------------------------------------------------------------- logged out

function selectTab(which) {
  const login = which === "login";
  $("tab-login").setAttribute("aria-selected", String(login));
  $("tab-register").setAttribute("aria-selected", String(!login));
  $("login-form").hidden = !login;
  $("register-form").hidden = login;
  (login ? $("login-username") : $("register-username")).focus();
}

function showAuth(message = "", kind = "info") {
  closeSocket();
  state.user = null;
  state.chats = [];
  state.chat = null;
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  $("boot").hidden = true;
  $("app").hidden = true;
  $("auth").hidden = false;
  document.title = "Log in · llmtree";
  selectTab("login");
  showMessage("login-message", message, kind);
  showMessage("register-message", "");
}

function authErrorText(error) {
  if (error.code === "invalid_credentials") return "Wrong username or password.";
  if (error.code === "rate_limited") {
    const wait = error.retryAfter ? ` in ${error.retryAfter} s` : " later";
    return `Too many attempts. Please try again${wait}.`;
  }
  if (error.code === "username_taken") return "That username is taken. Please choose another one.";
  return error.message;
}

async function onLogin(event) {
  event.preventDefault();
  const username = $("login-username").value.trim();
  const password = $("login-password").value;
  if (!username || !password) {
    showMessage("login-message", "Enter your username and password.");
    return;
  }
  await withBusy($("login-submit"), async () => {
    try {
      const { user } = await api("POST", "/api/auth/login", { username, password });
      $("login-password").value = "";
      showMessage("login-message", "");
      await enterApp(user);
    } catch (error) {
      showMessage("login-message", authErrorText(error));
    }
  });
}

async function onRegister(event) {
  event.preventDefault();
  const username = $("register-username").value.trim();
  const password = $("register-password").value;
  if (!/^[A-Za-z0-9_.-]{3,32}$/.test(username)) {
    showMessage("register-message", "Usernames have 3–32 letters, digits, _ . or -.");
    return;
  }
  if (password.length < 8) {
    showMessage("register-message", "The password needs at least 8 characters.");
    return;
  }
  if (password !== $("register-password2").value) {
    showMessage("register-message", "The two passwords differ.");
    return;
  }
  await withBusy($("register-submit"), async () => {
    try {
      await api("POST", "/api/auth/register", { username, password });
      $("register-form").reset();
      selectTab("login");
      $("login-username").value = username;
      $("login-password").focus();
      showMessage("login-message", "Account created. Log in to start chatting.", "success");
    } catch (error) {
      showMessage("register-message", authErrorText(error));
    }
  });
}

// ---------------------------------------------------------------- logged in

async function enterApp(user) {
  state.user = user;
  $("boot").hidden = true;
  $("auth").hidden = true;
  $("app").hidden = false;
  $("account-name").textContent = user.username;
  await loadChats();
  await route();
  $("prompt").focus();
}

async function loadChats() {
  try {
    const { chats } = await api("GET", "/api/chats");
    state.chats = chats;
  } catch (error) {
    apiFailed(error);
  }
  renderChatList();
}

function renderChatList() {
  const current = state.chat && state.chat.id;
  $("chat-list").replaceChildren(...state.chats.map((chat) => chatItem(chat, chat.id === current)));
  $("chat-list-empty").hidden = state.chats.length > 0;
}

function chatItem(chat, active) {
  const item = h("li", { class: `chat-item${active ? " active" : ""}`, dataset: { id: chat.id } });
  const link = h(
    "a",
    { class: "chat-link", href: `/c/${encodeURIComponent(chat.id)}`, title: chat.title },
    h("span", { class: "chat-link-title", text: chat.title || "New chat" }),
    h("span", { class: "chat-link-time", text: ago(chat.updated_at) }),
  );
  if (active) link.setAttribute("aria-current", "page");
  link.addEventListener("click", (event) => {
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    closeSidebar();
    if (!(state.chat && state.chat.id === chat.id)) openChat(chat.id, { push: true });
  });
  const actions = h(
    "div",
    { class: "chat-item-actions" },
    iconButton("pencil", "Rename chat", () => startRename(item, chat), "icon-small rename-chat"),
    iconButton("trash", "Delete chat", () => deleteChat(chat), "icon-small delete-chat"),
  );
  item.append(link, actions);
  return item;
}

/** Replace `anchor` with a text field; Enter or leaving it saves, Escape cancels. */
function editTitle(anchor, chat, className) {
  const input = h("input", { class: className, maxlength: 200, "aria-label": "Chat title" });
  input.value = chat.title;
  anchor.replaceWith(input);
  input.focus();
  input.select();
  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    const title = input.value.trim();
    input.replaceWith(anchor);
    if (save && title && title !== chat.title) await renameChat(chat, title);
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function startRename(item, chat) {
  editTitle(item.querySelector(".chat-link"), chat, "rename-input");
}

async function renameChat(chat, title) {
  try {
    const { chat: renamed } = await api("PATCH", `/api/chats/${encodeURIComponent(chat.id)}`, { title });
    updateChat(renamed);
    toast("Chat renamed");
  } catch (error) {
    apiFailed(error);
  }
}

/** A chat changed (renamed, new title, new message): update the list and the header. */
function updateChat(chat) {
  const index = state.chats.findIndex((c) => c.id === chat.id);
  if (index >= 0) state.chats[index] = chat;
  else state.chats.unshift(chat);
  state.chats.sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at));
  if (state.chat && state.chat.id === chat.id) {
    state.chat = chat;
    setTitle(chat.title);
  }
  renderChatList();
}

async function deleteChat(chat) {
  const sure = await confirmDialog({
    title: "Delete this chat?",
    body: `“${chat.title}” and all its messages will be deleted.`,
  });
  if (!sure) return;
  try {
    await api("DELETE", `/api/chats/${encodeURIComponent(chat.id)}`);
  } catch (error) {
    if (error.status !== 404) {
      apiFailed(error);
      return;
    }
  }
  state.chats = state.chats.filter((c) => c.id !== chat.id);
  if (state.chat && state.chat.id === chat.id) showNewChat({ push: true });
  else renderChatList();
  toast("Chat deleted");
}

function setTitle(title) {
  $("chat-title").textContent = title;
  document.title = `${title} · llmtree`;
}

// ---------------------------------------------------------------- routing and views

function chatIdFromPath() {
  const match = /^\/c\/([A-Za-z0-9_-]{1,64})\/?$/.exec(location.pathname);
  return match ? match[1] : null;
}

async function route() {
  const id = chatIdFromPath();
  if (id) await openChat(id, { push: false });
  else showNewChat({ push: false });
}

function setView(view) {
  $("welcome").hidden = view !== "new";
  $("not-found").hidden = view !== "not-found";
  $("messages").hidden = view !== "chat";
  const hasChat = view === "chat";
  $("rename-chat").hidden = !hasChat;
  $("delete-chat").hidden = !hasChat;
}

function showNewChat({ push }) {
  closeSocket();
  state.chat = null;
  state.messages = [];
  if (push && location.pathname !== "/") history.pushState({}, "", "/");
  $("messages").replaceChildren();
  setTitle("New chat");
  setView("new");
  hideNotice();
  renderChatList();
  $("prompt").focus();
}

function showNotFound() {
  closeSocket();
  state.chat = null;
  state.messages = [];
  $("messages").replaceChildren();
  setTitle("Chat not found");
  setView("not-found");
  renderChatList();
}

async function openChat(id, { push }) {
  closeSocket();
  hideNotice();
  if (push) history.pushState({}, "", `/c/${encodeURIComponent(id)}`);
  let data;
  try {
    data = await api("GET", `/api/chats/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error.status === 404) showNotFound();
    else apiFailed(error);
    return;
  }
  state.chat = data.chat;
  state.messages = data.messages;
  setTitle(data.chat.title);
  setView("chat");
  renderMessages();
  renderChatList();
  scrollToBottom(true);
}

// ---------------------------------------------------------------- messages

function renderMessages() {
  $("messages").replaceChildren(...state.messages.map((m) => messageEl(m)));
  refreshActions();
}

function messageEl(message, { live = false } = {}) {
  const assistant = message.role === "assistant";
  const el = h(
    "article",
    { class: `msg msg-${message.role}`, dataset: { role: message.role } },
    assistant ? h("div", { class: "msg-avatar" }, h("img", { src: "/static/icons/icon.svg", alt: "" })) : null,
    h(
      "div",
      { class: "msg-body" },
      h("div", { class: assistant ? "msg-content markdown" : "msg-content" }),
      h("div", { class: "msg-status" }),
      h("div", { class: "msg-actions" }),
    ),
  );
  fillMessage(el, message, { final: !live, live });
  return el;
}

function fillMessage(el, message, { final = true, live = false } = {}) {
  el.dataset.status = live ? "streaming" : message.status;
  if (message.id !== null && message.id !== undefined) el.dataset.id = String(message.id);
  el.classList.toggle("streaming", live);
  const content = el.querySelector(".msg-content");
  if (message.role === "assistant") renderMarkdown(content, message.content, { final });
  else content.textContent = message.content;
  content.classList.toggle("is-empty", !message.content);
  const status = el.querySelector(".msg-status");
  status.replaceChildren();
  if (!live && message.status === "interrupted") {
    status.append(h("span", { class: "chip" }, icon("stop"), "Stopped"));
  } else if (!live && message.status === "failed") {
    status.append(h("span", { class: "chip chip-error" }, icon("alert"), message.error || "The answer failed."));
  } else if (!live && message.status === "streaming") {
    status.append(h("span", { class: "chip" }, "Being written elsewhere; reload to see more"));
  }
  el._message = message;
}

/** Copy on every message; regenerate on the last answer while nothing is being written. */
function refreshActions() {
  const els = [...$("messages").querySelectorAll(".msg")];
  const lastAssistant = els.filter((el) => el.dataset.role === "assistant").pop();
  const lastIsAssistant = els.length > 0 && els[els.length - 1] === lastAssistant;
  for (const el of els) {
    const actions = el.querySelector(".msg-actions");
    actions.replaceChildren();
    if (el.classList.contains("streaming")) continue;
    const message = el._message;
    if (message && message.content) {
      const copy = iconButton("copy", "Copy", async () => {
        const ok = await copyText(el._message.content);
        copy.replaceChildren(icon(ok ? "check" : "x"));
        setTimeout(() => copy.replaceChildren(icon("copy")), 1500);
      }, "icon-small copy-message");
      actions.append(copy);
    }
    if (el === lastAssistant && lastIsAssistant && !state.generation) {
      actions.append(iconButton("refresh", "Regenerate", () => regenerate(), "icon-small regenerate"));
    }
  }
}

function nearBottom() {
  const s = $("scroller");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function scrollToBottom(force = false) {
  const s = $("scroller");
  if (force || nearBottom()) s.scrollTop = s.scrollHeight;
  $("to-bottom").hidden = nearBottom();
}

// ---------------------------------------------------------------- the chat socket

function socketUrl(id) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/api/chats/${encodeURIComponent(id)}/ws`;
}

function connect(id) {
  const open = state.socket && state.socket.readyState <= WebSocket.OPEN;
  if (open && state.socketChatId === id) return state.socketReady;
  dropSocket();
  const ws = new WebSocket(socketUrl(id));
  state.socket = ws;
  state.socketChatId = id;
  state.socketReady = new Promise((resolve, reject) => {
    ws.addEventListener("open", () => resolve(ws), { once: true });
    ws.addEventListener("close", () => reject(new Error("closed")), { once: true });
  });
  state.socketReady.catch(() => {});
  ws.addEventListener("message", (event) => {
    if (state.socket !== ws) return;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    onEvent(data);
  });
  ws.addEventListener("close", () => {
    if (state.socket !== ws) return;
    state.socket = null;
    state.socketChatId = null;
    if (state.generation) lostConnection();
  });
  return state.socketReady;
}

function dropSocket() {
  const ws = state.socket;
  state.socket = null;
  state.socketChatId = null;
  if (ws) ws.close(1000, "leaving the chat");
}

/** Leave the open chat's socket; an answer still being written there is stopped by the server. */
function closeSocket() {
  dropSocket();
  if (state.generation) endGeneration();
}

function withTemperature(command) {
  const value = localStorage.getItem(TEMPERATURE_KEY);
  if (value !== null && value !== "" && !Number.isNaN(Number(value))) command.temperature = Number(value);
  return command;
}

async function sendPrompt(text) {
  const content = text.trim();
  if (!content || state.generation) return;
  hideNotice();
  if (!state.chat) {
    let chat;
    try {
      ({ chat } = await api("POST", "/api/chats", {}));
    } catch (error) {
      apiFailed(error);
      return;
    }
    state.chat = chat;
    state.messages = [];
    history.pushState({}, "", `/c/${encodeURIComponent(chat.id)}`);
    $("messages").replaceChildren();
    setTitle(chat.title || "New chat");
    setView("chat");
    updateChat(chat);
  }
  $("prompt").value = "";
  growPrompt();
  const userEl = messageEl({ role: "user", content, status: "complete", id: null });
  $("messages").append(userEl);
  beginGeneration({ userEl, kind: "send" });
  await command(withTemperature({ type: "send", content }));
}

async function regenerate() {
  if (state.generation || !state.chat) return;
  hideNotice();
  const last = [...$("messages").querySelectorAll(".msg")].pop();
  if (last && last.dataset.role === "assistant") {
    state.messages = state.messages.filter((m) => m !== last._message);
    last.remove();
  }
  beginGeneration({ userEl: null, kind: "regenerate" });
  await command(withTemperature({ type: "regenerate" }));
}

async function command(payload) {
  const chatId = state.chat.id;
  if (state.generation) state.generation.payload = payload;
  try {
    const ws = await connect(chatId);
    ws.send(JSON.stringify(payload));
  } catch {
    if (state.generation) failGeneration({ code: "network", message: ERROR_TEXT.network });
    // Maybe the session ended; find out so the login screen shows if so.
    api("GET", "/api/me").catch(apiFailed);
  }
}

function beginGeneration({ userEl, kind }) {
  const el = messageEl({ role: "assistant", content: "", status: "streaming", id: null }, { live: true });
  $("messages").append(el);
  state.generation = { userEl, el, message: null, content: "", kind, stopTimer: null, retries: 0 };
  setGenerating(true);
  refreshActions();
  scrollToBottom(true);
}

function setGenerating(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("stop").disabled = false;
  $("stop").classList.remove("is-busy");
  updateSendButton();
}

function onEvent(event) {
  const g = state.generation;
  switch (event.type) {
    case "start":
      if (!g) return;
      if (event.user_message) {
        state.messages.push(event.user_message);
        if (g.userEl) fillMessage(g.userEl, event.user_message);
      }
      g.message = event.assistant_message;
      state.messages.push(g.message);
      g.el.dataset.id = String(g.message.id);
      break;
    case "delta":
      if (!g) return;
      g.content += event.text;
      scheduleRender();
      break;
    case "done":
      if (!g) return;
      finishGeneration(event.message);
      break;
    case "error":
      if (g && event.code === "busy" && !g.message && g.retries < BUSY_RETRIES) {
        // The socket's previous turn is still finishing (e.g. writing the chat's title):
        // nothing was stored for this one, so send it again in a moment.
        g.retries += 1;
        g.retryTimer = setTimeout(() => state.generation === g && command(g.payload), 500);
      } else if (g) failGeneration(event);
      else showNotice(event.code, event.message);
      break;
    case "title":
      if (event.chat) updateChat(event.chat);
      break;
    default:
      break;
  }
}

function scheduleRender() {
  if (state.renderTimer) return;
  state.renderTimer = setTimeout(() => {
    state.renderTimer = null;
    const g = state.generation;
    if (!g) return;
    const stick = nearBottom();
    fillMessage(g.el, { role: "assistant", content: g.content, status: "streaming", id: g.el.dataset.id || null }, { final: false, live: true });
    if (stick) scrollToBottom(true);
  }, 30);
}

function replaceMessage(message) {
  const index = state.messages.findIndex((m) => m.id === message.id);
  if (index >= 0) state.messages[index] = message;
  else state.messages.push(message);
}

function finishGeneration(message) {
  const g = state.generation;
  replaceMessage(message);
  const stick = nearBottom();
  fillMessage(g.el, message);
  endGeneration();
  if (stick) scrollToBottom(true);
  if (state.chat) updateChat({ ...state.chat, updated_at: message.created_at || state.chat.updated_at });
}

function failGeneration(event) {
  const g = state.generation;
  const message = event.message_obj;
  if (message) {
    replaceMessage(message);
    fillMessage(g.el, message);
  } else if (g.content) {
    fillMessage(g.el, { role: "assistant", content: g.content, status: "failed", id: null, error: "Not finished" });
  } else {
    g.el.remove();
  }
  const started = Boolean(g.message);
  endGeneration();
  showNotice(event.code, event.message);
  // Without a start event we do not know what the server stored: ask it.
  if (!started && state.chat) resync();
}

function lostConnection() {
  const g = state.generation;
  if (g && g.content) {
    fillMessage(g.el, { role: "assistant", content: g.content, status: "interrupted", id: null });
  } else if (g) {
    g.el.remove();
  }
  endGeneration();
  showNotice("network", ERROR_TEXT.network);
  setTimeout(resync, 800);
}

function endGeneration() {
  const g = state.generation;
  if (g && g.stopTimer) clearTimeout(g.stopTimer);
  if (g && g.retryTimer) clearTimeout(g.retryTimer);
  if (g) g.el.classList.remove("streaming");
  state.generation = null;
  setGenerating(false);
  refreshActions();
}

async function resync() {
  if (!state.chat || state.generation) return;
  const id = state.chat.id;
  try {
    const data = await api("GET", `/api/chats/${encodeURIComponent(id)}`);
    if (!state.chat || state.chat.id !== id || state.generation) return;
    state.messages = data.messages;
    renderMessages();
  } catch (error) {
    if (error.status === 401) apiFailed(error);
  }
}

function stopGeneration() {
  const g = state.generation;
  if (!g) return;
  if (!g.message && g.retries > 0) {
    // still waiting to be accepted: nothing was stored, so take the question back
    g.el.remove();
    if (g.userEl) g.userEl.remove();
    if (g.payload && g.payload.content) $("prompt").value = g.payload.content;
    endGeneration();
    growPrompt();
    return;
  }
  $("stop").disabled = true;
  $("stop").classList.add("is-busy");
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ type: "stop" }));
  }
  // If the server does not confirm soon, drop the socket: a closed socket stops the answer too.
  g.stopTimer = setTimeout(() => {
    if (state.generation !== g) return;
    dropSocket();
    fillMessage(g.el, { role: "assistant", content: g.content, status: "interrupted", id: null });
    endGeneration();
    setTimeout(resync, 500);
  }, 8000);
}

// ---------------------------------------------------------------- the notice above the composer

function showNotice(code, serverText) {
  const text = ERROR_TEXT[code] || serverText || ERROR_TEXT.failed;
  $("notice-text").textContent = text;
  $("notice").dataset.code = code || "failed";
  $("notice").className = `notice ${code === "overloaded" || code === "queue_timeout" ? "notice-busy" : "notice-error"}`;
  $("notice-retry").hidden = !RETRYABLE.has(code) || !state.chat;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

// ---------------------------------------------------------------- composer

function growPrompt() {
  const prompt = $("prompt");
  prompt.style.height = "auto";
  prompt.style.height = `${Math.min(prompt.scrollHeight, 220)}px`;
  updateSendButton();
}

function updateSendButton() {
  $("send").disabled = !$("prompt").value.trim() || Boolean(state.generation);
}

// ---------------------------------------------------------------- sidebar (a drawer on phones)

function openSidebar() {
  $("sidebar").classList.add("open");
  $("scrim").hidden = false;
}

function closeSidebar() {
  $("sidebar").classList.remove("open");
  $("scrim").hidden = true;
}

// ---------------------------------------------------------------- API keys

async function openKeys() {
  closeSidebar();
  $("api-base").textContent = `${location.origin}/v1`;
  $("key-secret").hidden = true;
  showMessage("keys-message", "");
  $("keys-dialog").showModal();
  await loadKeys();
}

async function loadKeys() {
  let keys = [];
  try {
    ({ keys } = await api("GET", "/api/keys"));
  } catch (error) {
    apiFailed(error);
    return;
  }
  $("key-list").replaceChildren(...keys.map(keyItem));
  $("key-list-empty").hidden = keys.length > 0;
}

function keyItem(key) {
  const revoke = h("button", { class: "button button-small button-outline revoke-key", type: "button" }, "Revoke");
  revoke.addEventListener("click", async () => {
    const sure = await confirmDialog({
      title: "Revoke this key?",
      body: `Programs that use “${key.name}” (${key.prefix}…) will stop working at once.`,
      ok: "Revoke",
    });
    if (!sure) return;
    try {
      await api("DELETE", `/api/keys/${encodeURIComponent(key.id)}`);
      toast("Key revoked");
    } catch (error) {
      if (error.status !== 404) apiFailed(error);
    }
    await loadKeys();
  });
  const used = key.last_used_at ? `used ${ago(key.last_used_at)}` : "never used";
  return h(
    "li",
    { class: "key-item", dataset: { id: key.id } },
    h(
      "div",
      { class: "key-info" },
      h("strong", { class: "key-name", text: key.name }),
      h("code", { class: "key-prefix", text: `${key.prefix}…` }),
      h("small", { class: "muted", text: `created ${formatDate(key.created_at)} · ${used}` }),
    ),
    revoke,
  );
}

async function onCreateKey(event) {
  event.preventDefault();
  const name = $("key-name").value.trim();
  if (!name) {
    showMessage("keys-message", "Give the key a name, e.g. where you will use it.");
    return;
  }
  const button = event.submitter || $("key-form").querySelector("button");
  await withBusy(button, async () => {
    try {
      const { secret } = await api("POST", "/api/keys", { name });
      $("key-name").value = "";
      showMessage("keys-message", "");
      $("key-secret-value").textContent = secret;
      $("key-secret").hidden = false;
      await loadKeys();
    } catch (error) {
      if (error.status === 401) apiFailed(error);
      else showMessage("keys-message", error.message);
    }
  });
}

// ---------------------------------------------------------------- account

function openAccount() {
  closeSidebar();
  const user = state.user;
  $("account-username").textContent = user.username;
  $("password-username").value = user.username;
  $("account-letter").textContent = user.username.slice(0, 1).toUpperCase();
  $("account-since").textContent = `Member since ${formatDate(user.created_at)}`;
  $("temperature").value = localStorage.getItem(TEMPERATURE_KEY) ?? "";
  $("temperature").placeholder = "default";
  for (const id of ["password-message", "delete-account-message"]) showMessage(id, "");
  $("account-dialog").showModal();
}

async function onChangePassword(event) {
  event.preventDefault();
  const current = $("current-password").value;
  const next = $("new-password").value;
  if (next.length < 8) {
    showMessage("password-message", "The new password needs at least 8 characters.");
    return;
  }
  const button = event.submitter || $("password-form").querySelector("button");
  await withBusy(button, async () => {
    try {
      await api("POST", "/api/me/password", { current_password: current, new_password: next });
    } catch (error) {
      const text = error.code === "invalid_credentials" ? "The current password is wrong." : error.message;
      showMessage("password-message", text);
      return;
    }
    $("password-form").reset();
    try {
      await api("GET", "/api/me");
      showMessage("password-message", "Password changed. Other sessions were logged out.", "success");
    } catch {
      showAuth("Password changed. Log in with your new password.", "success");
    }
  });
}

async function onLogout() {
  try {
    await api("POST", "/api/auth/logout");
  } catch {
    // logged out either way: the cookies are the server's to clear
  }
  showAuth("You have been logged out.");
}

async function onDeleteAccount(event) {
  event.preventDefault();
  const password = $("delete-password").value;
  if (!password) {
    showMessage("delete-account-message", "Enter your password to confirm.");
    return;
  }
  const sure = await confirmDialog({
    title: "Delete your account?",
    body: "Your account, all your chats and all your API keys will be deleted for good.",
    ok: "Delete account",
  });
  if (!sure) return;
  try {
    await api("DELETE", "/api/me", { password });
  } catch (error) {
    const text = error.code === "invalid_credentials" ? "That password is wrong." : error.message;
    showMessage("delete-account-message", text);
    return;
  }
  $("delete-password").value = "";
  showAuth("Your account and all its data have been deleted.", "success");
}

// ---------------------------------------------------------------- start

async function describeModel() {
  try {
    const { nodes } = await api("GET", "/api/nodes");
    const serving = nodes.filter((n) => n.model);
    if (serving.length) {
      const plural = serving.length === 1 ? "node" : "nodes";
      $("model-line").textContent = `Answers come from ${serving[0].model}, running on ${serving.length} ${plural} of a tree.`;
    }
  } catch {
    // the static line stays
  }
}

function wire() {
  drawIcons();
  $("tab-login").addEventListener("click", () => selectTab("login"));
  $("tab-register").addEventListener("click", () => selectTab("register"));
  $("login-form").addEventListener("submit", onLogin);
  $("register-form").addEventListener("submit", onRegister);

  $("new-chat").addEventListener("click", () => {
    closeSidebar();
    showNewChat({ push: true });
  });
  $("new-chat-top").addEventListener("click", () => showNewChat({ push: true }));
  $("not-found-new").addEventListener("click", () => showNewChat({ push: true }));
  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("rename-chat").addEventListener("click", () => {
    if (state.chat) editTitle($("chat-title"), state.chat, "rename-input rename-input-title");
  });
  $("delete-chat").addEventListener("click", () => state.chat && deleteChat(state.chat));

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendPrompt($("prompt").value);
  });
  $("prompt").addEventListener("input", growPrompt);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendPrompt($("prompt").value);
    }
  });
  $("stop").addEventListener("click", stopGeneration);
  $("notice-close").addEventListener("click", hideNotice);
  $("notice-retry").addEventListener("click", () => {
    hideNotice();
    regenerate();
  });
  $("scroller").addEventListener("scroll", () => ($("to-bottom").hidden = nearBottom()), { passive: true });
  $("to-bottom").addEventListener("click", () => scrollToBottom(true));
  $("suggestions").replaceChildren(
    ...SUGGESTIONS.map((text) =>
      h("button", { class: "suggestion", type: "button", onclick: () => sendPrompt(text) }, text),
    ),
  );

  $("open-keys").addEventListener("click", openKeys);
  $("key-form").addEventListener("submit", onCreateKey);
  $("key-secret-copy").addEventListener("click", async () => {
    const ok = await copyText($("key-secret-value").textContent);
    toast(ok ? "Key copied" : "Copy failed: select the key and copy it by hand", ok ? "info" : "error");
  });
  $("open-account").addEventListener("click", openAccount);
  $("temperature").addEventListener("change", () => {
    const value = $("temperature").value.trim();
    if (value === "") localStorage.removeItem(TEMPERATURE_KEY);
    else localStorage.setItem(TEMPERATURE_KEY, String(Math.min(2, Math.max(0, Number(value)))));
  });
  $("password-form").addEventListener("submit", onChangePassword);
  $("logout").addEventListener("click", onLogout);
  $("delete-account-form").addEventListener("submit", onDeleteAccount);

  for (const dialog of document.querySelectorAll("dialog")) {
    for (const close of dialog.querySelectorAll("[data-close]")) {
      close.addEventListener("click", () => dialog.close());
    }
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
  }
  window.addEventListener("popstate", () => {
    if (state.user) route();
  });
}

async function boot() {
  wire();
  describeModel();
  let user = null;
  try {
    ({ user } = await api("GET", "/api/me"));
  } catch (error) {
    if (error.status !== 401) showMessage("login-message", error.message);
  }
  if (user) await enterApp(user);
  else showAuth($("login-message").textContent);
}

boot();
