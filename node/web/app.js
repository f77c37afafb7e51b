// ChatCluster web chat: the page around the client library (chatcluster.js, built from
// clients/js), which speaks protocol v1: reconnects, resume, dedupe, retries.
import { ChatClient } from "./chatcluster.js";

const HISTORY_LIMIT = 50;

const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"),
  joinForm: $("join-form"),
  name: $("name"),
  room: $("room"),
  roomTitle: $("room-title"),
  messages: $("messages"),
  sendForm: $("send-form"),
  message: $("message"),
  send: $("send"),
  presence: $("presence"),
  presenceCount: $("presence-count"),
};

const params = new URLSearchParams(location.search);
const token = params.get("token");

const state = {
  client: null,
  clientName: null, // the name the client connects with (anonymous mode)
  me: null, // welcome.user
  room: null, // the room shown and joined
  joined: false,
  seen: new Set(), // "epoch/offset" of the messages shown: history and live ones overlap
};

// ---------- rendering ----------

function setStatus(kind, text) {
  el.status.dataset.state = kind;
  el.status.textContent = text;
}

function setJoined(joined) {
  state.joined = joined;
  el.message.disabled = !joined;
  el.send.disabled = !joined;
  document.body.dataset.joined = joined ? "true" : "false";
}

function formatTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function notice(text, kind) {
  const li = document.createElement("li");
  li.className = "notice" + (kind ? " " + kind : "");
  li.dataset.testid = "notice";
  li.setAttribute("role", kind === "error" ? "alert" : "note");
  li.textContent = text;
  appendScrolled(li);
}

