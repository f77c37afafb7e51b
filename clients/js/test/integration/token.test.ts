// Short-lived tokens against a node that closes connections at `exp` (4500).
import assert from "node:assert/strict";
import { test } from "node:test";
import type { ChatEvents, ChatMessage } from "@chatcluster/client";
import { ChatNode, client, mintToken, waitFor } from "./node.js";

const SECRET = "token-test-secret-0123456789";

async function jwtNode(t: { after(fn: () => unknown): void }): Promise<ChatNode> {
  // No leeway, and a heartbeat every second: the node closes with 4500 right at `exp`.
  const node = await ChatNode.start({
    toml: `[auth]\nmode = "jwt"\njwt_secret = "${SECRET}"\nleeway_secs = 0\n[limits]\nping_interval_secs = 1`,
  });
  t.after(() => node.stop());
  return node;
}

test("tokens of 4 s are refreshed before they expire: the session resumes and every message arrives once", async (t) => {
  const node = await jwtNode(t);
  const reader = client({ url: node.url(), getToken: () => mintToken(SECRET, "reader", 4) });
  const writer = client({ url: node.url(), getToken: () => mintToken(SECRET, "writer", 3600) });
  t.after(() => {
    reader.close();
    writer.close();
  });
  const received: ChatMessage[] = [];
  reader.on("message", (m) => received.push(m));
  const closes: ChatEvents["disconnected"][] = [];
  reader.on("disconnected", (e) => closes.push(e));
  const welcomes: ChatEvents["connected"][] = [];
  reader.on("connected", (w) => welcomes.push(w));
  await reader.connect();
  await reader.join("news");
  await writer.connect();
  await writer.join("news");

  // Publishes over ~9 s: the reader reconnects several times meanwhile.
  const sent: string[] = [];
  for (let i = 0; i < 90; i++) {
    await writer.publish("news", `n${i}`);
    sent.push(`n${i}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await waitFor("the reader to catch up", () => received.length >= sent.length);

  assert.ok(closes.length >= 2, `refreshed more than once (${closes.length})`);
  assert.deepEqual(
    new Set(closes.map((e) => `${e.code} ${e.reason} ${e.willReconnect}`)),
    new Set(["1000 token refresh true"]),
    "every close was a refresh: none at exp (4500)",
  );
  assert.ok(welcomes.slice(1).every((w) => w.resumed && w.session_id === welcomes[0]?.session_id), "each refresh resumed the session");
  // A resumed session replays from where its rooms were joined: those repeats must not show.
  assert.deepEqual(received.map((m) => m.body), sent, "every message once, in order");
});

test("a token that is not renewed ends the connection with 4500, and the client stops", async (t) => {
  const node = await jwtNode(t);
  const token = mintToken(SECRET, "late", 2);
  const late = client({ url: node.url(), getToken: () => token });
  t.after(() => late.close());
  const closes: ChatEvents["disconnected"][] = [];
  late.on("disconnected", (e) => closes.push(e));
  await late.connect();
  await waitFor("the close at exp", () => closes.length > 0, 10_000);
  assert.deepEqual(closes, [{ code: 4500, reason: closes[0]?.reason, willReconnect: false }]);
  assert.equal(late.state, "closed");
});
