// Connecting, and reconnecting by close code (docs/protocol.md, "Close codes").
import assert from "node:assert/strict";
import { test } from "node:test";
import { ChatError, SUBPROTOCOL } from "@chatcluster/client";
import { flush, harness } from "./harness.js";

test("offers the subprotocol, keeps the URL's query, adds the token and then the session", async (t) => {
  const h = harness(t, { url: "ws://chat.test/ws?name=ann", getToken: () => "tok" });
  await h.connect();
  assert.deepEqual(h.socket.protocols, [SUBPROTOCOL]);
  assert.equal(h.socket.query("name"), "ann");
  assert.equal(h.socket.query("token"), "tok");
  assert.equal(h.socket.query("session"), null);
  assert.equal(h.client.state, "connected");
  assert.equal(h.client.welcome?.session_id, "s1");

  h.setRandom(0);
  h.socket.serverClose(1011);
  await h.advance(0);
  assert.equal(h.sockets.length, 2);
  assert.equal(h.socket.query("session"), "s1", "the next connection resumes the session");
});

/** Closes the current socket with `code` and returns how long the client waits before the next one. */
async function nextDelay(h: ReturnType<typeof harness>, code: number): Promise<number> {
  const before = h.sockets.length;
  h.socket.serverClose(code);
  await flush();
  const delay = h.of("reconnecting").at(-1)?.delayMs;
  assert.ok(delay !== undefined, `close ${code} schedules a reconnect`);
  if (delay >= 1) {
    h.tick(Math.ceil(delay) - 1);
    await flush();
    assert.equal(h.sockets.length, before, `close ${code}: no reconnect before ${delay} ms`);
  }
  h.tick(1);
  await flush();
  assert.equal(h.sockets.length, before + 1, `close ${code}: reconnect after ${delay} ms`);
  return delay;
}

test("1xxx but 1000, and 4000–4499 but 4000: exponential backoff with full jitter", async (t) => {
  for (const code of [1001, 1002, 1006, 1007, 1009, 1011, 4001, 4002, 4003, 4499]) {
    await t.test(`close ${code}`, async (t) => {
      const h = harness(t);
      await h.connect();
      assert.equal(await nextDelay(h, code), 0.999 * 500);
    });
  }
});

test("backoff doubles per failed attempt up to the cap, is drawn uniformly below it, and restarts after a welcome", async (t) => {
  const h = harness(t);
  await h.connect();
  const delays = [];
  for (let i = 0; i < 7; i++) delays.push(await nextDelay(h, 1006));
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 10_000, 10_000].map((cap) => 0.999 * cap));
  assert.deepEqual(h.of("reconnecting").map((e) => e.attempt), [1, 2, 3, 4, 5, 6, 7]);

  h.setRandom(0.25);
  assert.equal(await nextDelay(h, 1006), 0.25 * 10_000, "full jitter: anywhere in [0, cap)");
  h.setRandom(0);
  assert.equal(await nextDelay(h, 1006), 0);

  h.setRandom(0.999);
  h.socket.welcome();
  assert.equal(await nextDelay(h, 1006), 0.999 * 500, "a welcome restarts the backoff");
});

test("4000 (node draining): reconnect at once with 0–1 s jitter, whatever the backoff had reached", async (t) => {
  const h = harness(t);
  await h.connect();
  for (let i = 0; i < 5; i++) await nextDelay(h, 1006);
  assert.equal(await nextDelay(h, 4000), 0.999 * 1000);
});

test("4000 rebalance: a planned move that resumes the session at once, with no error", async (t) => {
  const h = harness(t);
  await h.connect();
  h.setRandom(0.5);
  h.socket.serverClose(4000, "rebalance");
  await flush();
  const reconnecting = h.of("reconnecting").at(-1);
  assert.deepEqual(reconnecting, { attempt: 1, delayMs: 500, moving: true, reason: "rebalance" });
  assert.equal(h.of("disconnected").at(-1)?.willReconnect, true);
  h.tick(500);
  await flush();
  assert.equal(h.sockets.length, 2);
  assert.equal(h.socket.query("session"), "s1", "resumes the moved session");
  assert.equal(h.of("error").length, 0, "a move is not an error");
  // A failure is not a move.
  h.socket.serverClose(1011, "boom");
  await flush();
  assert.equal(h.of("reconnecting").at(-1)?.moving, false);
});

test("1000: no reconnect", async (t) => {
  const h = harness(t);
  await h.connect();
  h.socket.serverClose(1000, "bye");
  await flush();
  h.tick(600_000);
  await flush();
  assert.equal(h.sockets.length, 1);
  assert.equal(h.client.state, "closed");
  assert.deepEqual(h.of("disconnected"), [{ code: 1000, reason: "bye", willReconnect: false }]);
});

test("4500–4999 without a token source: no reconnect", async (t) => {
  for (const code of [4500, 4501, 4999]) {
    await t.test(`close ${code}`, async (t) => {
      const h = harness(t);
      await h.connect();
      h.socket.serverClose(code);
      await flush();
      h.tick(600_000);
      assert.equal(h.sockets.length, 1);
      assert.deepEqual(h.of("disconnected"), [{ code, reason: "", willReconnect: false }]);
    });
  }
});

test("a link silent for two ping intervals (and 5 s) is replaced; the client pings meanwhile", async (t) => {
  const h = harness(t);
  await h.connect({ ping_interval_secs: 10 });
  h.tick(10_000);
  assert.equal(h.socket.frames("ping").length, 1);
  h.socket.receive({ type: "pong" });
  h.tick(20_000);
  assert.equal(h.sockets.length, 1, "a frame 20 s ago: still alive");
  h.tick(10_000);
  await flush();
  assert.equal(h.sockets[0]?.closedWith, 1000, "the dead socket is closed");
  assert.deepEqual(h.of("disconnected"), [{ code: 1006, reason: "no answer from the server", willReconnect: true }]);
  assert.equal(h.of("reconnecting").length, 1);
});

test("connect() skips a backoff wait; close() stops, fails what waits, and emits the last disconnected", async (t) => {
  const h = harness(t);
  await h.connect();
  h.socket.serverClose(1006);
  await flush();
  assert.equal(h.client.state, "reconnecting");
  const welcome = h.client.connect();
  await flush();
  assert.equal(h.sockets.length, 2, "connect() opened a socket without waiting");
  h.socket.welcome({ session_id: "s2" });
  assert.equal((await welcome).session_id, "s2");

  const joining = h.client.join("lobby");
  h.client.close();
  await assert.rejects(joining, (e: unknown) => e instanceof ChatError && e.code === "closed");
  assert.equal(h.sockets[1]?.closedWith, 1000);
  assert.deepEqual(h.of("disconnected").at(-1), { code: 1000, reason: "closed by the client", willReconnect: false });
  h.tick(600_000);
  assert.equal(h.sockets.length, 2);
});
