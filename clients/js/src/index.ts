// ChatCluster protocol v1 client (docs/protocol.md is the contract): one WebSocket that
// reconnects by close code, refreshes its token before it expires, resumes its session and rooms,
// delivers each message once, and retries publishes under an idempotency key.

import type {
  Ack,
  ChatMessage,
  ClientFrame,
  HistoryPage,
  Joined,
  PresencePage,
  ServerErrorCode,
  ServerFrame,
  StreamPosition,
  UserEvent,
  Welcome,
} from "./protocol.js";

export type * from "./protocol.js";

/** The subprotocol every connection offers. */
export const SUBPROTOCOL = "chatcluster.v1.json";

/** Failures on the client's side, next to the server's error codes. */
export type ClientErrorCode =
  /** No answer within `requestTimeoutMs`. */
  | "timeout"
  /** The client was closed, or stopped reconnecting, before the answer came. */
  | "closed"
  /** `getToken()` threw or rejected. */
  | "token";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

/** A failed request, or an `error` frame: `code` is the protocol's error code or a client one. */
export class ChatError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = "ChatError";
    this.code = code;
  }
}

/** The part of the WHATWG WebSocket API the client uses (browsers, Node 22+, the `ws` package). */
export interface WebSocketLike {
  // `any`: every implementation has event classes of its own; the client reads only `data`
  // of a message and `code` and `reason` of a close.
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

export interface ChatClientOptions {
  /** `ws(s)://host/ws`. Its query is kept: `?name=` names the user in anonymous mode. */
  url: string;
  /** Returns a JWT; asked for every connection and before the current one's `exp`. Omit in anonymous mode. */
  getToken?: () => string | Promise<string>;
  /** WebSocket implementation; default `globalThis.WebSocket`. In Node 20 pass the `ws` package's. */
  WebSocket?: WebSocketConstructor;
  /** First reconnect backoff step, doubled per failed attempt (default 500 ms). */
  backoffBaseMs?: number;
  /** Longest reconnect backoff (default 10 000 ms). */
  backoffMaxMs?: number;
  /** Reconnect with a fresh token this long before `exp`, at most half the token's lifetime (default 60 000 ms). */
  refreshBeforeExpiryMs?: number;
  /** Sends of one publish before it fails with `unavailable` (default 5). */
  publishAttempts?: number;
  /** Deadline of a request, from the call, reconnects included (default 30 000 ms). */
  requestTimeoutMs?: number;
}

/** A room joined or rejoined. */
export interface JoinedEvent extends Joined {
  /** The room was joined before and this connection rejoined it, from the last message seen. */
  rejoined: boolean;
  /**
   * After a rejoin: every message missed meanwhile was delivered. When `false` some may be
   * missing (tell the user). Always `false` for a first join.
   */
  recovered: boolean;
}

export interface ChatEvents {
  /** A connection was accepted (`resumed`: it took over the previous session). */
  connected: Welcome;
  /** The connection ended; without `willReconnect` the client has stopped until `connect()`. */
  disconnected: { code: number; reason: string; willReconnect: boolean };
  /**
   * The next connection attempt starts in `delayMs`. `moving`: the server asked the client to
   * reconnect elsewhere (close code 4000: the node drains, or `reason` `rebalance` evens out the
   * cluster) — a planned move, not a failure; the session resumes where it was.
   */
  reconnecting: { attempt: number; delayMs: number; moving: boolean; reason: string };
  /** A message of a joined room, once per (room, epoch, offset), in offset order. */
  message: ChatMessage;
  joined: JoinedEvent;
  left: { room: string };
  user_joined: UserEvent;
  user_left: UserEvent;
  /** An error no request owns: an `error` frame without `id`, a failed rejoin, a failed `getToken()`. */
  error: ChatError;
}

export type ClientState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

interface Room {
  /** The last message seen, or the room's head at the join: dedupes and is the rejoin's `since`. */
  position?: StreamPosition;
  /** `position` when this connection started; `undefined` for a first join. */
  since?: StreamPosition;
  /** Every offset after `since` was seen. */
  gapless: boolean;
}

interface Pending {
  frame: ClientFrame & { id: string };
  resolve(value: unknown): void;
  reject(error: ChatError): void;
  /** Sent on the current connection, answer awaited. */
  sent: boolean;
  sends: number;
  deadline?: ReturnType<typeof setTimeout>;
  retry?: ReturnType<typeof setTimeout>;
}

type Timer = ReturnType<typeof setTimeout>;

/** One client connection, kept up across closes, node restarts and token expiry. */
export class ChatClient {
  private readonly options: Required<Omit<ChatClientOptions, "getToken">> & Pick<ChatClientOptions, "getToken">;
  private readonly listeners = new Map<keyof ChatEvents, Set<(event: unknown) => void>>();
  private readonly rooms = new Map<string, Room>();
  private readonly pending = new Map<string, Pending>();
  private waiters: { resolve(welcome: Welcome): void; reject(error: ChatError): void }[] = [];
  private status: ClientState = "idle";
  private ws: WebSocketLike | undefined;
  private current: Welcome | undefined;
  private sessionId: string | undefined;
  /** The token of the current (or last) connection. */
  private token: string | undefined;
  /** A fresher token, fetched for the next connection. */
  private nextToken: string | undefined;
  /** Reconnect attempts since the last `welcome`. */
  private attempt = 0;
  /** Bumped by every `open()` and `close()`: async steps of an older one stop. */
  private generation = 0;
  private nextId = 1;
  private lastFrameAt = 0;
  private reconnectTimer: Timer | undefined;
  private refreshTimer: Timer | undefined;
  private heartbeat: ReturnType<typeof setInterval> | undefined;

