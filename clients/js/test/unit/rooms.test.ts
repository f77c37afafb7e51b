// Rooms across reconnects: rejoined from the last offset seen, each message delivered once,
// `recovered: false` when something may be missing.
import assert from "node:assert/strict";
import { test } from "node:test";
import { flush, harness, message } from "./harness.js";

/** A client joined to "lobby" (epoch e1, head 2) that then saw messages 3–5. */
async function joinedLobby(t: Parameters<typeof harness>[0]) {
  const h = harness(t);
  await h.connect();
  const joined = h.client.join("lobby");
  h.socket.answer("join", { type: "joined", room: "lobby", epoch: "e1", offset: 2, recovered: false });
  assert.deepEqual(await joined, { room: "lobby", epoch: "e1", offset: 2, recovered: false, rejoined: false });
  for (const offset of [3, 4, 5]) h.socket.receive(message("lobby", "e1", offset));
  return h;
}

/** Drops the connection and lets the client open the next one (at once: jitter 0). */
async function reconnect(h: ReturnType<typeof harness>) {
  h.setRandom(0);
  h.socket.serverClose(1006);
  await h.advance(0);
}

const offsets = (h: ReturnType<typeof harness>) => h.of("message").map((m) => `${m.epoch}/${m.offset}`);

test("a resumed session's repeats never reach the app; the rejoin goes on from the last offset", async (t) => {
  const h = await joinedLobby(t);
  await reconnect(h);
  assert.equal(h.socket.query("session"), "s1");
  h.socket.welcome({ resumed: true });
  // The session rejoins its rooms from where they were joined (offset 2), then our join comes in.
  for (const offset of [3, 4, 5, 6]) h.socket.receive(message("lobby", "e1", offset));
  h.socket.receive({ type: "joined", room: "lobby", epoch: "e1", offset: 6, recovered: true });
  assert.deepEqual(h.socket.last("join").since, { epoch: "e1", offset: 5 }, "join resumes after the last message seen");
  h.socket.answer("join", { type: "error", code: "already_joined", message: "already joined lobby" });
  await flush();

  assert.deepEqual(offsets(h), ["e1/3", "e1/4", "e1/5", "e1/6"], "3–5 once, then 6");
  assert.deepEqual(h.of("joined").at(-1), { room: "lobby", epoch: "e1", offset: 6, recovered: true, rejoined: true });
  assert.deepEqual(h.of("error"), [], "the join the session made needless is no error");
  assert.deepEqual(h.client.position("lobby"), { epoch: "e1", offset: 6 });
});

test("what the client saw counts: the session's older position alone does not mean messages were lost", async (t) => {
  const h = await joinedLobby(t);
  await reconnect(h);
  h.socket.welcome({ resumed: true });
  // The ring dropped 3, so the server's session (joined at 2) is not recovered; we have 3 though.
  for (const offset of [4, 5, 6]) h.socket.receive(message("lobby", "e1", offset));
  h.socket.receive({ type: "joined", room: "lobby", epoch: "e1", offset: 6, recovered: false });
  assert.equal(h.of("joined").at(-1)?.recovered, true);
});

test("a gap, or a new epoch, is reported as not recovered", async (t) => {
  await t.test("gap", async (t) => {
    const h = await joinedLobby(t);
    await reconnect(h);
    h.socket.welcome();
    for (const offset of [8, 9]) h.socket.receive(message("lobby", "e1", offset));
    h.socket.answer("join", { type: "joined", room: "lobby", epoch: "e1", offset: 9, recovered: false });
    assert.deepEqual(offsets(h).slice(3), ["e1/8", "e1/9"]);
    assert.deepEqual(h.of("joined").at(-1), { room: "lobby", epoch: "e1", offset: 9, recovered: false, rejoined: true });
  });
  await t.test("new epoch", async (t) => {
    const h = await joinedLobby(t);
    await reconnect(h);
    h.socket.welcome();
    for (const offset of [1, 2]) h.socket.receive(message("lobby", "e2", offset));
    h.socket.answer("join", { type: "joined", room: "lobby", epoch: "e2", offset: 2, recovered: false });
    assert.deepEqual(offsets(h).slice(3), ["e2/1", "e2/2"], "a new epoch starts over at 1: not taken for repeats");
    assert.equal(h.of("joined").at(-1)?.recovered, false);
    assert.deepEqual(h.client.position("lobby"), { epoch: "e2", offset: 2 });
  });
});

test("a fresh connection rejoins with since and takes the server's recovered", async (t) => {
  const h = await joinedLobby(t);
  await reconnect(h);
  h.socket.welcome({ session_id: "s2" });
  assert.deepEqual(h.socket.last("join").since, { epoch: "e1", offset: 5 });
  h.socket.receive(message("lobby", "e1", 6));
  h.socket.answer("join", { type: "joined", room: "lobby", epoch: "e1", offset: 6, recovered: true });
  assert.deepEqual(h.of("joined").at(-1), { room: "lobby", epoch: "e1", offset: 6, recovered: true, rejoined: true });
  h.socket.receive(message("lobby", "e1", 7));
  assert.deepEqual(offsets(h), ["e1/3", "e1/4", "e1/5", "e1/6", "e1/7"]);
});

test("a room left while offline is left again when the resumed session brings it back", async (t) => {
  const h = await joinedLobby(t);
  await reconnect(h);
  await h.client.leave("lobby");
  assert.deepEqual(h.of("left"), [{ room: "lobby" }]);
  h.socket.welcome({ resumed: true });
  assert.deepEqual(h.socket.frames("join"), [], "no rejoin");
  h.socket.receive(message("lobby", "e1", 6));
  h.socket.receive({ type: "joined", room: "lobby", epoch: "e1", offset: 6, recovered: true });
  assert.deepEqual(h.socket.sent, [{ type: "leave", room: "lobby" }]);
  assert.equal(h.of("joined").length, 1, "only the first join");
  assert.deepEqual(offsets(h), ["e1/3", "e1/4", "e1/5"]);
});

test("presence changes and messages of other rooms are not the app's", async (t) => {
  const h = await joinedLobby(t);
  const bob = { id: "u2", name: "Bob" };
  h.socket.receive({ type: "user_joined", room: "lobby", user: bob });
  h.socket.receive({ type: "user_left", room: "elsewhere", user: bob });
  h.socket.receive(message("elsewhere", "e9", 1));
  assert.deepEqual(h.of("user_joined"), [{ room: "lobby", user: bob }]);
  assert.deepEqual(h.of("user_left"), []);
  assert.equal(h.of("message").length, 3);
});
