// Requests: answers matched by id, publishes retried under one idempotency key, paging.
import assert from "node:assert/strict";
import { test } from "node:test";
import { ChatError } from "@chatcluster/client";
import { flush, harness, message } from "./harness.js";

const isCode = (code: string) => (e: unknown) => e instanceof ChatError && e.code === code;

test("answers find their requests by id, in any order; errors reject only their own", async (t) => {
  const h = harness(t);
  await h.connect();
  const newest = h.client.history("lobby", { limit: 1 });
  const older = h.client.history("lobby", { since: { epoch: "e1", offset: 0 } });
  const refused = h.client.history("vault");
  const [first, second, third] = h.socket.frames("history");
  assert.deepEqual(
    h.socket.frames("history").map(({ id, ...frame }) => frame),
    [
      { type: "history", room: "lobby", limit: 1 },
      { type: "history", room: "lobby", since: { epoch: "e1", offset: 0 } },
      { type: "history", room: "vault" },
    ],
  );
  assert.equal(new Set([first?.id, second?.id, third?.id]).size, 3, "every request has its own id");

  const page = (offset: number) => ({ type: "history", room: "lobby", epoch: "e1", complete: true, more: false, messages: [message("lobby", "e1", offset)] });
  h.socket.receive({ ...page(1), id: second?.id });
  h.socket.receive({ type: "error", id: third?.id, code: "not_joined", message: "join vault first" });
  h.socket.receive({ ...page(9), id: first?.id });
  h.socket.receive({ ...page(5), id: "r999" }); // nobody's: ignored
  h.socket.receive({ type: "error", code: "rate_limited", message: "at most 50 frames per second" });

  assert.equal((await older).messages[0]?.offset, 1);
  assert.equal((await newest).messages[0]?.offset, 9);
  await assert.rejects(refused, (e: unknown) => isCode("not_joined")(e) && (e as Error).message === "join vault first");
  assert.deepEqual(h.of("error").map((e) => e.code), ["rate_limited"], "an error without id is an event");
});

test("an unanswered request fails with timeout", async (t) => {
  const h = harness(t, { requestTimeoutMs: 1000 });
  await h.connect();
  const presence = h.client.presence("lobby");
  h.tick(1000);
  await assert.rejects(presence, isCode("timeout"));
});

test("publish: a random key per publish unless given", async (t) => {
  const h = harness(t);
  await h.connect();
  const unanswered = () => {}; // these fail with "closed" when the test closes the client
  h.client.publish("lobby", "a").catch(unanswered);
  h.client.publish("lobby", "b").catch(unanswered);
  h.client.publish("lobby", "c", { key: "my-key" }).catch(unanswered);
  const keys = h.socket.frames("publish").map((f) => f.key);
  assert.match(String(keys[0]), /^[0-9a-f]{32}$/);
  assert.notEqual(keys[0], keys[1]);
  assert.equal(keys[2], "my-key");
});

test("publish: unavailable is retried with the same key after a backoff, up to the attempt limit", async (t) => {
  const h = harness(t, { publishAttempts: 3 });
  await h.connect();
  const published = h.client.publish("lobby", "hello");
  const unavailable = { type: "error", code: "unavailable", message: "no quorum" };
  h.socket.answer("publish", unavailable);
  h.tick(0.999 * 500 - 1);
  assert.equal(h.socket.frames("publish").length, 1, "waits for the backoff");
  h.tick(1);
  h.socket.answer("publish", unavailable);
  h.tick(0.999 * 1000);
  h.socket.answer("publish", unavailable);
  await assert.rejects(published, (e: unknown) => isCode("unavailable")(e) && (e as Error).message === "no quorum");
  const sends = h.socket.frames("publish");
  assert.equal(sends.length, 3);
  assert.equal(new Set(sends.map((f) => f.key)).size, 1, "one key for every attempt");
});