  constructor(options: ChatClientOptions) {
    new URL(options.url); // throws now on a bad URL, not at some reconnect
    const WebSocket = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WebSocket) throw new TypeError("no global WebSocket: pass options.WebSocket (e.g. the ws package's)");
    this.options = {
      backoffBaseMs: 500,
      backoffMaxMs: 10_000,
      refreshBeforeExpiryMs: 60_000,
      publishAttempts: 5,
      requestTimeoutMs: 30_000,
      ...options,
      WebSocket,
    };
  }

  get state(): ClientState {
    return this.status;
  }

  /** The current connection's `welcome`, while connected. */
  get welcome(): Welcome | undefined {
    return this.current;
  }

  /** The last message seen in a joined room (what a rejoin resumes from). */
  position(room: string): StreamPosition | undefined {
    const position = this.rooms.get(room)?.position;
    return position && { ...position };
  }

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof ChatEvents>(type: K, listener: (event: ChatEvents[K]) => void): () => void {
    const set = this.listeners.get(type) ?? new Set();
    this.listeners.set(type, set);
    const entry = listener as (event: unknown) => void;
    set.add(entry);
    return () => set.delete(entry);
  }

  /**
   * Connects, or reconnects at once if waiting for a backoff. Resolves with the next `welcome`;
   * rejects with code `closed` if the client stops first (close 1000, 4500–4999, `close()`).
   */
  connect(): Promise<Welcome> {
    if (this.current) return Promise.resolve(this.current);
    const welcome = new Promise<Welcome>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (this.status !== "connecting") void this.open();
    return welcome;
  }

  /** Closes for good: forgets rooms and session, fails what is pending with code `closed`. */
  close(): void {
    this.rooms.clear();
    this.sessionId = undefined;
    this.generation++;
    this.stop(1000, "closed by the client");
  }

  /** Joins a room; it stays joined across reconnects, resumed from the last message seen. */
  join(room: string): Promise<JoinedEvent> {
    if (this.rooms.has(room)) return Promise.reject(new ChatError("already_joined", `already joined ${room}`));
    this.rooms.set(room, { gapless: true });
    return this.joinRequest(room);
  }

  async leave(room: string): Promise<void> {
    if (!this.rooms.delete(room)) throw new ChatError("not_joined", `not joined to ${room}`);
    const joining = this.joining(room);
    if (joining) this.fail(joining, new ChatError("closed", `left ${room} before it was joined`));
    // Offline, nothing to do: a resumed session that still has the room is told on its `joined`.
    if (this.current) await this.request({ type: "leave", room });
    this.emit("left", { room });
  }

  /**
   * Publishes `body`. The idempotency `key` (random unless given) goes with every attempt, so
   * retries after `unavailable` or a lost connection are stored at most once.
   */
  publish(room: string, body: string, options: { key?: string } = {}): Promise<Ack> {
    return this.request({ type: "publish", room, body, key: options.key ?? randomKey() });
  }

  /** One page of history: the newest messages, or those right after `since`. */
  history(room: string, options: { since?: StreamPosition; limit?: number } = {}): Promise<HistoryPage> {
    return this.request({ type: "history", room, ...options });
  }

