// A real chat-node process on 127.0.0.1 for the integration tests, and what they share.
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { ChatClient, type ChatClientOptions } from "@chatcluster/client";

/** The binary: `$CHAT_NODE_BIN`, else the workspace's debug build (clients/js/../../target/debug). */
const BIN = process.env.CHAT_NODE_BIN ?? fileURLToPath(new URL("../../../../../target/debug/chat-node", import.meta.url));

/** The longest any wait in these tests may take. */
export const WAIT_MS = 20_000;

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

/** Polls `done` every 20 ms until it holds; fails after `ms`. */
export async function waitFor(what: string, done: () => boolean, ms = WAIT_MS): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** An HS256 JWT as the node checks it. */
export function mintToken(secret: string, sub: string, ttlSecs: number): string {
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const signed = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, name: sub, roles: [], iat: now, exp: now + ttlSecs })}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

export interface NodeOptions {
  /** TOML sections added to the config (`[auth]`, `[limits]`, …). */
  toml: string;
  /**
   * A one-node cluster with its room logs on disk: a restarted node comes back with every
   * room's stream (same epoch, history and idempotency keys). Without it the node is standalone
   * and keeps rooms in memory.
   */
  disk?: boolean;
}

/** A chat-node process; `kill()` and `start()` again keep its ports and data. */
export class ChatNode {
  private child: ChildProcess | undefined;
  private output = "";

  private constructor(
    private readonly dir: string,
    private readonly port: number,
    private readonly adminPort: number,
  ) {}

  static async start(options: NodeOptions): Promise<ChatNode> {
    if (!existsSync(BIN)) {
      throw new Error(`chat-node not found at ${BIN}: run \`cargo build -p chat-node\` first, or set CHAT_NODE_BIN`);
    }
    const dir = mkdtempSync(join(tmpdir(), "chatcluster-js-"));
    const node = new ChatNode(dir, await freePort(), await freePort());
    const cluster = options.disk ? diskCluster(`127.0.0.1:${await freePort()}`, join(dir, "data")) : "";
    const config = [
      `listen = "127.0.0.1:${node.port}"`,
      `node_id = "js-0"`,
      `[admin]`,
      `listen = "127.0.0.1:${node.adminPort}"`,
      options.toml,
      cluster,
    ].join("\n");
    writeFileSync(join(dir, "node.toml"), config);
    await node.run();
    return node;
  }

  /** ws://…/ws with this query. */
  url(query = ""): string {
    return `ws://127.0.0.1:${this.port}/ws${query}`;
  }

  /** Starts the process (again) and waits until it is ready. */
  async run(): Promise<void> {
    const child = spawn(BIN, ["--config", join(this.dir, "node.toml")], { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    const keep = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString()).slice(-20_000);
    };
    child.stdout?.on("data", keep);
    child.stderr?.on("data", keep);
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`chat-node exited with ${child.exitCode}:\n${this.output}`);
      if (await this.ready()) return;
      if (Date.now() > deadline) throw new Error(`chat-node not ready within ${WAIT_MS} ms:\n${this.output}`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  private async ready(): Promise<boolean> {
    try {
      const response = await fetch(`http://127.0.0.1:${this.adminPort}/readyz`, { signal: AbortSignal.timeout(1000) });
      return response.status === 200;
    } catch {
      return false;
    }
  }

  /** SIGKILL: no drain, no close frames, as in a crash. */
  async kill(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await exited;
  }

  async stop(): Promise<void> {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A cluster of this one node (its own peer), so it gets the disk storage of clustered nodes. */
function diskCluster(peer: string, dataDir: string): string {
  return [
    "[cluster]",
    `peer_listen = "${peer}"`,
    `static_peers = ["${peer}"]`,
    `secret = "js-client-tests-cluster-secret"`,
    `storage = "disk"`,
    `data_dir = ${JSON.stringify(dataDir)}`,
  ].join("\n");
}

/** A client over the `ws` package (Node 20 has no global WebSocket). */
export function client(options: ChatClientOptions): ChatClient {
  return new ChatClient({ WebSocket, ...options });
}