function appendScrolled(node, before) {
  const list = el.messages;
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.insertBefore(node, before || null);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// Shows a message once per (epoch, offset), in offset order within its epoch.
function showMessage(m) {
  if (m.room !== state.room) return;
  const key = m.epoch + "/" + m.offset;
  if (state.seen.has(key)) return;
  state.seen.add(key);

  const li = document.createElement("li");
  li.className = "message";
  if (state.me && m.sender.id === state.me.id) li.classList.add("mine");
  li.dataset.testid = "message";
  li.dataset.epoch = m.epoch;
  li.dataset.offset = String(m.offset);

  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("span");
  who.className = "sender";
  who.textContent = m.sender.name || "?";
  const when = document.createElement("time");
  when.className = "time";
  when.dateTime = new Date(m.ts).toISOString();
  when.textContent = formatTime(m.ts);
  meta.append(who, when);

  const body = document.createElement("p");
  body.className = "body";
  body.textContent = m.body;
  li.append(meta, body);

  // Older messages (history after live ones) go before the first later one of the same epoch.
  let before = null;
  for (const other of el.messages.querySelectorAll("li.message")) {
    if (other.dataset.epoch === m.epoch && Number(other.dataset.offset) > m.offset) {
      before = other;
      break;
    }
  }
  appendScrolled(li, before);
}

function clearPresence() {
  el.presence.replaceChildren();
  updatePresenceCount();
}

// Presence comes in pages (the server's, in name order); the list restarts with the first one.
async function showPresence(client, room) {
  let first = true;
  for await (const page of client.presencePages(room)) {
    if (client !== state.client || room !== state.room) return;
    if (first) clearPresence();
    first = false;
    for (const u of page.users) addPresence(u);
  }
}

function addPresence(u) {
  if (el.presence.querySelector(`li[data-user-id="${CSS.escape(u.id)}"]`)) return;
  const li = document.createElement("li");
  li.dataset.userId = u.id;
  li.dataset.testid = "presence-user";
  li.textContent = u.name;
  if (state.me && u.id === state.me.id) {
    li.classList.add("me");
    const you = document.createElement("span");
    you.className = "you";
    you.textContent = " (you)";
    li.append(you);
  }
  el.presence.append(li);
  updatePresenceCount();
}

function removePresence(u) {
  const li = el.presence.querySelector(`li[data-user-id="${CSS.escape(u.id)}"]`);
  if (li) li.remove();
  updatePresenceCount();
}

function updatePresenceCount() {
  el.presenceCount.textContent = String(el.presence.children.length);
}

function errorText(err) {
  switch (err.code) {
    case "rate_limited": return "Slow down: that message was not sent.";
    case "forbidden": return "Not allowed: " + err.message;
    case "invalid_room": return "Invalid room name: " + err.message;
    default: return `Error (${err.code}): ${err.message}`;
  }
}

function showError(err) {
  notice(errorText(err), "error");
}

// ---------- the client ----------

function wsUrl(name) {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  if (!token) url.searchParams.set("name", name);
  return url.toString();
}

function closeReason(code, reason) {
  if (code === 4500) return "your token expired; reload the page with a new token";
  if (code === 4501) return "the server refused the data sent";
  return reason || "closed by the server";
}

// A new client (a new name in anonymous mode is a new user): events re-render the page.
function startClient(name) {
  const old = state.client;
  state.client = null; // its last events are not this page's any more
  if (old) old.close();
  const client = new ChatClient({ url: wsUrl(name), getToken: token ? () => token : undefined });
  state.client = client;
  state.clientName = name;
  const current = (listener) => (event) => {
    if (state.client === client) listener(event);
  };

  client.on("connected", current((w) => {
    state.me = w.user;
    el.status.dataset.session = w.session_id;
    el.status.dataset.node = w.node_id;
    if (token) el.name.value = w.user.name;
    setStatus("online", `Connected as ${w.user.name} (node ${w.node_id})`);
  }));
  client.on("disconnected", current(({ code, reason, willReconnect }) => {
    setJoined(false);
    clearPresence();
    if (willReconnect) return; // the `reconnecting` event follows
    const why = closeReason(code, reason);
    setStatus("offline", "Disconnected: " + why);
    notice("Disconnected: " + why + ".", "error");
  }));
  client.on("reconnecting", current(({ attempt, delayMs, moving, reason }) => {
    // The server moving the connection (a drain, or `rebalance` after a scale-out) is planned:
    // the session resumes on the next node, so it is not shown as a lost connection.
    if (moving) return setStatus("reconnecting", reason === "rebalance" ? "Moving to a less busy node…" : "Moving to another node…");
    const secs = Math.max(1, Math.round(delayMs / 1000));
    setStatus("reconnecting", `Connection lost; reconnecting in ${secs}s (attempt ${attempt})…`);
  }));
  client.on("joined", current((j) => {
    if (j.room !== state.room) return;
    setJoined(true);
    el.roomTitle.textContent = "#" + j.room;
    if (!j.rejoined) {
      client.history(j.room, { limit: HISTORY_LIMIT }).then((page) => page.messages.forEach(showMessage), current(showError));
    } else if (!j.recovered) {
      notice("Reconnected, but some messages may be missing.", "warning");
    }
    showPresence(client, j.room).catch(current(showError));
  }));
  client.on("message", current(showMessage));
  client.on("user_joined", current((e) => {
    if (e.room === state.room) addPresence(e.user);
  }));
  client.on("user_left", current((e) => {
    if (e.room === state.room) removePresence(e.user);
  }));
  client.on("error", current(showError));

  setStatus("connecting", "Connecting…");
  client.connect().catch(() => {}); // a client that stops says so in its `disconnected` event
  return client;
}

function joinRoom(client, room) {
  client.join(room).catch((err) => {
    if (state.client !== client || state.room !== room) return;
    showError(err);
    el.roomTitle.textContent = "Could not join #" + room;
  });
}

// ---------- user actions ----------

el.joinForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = el.name.value.trim();
  const room = el.room.value.trim();
  if ((!token && !name) || !room) return;
  try { localStorage.setItem("chatcluster.name", name); } catch (_) { /* private mode */ }

  const previous = state.room;
  if (previous !== room) {
    state.room = room;
    state.seen.clear();
    el.messages.replaceChildren();
    clearPresence();
    el.roomTitle.textContent = "#" + room;
  }
  const reuse = state.client && state.client.state !== "closed" && (token || name === state.clientName);
  if (!reuse) {
    joinRoom(startClient(name), room);
  } else if (previous !== room) {
    setJoined(false);
    if (previous) state.client.leave(previous).catch(showError);
    joinRoom(state.client, room);
  } else if (!state.joined) {
    // The same room, not joined: retry a refused join now, or skip a reconnect's backoff.
    if (state.client.state === "connected") joinRoom(state.client, room);
    else state.client.connect().catch(() => {});
  }
});

el.sendForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const body = el.message.value;
  if (!body.trim() || !state.room) return;
  // The client retries it (same key) until acked; a refusal shows as a notice.
  state.client.publish(state.room, body).catch(showError);
  el.message.value = "";
  el.message.focus();
});

// Back online: skip the rest of the backoff.
window.addEventListener("online", () => {
  if (state.client && state.client.state === "reconnecting") state.client.connect().catch(() => {});
});

// ---------- start ----------

if (token) {
  el.name.value = "";
  el.name.placeholder = "from your token";
  el.name.disabled = true;
  el.name.required = false;
} else {
  let saved = null;
  try { saved = localStorage.getItem("chatcluster.name"); } catch (_) { /* private mode */ }
  el.name.value = params.get("name") || saved || "guest-" + Math.floor(Math.random() * 10000);
}
if (params.get("room")) el.room.value = params.get("room");
if (token || params.has("name")) el.joinForm.requestSubmit();