  /** Every message after `since`, page by page (each page asked for with `since` at the last one). */
  async *historyPages(room: string, since: StreamPosition, limit?: number): AsyncGenerator<HistoryPage, void> {
    for (let from = since; ; ) {
      const page = await this.history(room, limit === undefined ? { since: from } : { since: from, limit });
      yield page;
      const last = page.messages[page.messages.length - 1];
      if (!page.more || !last) return;
      from = { epoch: page.epoch, offset: last.offset };
    }
  }

  /** One page of a room's members, from `offset` (a previous page's `next`). */
  presence(room: string, offset = 0): Promise<PresencePage> {
    return this.request(offset ? { type: "presence", room, offset } : { type: "presence", room });
  }

  /** Every member of a room, page by page. */
  async *presencePages(room: string): AsyncGenerator<PresencePage, void> {
    for (let offset = 0; ; ) {
      const page = await this.presence(room, offset);
      yield page;
      if (page.next === undefined || page.next <= offset) return;
      offset = page.next;
    }
  }

  // ---------- connection ----------

  private async open(): Promise<void> {
    clearTimeout(this.reconnectTimer);
    const generation = ++this.generation;
    this.status = "connecting";
    let token = this.nextToken;
    this.nextToken = undefined;
    if (token === undefined && this.options.getToken) {
      token = await this.fetchToken();
      if (generation !== this.generation) return;
      if (token === undefined) return this.retry(this.backoff(), undefined, "");
    }
    this.token = token;
    const url = new URL(this.options.url);
    if (token !== undefined) url.searchParams.set("token", token);
    if (this.sessionId !== undefined) url.searchParams.set("session", this.sessionId);
    const ws = new this.options.WebSocket(url.toString(), [SUBPROTOCOL]);
    this.ws = ws;
    ws.onmessage = (event: { data: unknown }) => {
      if (this.ws === ws) this.onFrame(event.data);
    };
    ws.onclose = (event: { code: number; reason: string }) => {
      if (this.ws === ws) void this.onClose(event.code, event.reason);
    };
    ws.onerror = () => {}; // a close follows, with the code
  }

  /** The connection, or the attempt at one, ended with `code`: reconnect or stop, by the code. */
  private async onClose(code: number, reason: string): Promise<void> {
    const connected = this.dropSocket();
    this.status = "reconnecting"; // unless the code says to stop
    const generation = this.generation;
    const delay = await this.reconnectDelay(code);
    if (generation === this.generation) this.ended(code, reason, connected, delay);
  }

  /** docs/protocol.md, "Close codes": the wait before reconnecting, or `undefined` not to. */
  private async reconnectDelay(code: number): Promise<number | undefined> {
    if (code === 1000) return undefined;
    // The node is draining: go to another one at once, spread over a second.
    if (code === 4000) return Math.random() * 1000;
    if (code >= 4500 && code <= 4999) {
      // Only something new changes the server's mind: here, a new token.
      const token = this.options.getToken && (await this.fetchToken());
      if (token === undefined || token === this.token) return undefined;
      this.nextToken = token;
    }
    return this.backoff();
  }

  /** Exponential backoff with full jitter: uniform in [0, min(max, base · 2^attempt)). */
  private backoff(attempt = this.attempt): number {
    return Math.random() * Math.min(this.options.backoffMaxMs, this.options.backoffBaseMs * 2 ** attempt);
  }

  private ended(code: number, reason: string, connected: boolean, delay: number | undefined): void {
    if (delay === undefined) return this.stop(code, reason);
    if (connected) this.emit("disconnected", { code, reason, willReconnect: true });
    this.retry(delay, code, reason);
  }

  /** Reconnects after `delay`; `code` and `reason` are those of the close that led here, if any. */
  private retry(delay: number, code: number | undefined, reason: string): void {
    this.status = "reconnecting";
    this.attempt += 1;
    this.emit("reconnecting", { attempt: this.attempt, delayMs: delay, moving: code === 4000, reason });
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }

  /** Stops until `connect()`: fails whatever waits with code `closed`. */
  private stop(code: number, reason: string): void {
    const active = this.status !== "idle" && this.status !== "closed";
    this.dropSocket();
    clearTimeout(this.reconnectTimer);
    this.status = "closed";
    if (active) this.emit("disconnected", { code, reason, willReconnect: false });
    const error = new ChatError("closed", `disconnected (${code}${reason ? `: ${reason}` : ""})`);
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
    for (const p of [...this.pending.values()]) this.fail(p, error);
  }

