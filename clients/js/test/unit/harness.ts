// A fake WebSocket that the test plays the server through, and a client wired to it under mocked
// timers, clock and Math.random.
import type { TestContext } from "node:test";
import { ChatClient, SUBPROTOCOL, type ChatClientOptions, type ChatEvents, type WebSocketLike } from "@chatcluster/client";

/** The mocked clock starts here (ms since the Unix epoch). */
export const NOW = 1_700_000_000_000;

type Frame = Record<string, unknown> & { type: string; id?: string };

export class FakeSocket implements WebSocketLike {
  onmessage: ((event: { data: string }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  /** Frames the client sent, parsed. */
  readonly sent: Frame[] = [];
  /** The code of the client's `close()`, if it called it. */
  closedWith: number | undefined;

  constructor(
    readonly url: string,
    readonly protocols: string[],
  ) {}

  send(data: string): void {
    this.sent.push(JSON.parse(data) as Frame);
  }

  close(code?: number): void {
    this.closedWith = code;
  }

  /** Sent frames of one type. */
  frames(type: string): Frame[] {
    return this.sent.filter((f) => f.type === type);
  }

  /** The last sent frame of one type. */
  last(type: string): Frame {
    const frame = this.frames(type).at(-1);
    if (!frame) throw new Error(`no ${type} frame sent; sent: ${JSON.stringify(this.sent)}`);
    return frame;
  }

  query(name: string): string | null {
    return new URL(this.url).searchParams.get(name);
  }

  receive(frame: Frame): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  welcome(fields: Partial<Frame> = {}): void {
    this.receive({
      type: "welcome",
      session_id: "s1",
      node_id: "n1",
      user: { id: "u1", name: "Ann" },
      roles: [],
      protocol: SUBPROTOCOL,
      ping_interval_secs: 25,
      resumed: false,
      ...fields,
    });
  }

  /** Answers the last `type` request with `frame` (its id added). */
  answer(type: string, frame: Frame): void {
    this.receive({ ...frame, id: this.last(type).id });
  }

  serverClose(code: number, reason = ""): void {
    this.onclose?.({ code, reason });
  }
}

export function message(room: string, epoch: string, offset: number, body = `m${offset}`): Frame {
  return { type: "message", room, epoch, offset, body, sender: { id: "u2", name: "Bob" }, ts: 1 };
}

/** An unsigned JWT with this `exp` (seconds): the client never verifies, it only reads `exp`. */
export function jwt(exp: number, sub = "u1"): string {
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, exp })}.signature`;
}

/** Lets every pending promise continuation run (setImmediate is not mocked). */
export const flush = () => new Promise<void>((resolve) => setImmediate(resolve));

export type Recorded = { [K in keyof ChatEvents]: [K, ChatEvents[K]] }[keyof ChatEvents];

const EVENTS: (keyof ChatEvents)[] = [
  "connected",
  "disconnected",
  "reconnecting",
  "message",
  "joined",
  "left",
  "user_joined",
  "user_left",
  "error",
];

export function harness(t: TestContext, options: Partial<ChatClientOptions> = {}) {
  t.mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: NOW });
  let random = 0.999;
  t.mock.method(Math, "random", () => random);
  const sockets: FakeSocket[] = [];
  class Socket extends FakeSocket {
    constructor(url: string, protocols: string[]) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  const client = new ChatClient({ url: "ws://chat.test/ws", WebSocket: Socket, ...options });
  const events: Recorded[] = [];
  for (const type of EVENTS) client.on(type, (event) => events.push([type, event] as Recorded));
  t.after(() => client.close());
  return {
    client,
    sockets,
    events,
    /** The newest socket. */
    get socket(): FakeSocket {
      const socket = sockets.at(-1);
      if (!socket) throw new Error("no socket opened");
      return socket;
    },
    /** Events of one type, in order. */
    of<K extends keyof ChatEvents>(type: K): ChatEvents[K][] {
      return events.filter((e) => e[0] === type).map((e) => e[1] as ChatEvents[K]);
    },
    setRandom(value: number) {
      random = value;
    },
    tick(ms: number) {
      t.mock.timers.tick(ms);
    },
    /** Moves the clock on and lets what it set off run, 0 ms timers it started included. */
    async advance(ms: number) {
      t.mock.timers.tick(ms);
      await flush();
      t.mock.timers.tick(0);
      await flush();
    },
    /** Connects and welcomes the client. */
    async connect(fields: Partial<Frame> = {}) {
      const welcome = client.connect();
      await flush();
      sockets.at(-1)?.welcome(fields);
      await welcome;
    },
  };
}
