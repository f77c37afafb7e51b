// Built from clients/js by `npm run build` (ChatCluster client library): do not edit.
// ChatCluster protocol v1 client (docs/protocol.md is the contract): one WebSocket that
// reconnects by close code, refreshes its token before it expires, resumes its session and rooms,
// delivers each message once, and retries publishes under an idempotency key.
/** The subprotocol every connection offers. */
export const SUBPROTOCOL = "chatcluster.v1.json";
/** A failed request, or an `error` frame: `code` is the protocol's error code or a client one. */
export class ChatError extends Error {
    constructor(code, message) {
        super(message);
        this.name = "ChatError";
        this.code = code;
    }
}
/** One client connection, kept up across closes, node restarts and token expiry. */
export class ChatClient {
    constructor(options) {
        this.listeners = new Map();
        this.rooms = new Map();
        this.pending = new Map();
        this.waiters = [];
        this.status = "idle";
        /** Reconnect attempts since the last `welcome`. */
        this.attempt = 0;
        /** Bumped by every `open()` and `close()`: async steps of an older one stop. */
        this.generation = 0;
        this.nextId = 1;
        this.lastFrameAt = 0;
        new URL(options.url); // throws now on a bad URL, not at some reconnect
        const WebSocket = options.WebSocket ?? globalThis.WebSocket;
        if (!WebSocket)
            throw new TypeError("no global WebSocket: pass options.WebSocket (e.g. the ws package's)");
        this.options = {
            backoffBaseMs: 500,
            backoffMaxMs: 10000,
            refreshBeforeExpiryMs: 60000,
            publishAttempts: 5,
            requestTimeoutMs: 30000,
            ...options,
            WebSocket,
        };
    }
    get state() {
        return this.status;
    }
    /** The current connection's `welcome`, while connected. */
    get welcome() {
        return this.current;
    }
    /** The last message seen in a joined room (what a rejoin resumes from). */
    position(room) {
        const position = this.rooms.get(room)?.position;
        return position && { ...position };
    }
    /** Adds a listener; returns the function that removes it. */
    on(type, listener) {
        const set = this.listeners.get(type) ?? new Set();
        this.listeners.set(type, set);
        const entry = listener;
        set.add(entry);
        return () => set.delete(entry);
    }
    /**
     * Connects, or reconnects at once if waiting for a backoff. Resolves with the next `welcome`;
     * rejects with code `closed` if the client stops first (close 1000, 4500–4999, `close()`).
     */
    connect() {
        if (this.current)
            return Promise.resolve(this.current);
        const welcome = new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
        if (this.status !== "connecting")
            void this.open();
        return welcome;
    }
    /** Closes for good: forgets rooms and session, fails what is pending with code `closed`. */
    close() {
        this.rooms.clear();
        this.sessionId = undefined;
        this.generation++;
        this.stop(1000, "closed by the client");
    }
    /** Joins a room; it stays joined across reconnects, resumed from the last message seen. */
    join(room) {
        if (this.rooms.has(room))
            return Promise.reject(new ChatError("already_joined", `already joined ${room}`));
        this.rooms.set(room, { gapless: true });
        return this.joinRequest(room);
    }
    async leave(room) {
        if (!this.rooms.delete(room))
            throw new ChatError("not_joined", `not joined to ${room}`);
        const joining = this.joining(room);
        if (joining)
            this.fail(joining, new ChatError("closed", `left ${room} before it was joined`));
        // Offline, nothing to do: a resumed session that still has the room is told on its `joined`.
        if (this.current)
            await this.request({ type: "leave", room });
        this.emit("left", { room });
    }
    /**
     * Publishes `body`. The idempotency `key` (random unless given) goes with every attempt, so
     * retries after `unavailable` or a lost connection are stored at most once.
     */
    publish(room, body, options = {}) {
        return this.request({ type: "publish", room, body, key: options.key ?? randomKey() });
    }
    /** One page of history: the newest messages, or those right after `since`. */
    history(room, options = {}) {
        return this.request({ type: "history", room, ...options });
    }
    /** Every message after `since`, page by page (each page asked for with `since` at the last one). */
    async *historyPages(room, since, limit) {
        for (let from = since;;) {
            const page = await this.history(room, limit === undefined ? { since: from } : { since: from, limit });
            yield page;
            const last = page.messages[page.messages.length - 1];
            if (!page.more || !last)
                return;
            from = { epoch: page.epoch, offset: last.offset };
        }
    }
    /** One page of a room's members, from `offset` (a previous page's `next`). */
    presence(room, offset = 0) {
        return this.request(offset ? { type: "presence", room, offset } : { type: "presence", room });
    }
    /** Every member of a room, page by page. */
    async *presencePages(room) {
        for (let offset = 0;;) {
            const page = await this.presence(room, offset);
            yield page;
            if (page.next === undefined || page.next <= offset)
                return;
            offset = page.next;
        }
    }
    // ---------- connection ----------
    async open() {
        clearTimeout(this.reconnectTimer);
        const generation = ++this.generation;
        this.status = "connecting";
        let token = this.nextToken;
        this.nextToken = undefined;
        if (token === undefined && this.options.getToken) {
            token = await this.fetchToken();
            if (generation !== this.generation)
                return;
            if (token === undefined)
                return this.retry(this.backoff(), undefined, "");
        }
        this.token = token;
        const url = new URL(this.options.url);
        if (token !== undefined)
            url.searchParams.set("token", token);
        if (this.sessionId !== undefined)
            url.searchParams.set("session", this.sessionId);
        const ws = new this.options.WebSocket(url.toString(), [SUBPROTOCOL]);
        this.ws = ws;
        ws.onmessage = (event) => {
            if (this.ws === ws)
                this.onFrame(event.data);
        };
        ws.onclose = (event) => {
            if (this.ws === ws)
                void this.onClose(event.code, event.reason);
        };
        ws.onerror = () => { }; // a close follows, with the code
    }
    /** The connection, or the attempt at one, ended with `code`: reconnect or stop, by the code. */
    async onClose(code, reason) {
        const connected = this.dropSocket();
        this.status = "reconnecting"; // unless the code says to stop
        const generation = this.generation;
        const delay = await this.reconnectDelay(code);
        if (generation === this.generation)
            this.ended(code, reason, connected, delay);
    }
    /** docs/protocol.md, "Close codes": the wait before reconnecting, or `undefined` not to. */
    async reconnectDelay(code) {
        if (code === 1000)
            return undefined;
        // The node is draining: go to another one at once, spread over a second.
        if (code === 4000)
            return Math.random() * 1000;
        if (code >= 4500 && code <= 4999) {
            // Only something new changes the server's mind: here, a new token.
            const token = this.options.getToken && (await this.fetchToken());
            if (token === undefined || token === this.token)
                return undefined;
            this.nextToken = token;
        }
        return this.backoff();
    }
    /** Exponential backoff with full jitter: uniform in [0, min(max, base · 2^attempt)). */
    backoff(attempt = this.attempt) {
        return Math.random() * Math.min(this.options.backoffMaxMs, this.options.backoffBaseMs * 2 ** attempt);
    }
    ended(code, reason, connected, delay) {
        if (delay === undefined)
            return this.stop(code, reason);
        if (connected)
            this.emit("disconnected", { code, reason, willReconnect: true });
        this.retry(delay, code, reason);
    }
    /** Reconnects after `delay`; `code` and `reason` are those of the close that led here, if any. */
    retry(delay, code, reason) {
        this.status = "reconnecting";
        this.attempt += 1;
        this.emit("reconnecting", { attempt: this.attempt, delayMs: delay, moving: code === 4000, reason });
        this.reconnectTimer = setTimeout(() => void this.open(), delay);
    }
    /** Stops until `connect()`: fails whatever waits with code `closed`. */
    stop(code, reason) {
        const active = this.status !== "idle" && this.status !== "closed";
        this.dropSocket();
        clearTimeout(this.reconnectTimer);
        this.status = "closed";
        if (active)
            this.emit("disconnected", { code, reason, willReconnect: false });
        const error = new ChatError("closed", `disconnected (${code}${reason ? `: ${reason}` : ""})`);
        for (const waiter of this.waiters.splice(0))
            waiter.reject(error);
        for (const p of [...this.pending.values()])
            this.fail(p, error);
    }
    /** Forgets the socket (closing it if still open); returns whether it had been welcomed. */
    dropSocket() {
        const { ws, current } = this;
        this.ws = undefined;
        this.current = undefined;
        clearInterval(this.heartbeat);
        clearTimeout(this.refreshTimer);
        for (const p of this.pending.values())
            p.sent = false;
        if (ws) {
            ws.onmessage = ws.onclose = null;
            ws.close(1000);
        }
        return current !== undefined;
    }
    async fetchToken() {
        try {
            return await this.options.getToken?.();
        }
        catch (error) {
            this.emit("error", new ChatError("token", `getToken() failed: ${String(error)}`));
            return undefined;
        }
    }
    /** Plans a reconnect with a fresh token before the current one's `exp`, when the server would close (4500). */
    scheduleRefresh() {
        const exp = this.token === undefined ? undefined : tokenExpiry(this.token);
        if (exp === undefined)
            return;
        const left = exp * 1000 - Date.now();
        const wait = Math.max(0, left - Math.min(this.options.refreshBeforeExpiryMs, left / 2));
        this.refreshTimer = setTimeout(() => void this.refresh(), wait);
    }
    async refresh() {
        const generation = this.generation;
        const token = await this.fetchToken();
        if (generation !== this.generation || token === undefined)
            return;
        // No later `exp`: keep this connection; at its close (4500) getToken() is asked again.
        if ((tokenExpiry(token) ?? 0) <= (tokenExpiry(this.token ?? "") ?? 0))
            return;
        this.nextToken = token;
        this.ended(1000, "token refresh", this.dropSocket(), 0);
    }
    /**
     * Browsers answer the server's pings but never show them to scripts, so the client pings too:
     * no frame at all for two intervals (and 5 s) means a dead link.
     */
    startHeartbeat(intervalSecs) {
        const ms = Math.max(5, intervalSecs) * 1000;
        this.lastFrameAt = Date.now();
        this.heartbeat = setInterval(() => {
            if (Date.now() - this.lastFrameAt > 2 * ms + 5000)
                void this.onClose(1006, "no answer from the server");
            else
                this.sendFrame({ type: "ping" });
        }, ms);
    }
    // ---------- frames ----------
    onFrame(data) {
        this.lastFrameAt = Date.now();
        if (typeof data !== "string")
            return;
        let frame;
        try {
            frame = JSON.parse(data);
        }
        catch {
            return; // v1 frames are JSON: nothing to do with anything else
        }
        switch (frame.type) {
            case "welcome":
                return this.onWelcome(strip(frame));
            case "message":
                return this.onMessage(strip(frame));
            case "joined":
                return this.onJoined(frame);
            case "user_joined":
            case "user_left":
                if (this.rooms.has(frame.room))
                    this.emit(frame.type, strip(frame));
                return;
            case "error":
                return this.onError(frame);
            default:
                return this.settle(frame.id, strip(frame));
        }
    }
    onWelcome(welcome) {
        this.current = welcome;
        this.sessionId = welcome.session_id;
        this.status = "connected";
        this.attempt = 0;
        this.startHeartbeat(welcome.ping_interval_secs);
        this.scheduleRefresh();
        for (const [name, room] of this.rooms) {
            room.since = room.position;
            room.gapless = true;
            if (!this.joining(name))
                this.rejoin(name);
        }
        // Joins first: requests queued behind them find their rooms joined. A resumed session has
        // rejoined its rooms already; their `joined` settles these joins (see onJoined).
        const queued = [...this.pending.values()].filter((p) => !p.sent);
        for (const p of queued)
            if (p.frame.type === "join")
                this.send(p);
        for (const p of queued)
            if (p.frame.type !== "join")
                this.send(p);
        this.emit("connected", welcome);
        for (const waiter of this.waiters.splice(0))
            waiter.resolve(welcome);
    }
    onMessage(message) {
        const room = this.rooms.get(message.room);
        if (!room)
            return;
        const last = room.position;
        // Seen already: a resumed session replays from where its rooms were joined.
        if (last && last.epoch === message.epoch && message.offset <= last.offset)
            return;
        if (!last || last.epoch !== message.epoch || message.offset !== last.offset + 1)
            room.gapless = false;
        room.position = { epoch: message.epoch, offset: message.offset };
        this.emit("message", message);
    }
    onJoined(frame) {
        const room = this.rooms.get(frame.room);
        if (!room) {
            // A room of the resumed session that the app left meanwhile: leave it there too.
            if (frame.id === undefined)
                this.sendFrame({ type: "leave", room: frame.room });
            return;
        }
        const { since, position } = room;
        const rejoined = since !== undefined;
        // The server judges from its session's position, which may be older than ours: what we
        // saw counts too.
        const caughtUp = room.gapless && position?.epoch === frame.epoch && position.offset >= frame.offset;
        if (!position || position.epoch !== frame.epoch || position.offset < frame.offset) {
            room.position = { epoch: frame.epoch, offset: frame.offset };
        }
        const event = {
            room: frame.room,
            epoch: frame.epoch,
            offset: frame.offset,
            rejoined,
            recovered: rejoined && (frame.recovered || caughtUp),
        };
        this.emit("joined", event);
        const joining = this.joining(frame.room);
        if (joining)
            this.settle(joining.frame.id, event);
    }
    onError(frame) {
        const error = new ChatError(frame.code, frame.message);
        const p = frame.id === undefined ? undefined : this.pending.get(frame.id);
        if (!p) {
            if (frame.id === undefined)
                this.emit("error", error);
            return; // the answer to a request that timed out or was settled otherwise
        }
        if (frame.code === "draining") {
            p.sent = false; // the node closes with 4000 next: resent on the next connection
        }
        else if (frame.code === "unavailable" && p.frame.type === "publish" && p.sends < this.options.publishAttempts) {
            p.sent = false;
            p.retry = setTimeout(() => {
                if (this.current && !p.sent && this.pending.has(p.frame.id))
                    this.send(p);
            }, this.backoff(p.sends - 1));
        }
        else if (frame.code === "not_joined" && p.frame.type === "leave") {
            this.settle(frame.id, undefined);
        }
        else {
            this.fail(p, error);
        }
    }
    // ---------- requests ----------
    request(frame) {
        return new Promise((resolve, reject) => {
            const id = `r${this.nextId++}`;
            const p = { frame: { ...frame, id }, resolve: resolve, reject, sent: false, sends: 0 };
            const ms = this.options.requestTimeoutMs;
            p.deadline = setTimeout(() => this.fail(p, new ChatError("timeout", `no answer to ${frame.type} within ${ms} ms`)), ms);
            this.pending.set(id, p);
            if (this.current)
                this.send(p);
        });
    }
    joinRequest(room) {
        return this.request({ type: "join", room }).catch((error) => {
            this.rooms.delete(room);
            throw error;
        });
    }
    /** Rejoins a room after a reconnect; a failure drops the room and is reported as an `error` event. */
    rejoin(room) {
        this.joinRequest(room).catch((error) => {
            if (error.code !== "closed")
                this.emit("error", error);
        });
    }
    joining(room) {
        for (const p of this.pending.values())
            if (p.frame.type === "join" && p.frame.room === room)
                return p;
        return undefined;
    }
    send(p) {
        if (p.frame.type === "publish" && p.sends >= this.options.publishAttempts) {
            return this.fail(p, new ChatError("unavailable", `no ack after ${p.sends} attempts`));
        }
        p.sends += 1;
        p.sent = true;
        // A join resumes from the last message seen, as of now.
        const frame = p.frame.type === "join" ? { ...p.frame, since: this.rooms.get(p.frame.room)?.position } : p.frame;
        this.sendFrame(frame);
    }
    sendFrame(frame) {
        if (this.current)
            this.ws?.send(JSON.stringify(frame));
    }
    settle(id, value) {
        const p = id === undefined ? undefined : this.pending.get(id);
        if (!p)
            return;
        this.forget(p);
        p.resolve(value);
    }
    fail(p, error) {
        this.forget(p);
        p.reject(error);
    }
    forget(p) {
        this.pending.delete(p.frame.id);
        clearTimeout(p.deadline);
        clearTimeout(p.retry);
    }
    emit(type, event) {
        for (const listener of [...(this.listeners.get(type) ?? [])]) {
            try {
                listener(event);
            }
            catch (error) {
                // A listener's bug must not break the client's state: it is reported as uncaught.
                queueMicrotask(() => {
                    throw error;
                });
            }
        }
    }
}
/** A frame's fields without `type` and `id`: what requests and events hand to the app. */
function strip(frame) {
    const { type, id, ...rest } = frame;
    return rest;
}
/** A new idempotency key: 16 random bytes in hex. */
function randomKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
/** The `exp` claim (seconds) of a JWT, read without verifying it: only the server can. */
function tokenExpiry(token) {
    try {
        const payload = token.split(".")[1] ?? "";
        const exp = JSON.parse(atob(payload.replace(/-/g, "+").replace(/_/g, "/"))).exp;
        return typeof exp === "number" ? exp : undefined;
    }
    catch {
        return undefined;
    }
}
