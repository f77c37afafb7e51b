// Tokens: refreshed before `exp`, and after close 4500 a reconnect only with a new one.
import assert from "node:assert/strict";
import { test } from "node:test";
import { NOW, flush, harness, jwt } from "./harness.js";

const secs = (ms: number) => Math.floor(ms / 1000);

/** A token source that hands out `tokens` in turn (the last one again once they run out). */
function tokens(...list: string[]) {
  let calls = 0;
  const source = () => list[Math.min(calls++, list.length - 1)] as string;
  return Object.assign(source, { calls: () => calls });
}

test("reconnects with a fresh token a minute before exp, resuming the session", async (t) => {
  const first = jwt(secs(NOW) + 3600);
  const second = jwt(secs(NOW) + 7200);
  const getToken = tokens(first, second);
  const h = harness(t, { getToken });
  await h.connect({ ping_interval_secs: 3600 }); // no heartbeat verdict within the hour
  assert.equal(h.socket.query("token"), first);

  await h.advance(3540_000 - 1);
  assert.equal(getToken.calls(), 1, "not yet");
  await h.advance(1);
  assert.equal(getToken.calls(), 2, "59 minutes in: a new token is asked for");
  assert.equal(h.sockets.length, 2);
  assert.equal(h.sockets[0]?.closedWith, 1000, "the old connection is closed");
  assert.equal(h.socket.query("token"), second);
  assert.equal(h.socket.query("session"), "s1");
  assert.deepEqual(h.of("disconnected"), [{ code: 1000, reason: "token refresh", willReconnect: true }]);
  assert.deepEqual(h.of("reconnecting"), [{ attempt: 1, delayMs: 0, moving: false, reason: "token refresh" }]);
});

test("a short-lived token is refreshed halfway through its lifetime", async (t) => {
  const getToken = tokens(jwt(secs(NOW) + 8), jwt(secs(NOW) + 16));
  const h = harness(t, { getToken });
  await h.connect();
  await h.advance(3999);
  assert.equal(h.sockets.length, 1);
  await h.advance(1);
  assert.equal(h.sockets.length, 2, "reconnected 4 s into an 8 s token");
});

test("no fresher token: the connection stays until 4500, then the client stops", async (t) => {
  const token = jwt(secs(NOW) + 8);
  const getToken = tokens(token);
  const h = harness(t, { getToken });
  await h.connect();
  h.tick(4000);
  await flush();
  assert.equal(getToken.calls(), 2, "asked at the refresh time");
  assert.equal(h.sockets.length, 1, "the same token: no reconnect");

  h.tick(4000);
  h.socket.serverClose(4500, "token expired");
  await flush();
  assert.equal(getToken.calls(), 3, "asked once more after 4500");
  h.tick(600_000);
  await flush();
  assert.equal(h.sockets.length, 1);
  assert.equal(h.client.state, "closed");
  assert.deepEqual(h.of("disconnected"), [{ code: 4500, reason: "token expired", willReconnect: false }]);
});

test("after 4500 a new token reconnects, with backoff", async (t) => {
  const fresh = jwt(secs(NOW) + 7200);
  const h = harness(t, { getToken: tokens(jwt(secs(NOW) + 3600), fresh) });
  await h.connect();
  h.socket.serverClose(4500);
  await flush();
  assert.deepEqual(h.of("disconnected"), [{ code: 4500, reason: "", willReconnect: true }]);
  h.tick(499);
  await flush();
  assert.equal(h.sockets.length, 1);
  h.tick(1);
  await flush();
  assert.equal(h.sockets.length, 2);
  assert.equal(h.socket.query("token"), fresh);
});

test("a failing token source is reported and retried with backoff", async (t) => {
  let fail = true;
  const h = harness(t, {
    getToken: () => {
      if (fail) throw new Error("auth server down");
      return "tok";
    },
  });
  const welcome = h.client.connect();
  await flush();
  assert.equal(h.sockets.length, 0);
  assert.equal(h.of("error")[0]?.code, "token");
  assert.equal(h.of("reconnecting")[0]?.delayMs, 0.999 * 500);
  fail = false;
  h.tick(500);
  await flush();
  h.socket.welcome();
  await welcome;
  assert.equal(h.socket.query("token"), "tok");
});