  /** Forgets the socket (closing it if still open); returns whether it had been welcomed. */
  private dropSocket(): boolean {
    const { ws, current } = this;
    this.ws = undefined;
    this.current = undefined;
    clearInterval(this.heartbeat);
    clearTimeout(this.refreshTimer);
    for (const p of this.pending.values()) p.sent = false;
    if (ws) {
      ws.onmessage = ws.onclose = null;
      ws.close(1000);
    }
    return current !== undefined;
  }

  private async fetchToken(): Promise<string | undefined> {
    try {
      return await this.options.getToken?.();
    } catch (error) {
      this.emit("error", new ChatError("token", `getToken() failed: ${String(error)}`));
      return undefined;
    }
  }

  /** Plans a reconnect with a fresh token before the current one's `exp`, when the server would close (4500). */
  private scheduleRefresh(): void {
    const exp = this.token === undefined ? undefined : tokenExpiry(this.token);
    if (exp === undefined) return;
    const left = exp * 1000 - Date.now();
    const wait = Math.max(0, left - Math.min(this.options.refreshBeforeExpiryMs, left / 2));
    this.refreshTimer = setTimeout(() => void this.refresh(), wait);
  }

  private async refresh(): Promise<void> {
    const generation = this.generation;
    const token = await this.fetchToken();
    if (generation !== this.generation || token === undefined) return;
    // No later `exp`: keep this connection; at its close (4500) getToken() is asked again.
    if ((tokenExpiry(token) ?? 0) <= (tokenExpiry(this.token ?? "") ?? 0)) return;
    this.nextToken = token;
    this.ended(1000, "token refresh", this.dropSocket(), 0);
  }

  /**
   * Browsers answer the server's pings but never show them to scripts, so the client pings too:
   * no frame at all for two intervals (and 5 s) means a dead link.
   */
  private startHeartbeat(intervalSecs: number): void {
    const ms = Math.max(5, intervalSecs) * 1000;
    this.lastFrameAt = Date.now();
    this.heartbeat = setInterval(() => {
      if (Date.now() - this.lastFrameAt > 2 * ms + 5000) void this.onClose(1006, "no answer from the server");
      else this.sendFrame({ type: "ping" });
    }, ms);
  }

  // ---------- frames ----------

  private onFrame(data: unknown): void {
    this.lastFrameAt = Date.now();
    if (typeof data !== "string") return;
    let frame: ServerFrame;
    try {
      frame = JSON.parse(data) as ServerFrame;
    } catch {
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
        if (this.rooms.has(frame.room)) this.emit(frame.type, strip(frame));
        return;
      case "error":
        return this.onError(frame);
      default:
        return this.settle(frame.id, strip(frame));
    }
  }

  private onWelcome(welcome: Welcome): void {
    this.current = welcome;
    this.sessionId = welcome.session_id;
    this.status = "connected";
    this.attempt = 0;
    this.startHeartbeat(welcome.ping_interval_secs);
    this.scheduleRefresh();
    for (const [name, room] of this.rooms) {
      room.since = room.position;
      room.gapless = true;
      if (!this.joining(name)) this.rejoin(name);
    }
    // Joins first: requests queued behind them find their rooms joined. A resumed session has
    // rejoined its rooms already; their `joined` settles these joins (see onJoined).
    const queued = [...this.pending.values()].filter((p) => !p.sent);
    for (const p of queued) if (p.frame.type === "join") this.send(p);
    for (const p of queued) if (p.frame.type !== "join") this.send(p);
    this.emit("connected", welcome);
    for (const waiter of this.waiters.splice(0)) waiter.resolve(welcome);
  }

  private onMessage(message: ChatMessage): void {
    const room = this.rooms.get(message.room);
    if (!room) return;
    const last = room.position;
    // Seen already: a resumed session replays from where its rooms were joined.
    if (last && last.epoch === message.epoch && message.offset <= last.offset) return;
    if (!last || last.epoch !== message.epoch || message.offset !== last.offset + 1) room.gapless = false;
    room.position = { epoch: message.epoch, offset: message.offset };
    this.emit("message", message);
  }

