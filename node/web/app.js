// ChatCluster web client: protocol v1 (docs/protocol.md) over one WebSocket, no build step.
"use strict";

(function () {
  const SUBPROTOCOL = "chatcluster.v1.json";
  const HISTORY_LIMIT = 50;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    joinForm: $("join-form"),
    name: $("name"),
    room: $("room"),
    join: $("join"),
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
    ws: null,
    wanted: false, // the user asked to be connected: reconnect after a recoverable close
    attempt: 0, // reconnect attempts since the last welcome
    timer: null,
    me: null, // welcome.user
    connName: null, // the name the current connection was opened with (anonymous mode)
    room: null, // the room shown and joined
    joined: false,
    positions: new Map(), // room -> {epoch, offset}: the last message seen, for resume
    seen: new Set(), // "epoch/offset" of the messages shown in the current room
    pendingJoin: null, // {id, room, resumed}: the join awaiting its answer
    fresh: true, // the room's message list was (re)started: fetch its history on join
    nextId: 1,
    heartbeat: null, // interval that pings the server and notices a dead link
    lastFrameAt: 0,
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
    const d = new Date(ts);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
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
    remember(m.room, m.epoch, m.offset);
    const key = m.epoch + "/" + m.offset;
    if (state.seen.has(key)) return;
    state.seen.add(key);

    const li = document.createElement("li");
    li.className = "message";
    if (state.me && m.sender && m.sender.id === state.me.id) li.classList.add("mine");
    li.dataset.testid = "message";
    li.dataset.epoch = m.epoch;
    li.dataset.offset = String(m.offset);

    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "sender";
    who.textContent = (m.sender && m.sender.name) || "?";
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

  // Presence comes in pages (the server's, in name order): the request ids of the pages asked
  // for, with the offset each starts at.
  const presencePages = new Map();

  function askPresence(room, offset) {
    const id = newId("presence");
    presencePages.set(id, offset);
    send(offset ? { type: "presence", id, room, offset } : { type: "presence", id, room });
  }

  function renderPresencePage(f) {
    const offset = presencePages.get(f.id) ?? 0;
    presencePages.delete(f.id);
    if (f.room !== state.room) return;
    if (offset === 0) el.presence.replaceChildren();
    for (const u of f.users) addPresence(u);
    if (f.next != null) askPresence(f.room, f.next);
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

  // ---------- stream positions ----------

  function remember(room, epoch, offset) {
    const pos = state.positions.get(room);
    if (!pos || pos.epoch !== epoch) {
      state.positions.set(room, { epoch, offset });
    } else if (offset > pos.offset) {
      pos.offset = offset;
    }
  }

  // ---------- connection ----------

  function wsUrl() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    if (token) {
      url.searchParams.set("token", token);
    } else {
      url.searchParams.set("name", el.name.value.trim());
    }
    return url.toString();
  }

  function send(frame) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function newId(prefix) {
    return prefix + "-" + state.nextId++;
  }

  function connect() {
    clearTimeout(state.timer);
    state.timer = null;
    stopHeartbeat();
    if (state.ws) {
      const old = state.ws;
      state.ws = null;
      old.onopen = old.onmessage = old.onclose = old.onerror = null;
      try { old.close(1000); } catch (_) { /* already closed */ }
    }
    state.wanted = true;
    state.connName = el.name.value.trim();
    setJoined(false);
    setStatus(state.attempt ? "reconnecting" : "connecting", state.attempt ? "Reconnecting…" : "Connecting…");

    let ws;
    try {
      ws = new WebSocket(wsUrl(), [SUBPROTOCOL]);
    } catch (err) {
      setStatus("offline", "Cannot connect: " + err.message);
      return;
    }
    state.ws = ws;
    ws.onmessage = (ev) => {
      state.lastFrameAt = Date.now();
      if (typeof ev.data !== "string") return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch (_) { return; }
      handle(frame);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      onClosed(ev.code, ev.reason);
    };
  }

  // Browsers answer the server's pings but never show them to scripts, so the page pings too:
  // with no frame at all for two intervals the link is taken as dead and replaced.
  function startHeartbeat(intervalSecs) {
    stopHeartbeat();
    const ms = Math.max(5, intervalSecs || 25) * 1000;
    state.lastFrameAt = Date.now();
    state.heartbeat = setInterval(() => {
      const ws = state.ws;
      if (!ws) return;
      if (Date.now() - state.lastFrameAt > 2 * ms + 5000) {
        state.ws = null;
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(); } catch (_) { /* already closed */ }
        onClosed(1006, "no answer from the server");
        return;
      }
      send({ type: "ping" });
    }, ms);
  }

  function stopHeartbeat() {
    clearInterval(state.heartbeat);
    state.heartbeat = null;
  }

  // docs/protocol.md "Close codes": 4500-4999 and 1000 mean "do not reconnect".
  function shouldReconnect(code) {
    return code !== 1000 && !(code >= 4500 && code <= 4999);
  }

  function onClosed(code, reason) {
    stopHeartbeat();
    setJoined(false);
    el.presence.replaceChildren();
    updatePresenceCount();
    if (!state.wanted) {
      setStatus("offline", "Disconnected");
      return;
    }
    if (!shouldReconnect(code)) {
      state.wanted = false;
      const why = code === 4500 ? "your token expired; reload the page with a new token"
        : code === 4501 ? "the server refused the data sent"
        : reason || "closed by the server";
      setStatus("offline", "Disconnected: " + why);
      notice("Disconnected: " + why + ".", "error");
      return;
    }
    let delay;
    if (code === 4000) {
      // The node is draining: go elsewhere at once, spread over a second.
      delay = Math.random() * 1000;
    } else {
      // Exponential backoff with jitter: a random delay in [cap/2, cap].
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
      delay = cap / 2 + Math.random() * (cap / 2);
    }
    state.attempt += 1;
    const secs = Math.max(1, Math.round(delay / 1000));
    setStatus("reconnecting", `Connection lost (${code}); reconnecting in ${secs}s…`);
    state.timer = setTimeout(connect, delay);
  }

  function joinRoom(room) {
    const pos = state.positions.get(room);
    const frame = { type: "join", id: newId("join"), room };
    if (pos) frame.since = { epoch: pos.epoch, offset: pos.offset };
    state.pendingJoin = { id: frame.id, room, resumed: Boolean(pos) && !state.fresh };
    send(frame);
  }

  function handle(f) {
    switch (f.type) {
      case "welcome":
        state.me = f.user;
        state.attempt = 0;
        el.status.dataset.session = f.session_id;
        el.status.dataset.node = f.node_id;
        if (token) el.name.value = f.user.name;
        setStatus("online", `Connected as ${f.user.name} (node ${f.node_id})`);
        startHeartbeat(f.ping_interval_secs);
        if (state.room) joinRoom(state.room);
        break;
      case "joined": {
        if (f.room !== state.room) break;
        const pending = state.pendingJoin;
        state.pendingJoin = null;
        remember(f.room, f.epoch, f.offset);
        setJoined(true);
        el.roomTitle.textContent = "#" + f.room;
        if (pending && pending.resumed) {
          if (!f.recovered) notice("Reconnected, but some messages may be missing.", "warning");
        } else {
          send({ type: "history", id: newId("history"), room: f.room, limit: HISTORY_LIMIT });
        }
        state.fresh = false;
        askPresence(f.room, 0);
        break;
      }
      case "message":
        showMessage(f);
        break;
      case "history":
        if (f.room !== state.room) break;
        for (const m of f.messages) showMessage(m);
        break;
      case "presence":
        renderPresencePage(f);
        break;
      case "user_joined":
        if (f.room === state.room) addPresence(f.user);
        break;
      case "user_left":
        if (f.room === state.room) removePresence(f.user);
        break;
      case "ack":
      case "pong":
        break;
      case "left":
        break;
      case "error":
        notice(errorText(f), "error");
        if (state.pendingJoin && f.id === state.pendingJoin.id) {
          state.pendingJoin = null;
          el.roomTitle.textContent = "Could not join #" + state.room;
        }
        break;
      default:
        break;
    }
  }

  function errorText(f) {
    switch (f.code) {
      case "rate_limited": return "Slow down: that message was not sent.";
      case "forbidden": return "Not allowed: " + f.message;
      case "invalid_room": return "Invalid room name: " + f.message;
      default: return `Error (${f.code}): ${f.message}`;
    }
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
      state.fresh = true;
      el.messages.replaceChildren();
      el.presence.replaceChildren();
      updatePresenceCount();
      el.roomTitle.textContent = "#" + room;
    }
    const open = state.ws && state.ws.readyState === WebSocket.OPEN;
    if (open && (token || name === state.connName)) {
      if (previous && previous !== room) send({ type: "leave", id: newId("leave"), room: previous });
      if (previous !== room || !state.joined) {
        setJoined(false);
        joinRoom(room);
      }
    } else {
      state.attempt = 0;
      connect();
    }
  });

  el.sendForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = el.message.value;
    if (!body.trim() || !state.joined) return;
    if (send({ type: "publish", id: newId("pub"), room: state.room, body })) {
      el.message.value = "";
    }
    el.message.focus();
  });

  // Back online: skip the rest of the backoff.
  window.addEventListener("online", () => {
    if (state.wanted && !state.ws) connect();
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
})();