test("publish: a connection lost before the ack resends the same key; the ack settles it", async (t) => {
  const h = harness(t);
  await h.connect();
  const joined = h.client.join("lobby");
  h.socket.answer("join", { type: "joined", room: "lobby", epoch: "e1", offset: 0, recovered: false });
  await joined;
  const published = h.client.publish("lobby", "hello");
  const { key } = h.socket.last("publish");

  h.setRandom(0);
  h.socket.serverClose(1006);
  await h.advance(0);
  h.socket.welcome({ session_id: "s2" });
  assert.deepEqual(
    h.socket.sent.map((f) => f.type),
    ["join", "publish"],
    "rejoin first, then the publish, so it finds its room joined",
  );
  assert.equal(h.socket.last("publish").key, key);
  h.socket.answer("publish", { type: "ack", room: "lobby", epoch: "e1", offset: 1 });
  assert.deepEqual(await published, { room: "lobby", epoch: "e1", offset: 1 });
});

test("publish: connections lost before the ack count as attempts too", async (t) => {
  const h = harness(t, { publishAttempts: 2 });
  await h.connect();
  const published = h.client.publish("lobby", "hello");
  h.setRandom(0);
  for (const session of ["s2", "s3"]) {
    h.socket.serverClose(1006);
    await h.advance(0);
    h.socket.welcome({ session_id: session });
  }
  await assert.rejects(published, isCode("unavailable"));
  assert.deepEqual(
    h.sockets.map((s) => s.frames("publish").length),
    [1, 1, 0],
    "sent twice, then given up",
  );
});

test("requests made while offline wait for the connection", async (t) => {
  const h = harness(t);
  const joined = h.client.join("lobby");
  const published = h.client.publish("lobby", "early");
  await h.connect();
  assert.deepEqual(h.socket.sent.map((f) => f.type), ["join", "publish"]);
  h.socket.answer("join", { type: "joined", room: "lobby", epoch: "e1", offset: 0, recovered: false });
  h.socket.answer("publish", { type: "ack", room: "lobby", epoch: "e1", offset: 1 });
  assert.equal((await joined).rejoined, false);
  assert.equal((await published).offset, 1);
});

test("presencePages follows next; historyPages follows more from the last message", async (t) => {
  const h = harness(t);
  await h.connect();
  const user = (name: string) => ({ id: name, name });
  const seen: string[] = [];
  const presence = (async () => {
    for await (const page of h.client.presencePages("lobby")) seen.push(...page.users.map((u) => u.name));
  })();
  await flush();
  assert.equal(h.socket.last("presence").offset, undefined);
  h.socket.answer("presence", { type: "presence", room: "lobby", users: [user("a"), user("b")], next: 2 });
  await flush();
  assert.equal(h.socket.last("presence").offset, 2);
  h.socket.answer("presence", { type: "presence", room: "lobby", users: [user("c")] });
  await presence;
  assert.deepEqual(seen, ["a", "b", "c"]);
  assert.equal(h.socket.frames("presence").length, 2);

  const bodies: string[] = [];
  const history = (async () => {
    for await (const page of h.client.historyPages("lobby", { epoch: "e1", offset: 0 }, 2)) {
      bodies.push(...page.messages.map((m) => m.body));
    }
  })();
  const page = (offsets: number[], more: boolean) => ({
    type: "history",
    room: "lobby",
    epoch: "e1",
    complete: true,
    more,
    messages: offsets.map((o) => message("lobby", "e1", o)),
  });
  await flush();
  h.socket.answer("history", page([1, 2], true));
  await flush();
  assert.deepEqual(h.socket.last("history").since, { epoch: "e1", offset: 2 });
  assert.equal(h.socket.last("history").limit, 2);
  h.socket.answer("history", page([3], false));
  await history;
  assert.deepEqual(bodies, ["m1", "m2", "m3"]);
  assert.equal(h.socket.frames("history").length, 2);
});