  private onJoined(frame: Joined & { id?: string }): void {
    const room = this.rooms.get(frame.room);
    if (!room) {
      // A room of the resumed session that the app left meanwhile: leave it there too.
      if (frame.id === undefined) this.sendFrame({ type: "leave", room: frame.room });
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
    const event: JoinedEvent = {
      room: frame.room,
      epoch: frame.epoch,
      offset: frame.offset,
      rejoined,
      recovered: rejoined && (frame.recovered || caughtUp),
    };
    this.emit("joined", event);
    const joining = this.joining(frame.room);
    if (joining) this.settle(joining.frame.id, event);
  }

  private onError(frame: { id?: string; code: ServerErrorCode; message: string }): void {
    const error = new ChatError(frame.code, frame.message);
    const p = frame.id === undefined ? undefined : this.pending.get(frame.id);
    if (!p) {
      if (frame.id === undefined) this.emit("error", error);
      return; // the answer to a request that timed out or was settled otherwise
    }
    if (frame.code === "draining") {
      p.sent = false; // the node closes with 4000 next: resent on the next connection
    } else if (frame.code === "unavailable" && p.frame.type === "publish" && p.sends < this.options.publishAttempts) {
      p.sent = false;
      p.retry = setTimeout(() => {
        if (this.current && !p.sent && this.pending.has(p.frame.id)) this.send(p);
      }, this.backoff(p.sends - 1));
    } else if (frame.code === "not_joined" && p.frame.type === "leave") {
      this.settle(frame.id, undefined);
    } else {
      this.fail(p, error);
    }
  }

  // ---------- requests ----------

  private request<T>(frame: ClientFrame): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const id = `r${this.nextId++}`;
      const p: Pending = { frame: { ...frame, id }, resolve: resolve as (value: unknown) => void, reject, sent: false, sends: 0 };
      const ms = this.options.requestTimeoutMs;
      p.deadline = setTimeout(() => this.fail(p, new ChatError("timeout", `no answer to ${frame.type} within ${ms} ms`)), ms);
      this.pending.set(id, p);
      if (this.current) this.send(p);
    });
  }

  private joinRequest(room: string): Promise<JoinedEvent> {
    return this.request<JoinedEvent>({ type: "join", room }).catch((error: ChatError) => {
      this.rooms.delete(room);
      throw error;
    });
  }

  /** Rejoins a room after a reconnect; a failure drops the room and is reported as an `error` event. */
  private rejoin(room: string): void {
    this.joinRequest(room).catch((error: ChatError) => {
      if (error.code !== "closed") this.emit("error", error);
    });
  }

  private joining(room: string): Pending | undefined {
    for (const p of this.pending.values()) if (p.frame.type === "join" && p.frame.room === room) return p;
    return undefined;
  }

  private send(p: Pending): void {
    if (p.frame.type === "publish" && p.sends >= this.options.publishAttempts) {
      return this.fail(p, new ChatError("unavailable", `no ack after ${p.sends} attempts`));
    }
    p.sends += 1;
    p.sent = true;
    // A join resumes from the last message seen, as of now.
    const frame = p.frame.type === "join" ? { ...p.frame, since: this.rooms.get(p.frame.room)?.position } : p.frame;
    this.sendFrame(frame);
  }

  private sendFrame(frame: ClientFrame): void {
    if (this.current) this.ws?.send(JSON.stringify(frame));
  }

  private settle(id: string | undefined, value: unknown): void {
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p) return;
    this.forget(p);
    p.resolve(value);
  }

  private fail(p: Pending, error: ChatError): void {
    this.forget(p);
    p.reject(error);
  }

  private forget(p: Pending): void {
    this.pending.delete(p.frame.id);
    clearTimeout(p.deadline);
    clearTimeout(p.retry);
  }

  private emit<K extends keyof ChatEvents>(type: K, event: ChatEvents[K]): void {
    for (const listener of [...(this.listeners.get(type) ?? [])]) {
      try {
        listener(event);
      } catch (error) {
        // A listener's bug must not break the client's state: it is reported as uncaught.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}

/** A frame's fields without `type` and `id`: what requests and events hand to the app. */
function strip<T extends { type: string; id?: string }>(frame: T): Omit<T, "type" | "id"> {
  const { type, id, ...rest } = frame;
  return rest;
}

/** A new idempotency key: 16 random bytes in hex. */
function randomKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The `exp` claim (seconds) of a JWT, read without verifying it: only the server can. */
function tokenExpiry(token: string): number | undefined {
  try {
    const payload = token.split(".")[1] ?? "";
    const exp: unknown = JSON.parse(atob(payload.replace(/-/g, "+").replace(/_/g, "/"))).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}
