// Two clients chat through a real node (anonymous mode).
import assert from "node:assert/strict";
import { test } from "node:test";
import { SUBPROTOCOL, type ChatMessage, type UserEvent } from "@chatcluster/client";
import { ChatNode, client, waitFor } from "./node.js";

test("two clients chat: join, presence, publish, deliveries, history, leave", async (t) => {
  const node = await ChatNode.start({ toml: `[auth]\nmode = "anonymous"` });
  t.after(() => node.stop());
  const alice = client({ url: node.url("?name=alice") });
  const bob = client({ url: node.url("?name=bob") });
  t.after(() => {
    alice.close();
    bob.close();
  });
  const inbox = { alice: [] as ChatMessage[], bob: [] as ChatMessage[] };
  alice.on("message", (m) => inbox.alice.push(m));
  bob.on("message", (m) => inbox.bob.push(m));
  const aliceSaw: UserEvent[] = [];
  alice.on("user_left", (e) => aliceSaw.push(e));

  const welcome = await alice.connect();
  assert.equal(welcome.protocol, SUBPROTOCOL);
  assert.equal(welcome.user.name, "alice");
  await alice.join("lobby");
  await bob.connect();
  const joined = await bob.join("lobby");
  assert.equal(joined.rejoined, false);

  const members: string[] = [];
  for await (const page of alice.presencePages("lobby")) members.push(...page.users.map((u) => u.name));
  assert.deepEqual(members.sort(), ["alice", "bob"]);

  const first = await alice.publish("lobby", "hello bob");
  const second = await bob.publish("lobby", "hi alice");
  assert.equal(second.offset, first.offset + 1);
  await waitFor("both messages at both clients", () => inbox.alice.length === 2 && inbox.bob.length === 2);
  for (const received of [inbox.alice, inbox.bob]) {
    assert.deepEqual(
      received.map((m) => [m.sender.name, m.body, m.offset]),
      [
        ["alice", "hello bob", first.offset],
        ["bob", "hi alice", second.offset],
      ],
    );
  }

  const history = await bob.history("lobby", { limit: 10 });
  assert.deepEqual(history.messages.map((m) => m.body), ["hello bob", "hi alice"]);

  await bob.leave("lobby");
  await waitFor("alice to see bob leave", () => aliceSaw.some((e) => e.user.name === "bob"));
  await assert.rejects(bob.publish("lobby", "gone"), { code: "not_joined" });
});
