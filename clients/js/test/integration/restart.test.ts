// A node killed and started again under a client that keeps publishing.
import assert from "node:assert/strict";
import { test } from "node:test";
import type { ChatMessage, JoinedEvent } from "@chatcluster/client";
import { ChatNode, client, mintToken, waitFor } from "./node.js";

test("node restart: every acked publish is delivered once, in order, none lost; the rooms resume", async (t) => {
  // Tokens, not anonymous mode: idempotency keys are per user, and every anonymous connection
  // is a user of its own.
  const secret = "restart-test-secret-0123456789";
  const node = await ChatNode.start({ toml: `[auth]\nmode = "jwt"\njwt_secret = "${secret}"`, disk: true });
  t.after(() => node.stop());
  const as = (sub: string) => ({ url: node.url(), getToken: () => mintToken(secret, sub, 3600), backoffMaxMs: 1000 });
  const publisher = client(as("pub"));
  const reader = client(as("reader"));
  t.after(() => {
    publisher.close();
    reader.close();
  });
  const received: ChatMessage[] = [];
  reader.on("message", (m) => received.push(m));
  const rejoins: JoinedEvent[] = [];
  reader.on("joined", (e) => e.rejoined && rejoins.push(e));
  let publisherDrops = 0;
  publisher.on("disconnected", () => publisherDrops++);
  await publisher.connect();
  await reader.connect();
  await publisher.join("r");
  await reader.join("r");

  // One publish at a time, so their order is the order they must arrive in.
  const acked: string[] = [];
  let spanning = 0; // publishes that were under way when the connection went
  let stop = false;
  const publishing = (async () => {
    for (let i = 0; i < 2000 && !stop; i++) {
      const drops = publisherDrops;
      await publisher.publish("r", `m${i}`);
      acked.push(`m${i}`);
      if (publisherDrops > drops) spanning++;
    }
  })();

  await waitFor("20 acked publishes", () => acked.length >= 20);
  await node.kill();
  await node.run();
  const before = acked.length;
  await waitFor("20 more acked publishes after the restart", () => acked.length >= before + 20);
  stop = true;
  await publishing;

  await waitFor("the reader to catch up", () => received.length >= acked.length);
  assert.deepEqual(
    received.map((m) => m.body),
    acked,
    "the reader got exactly the acked publishes, each once, in order",
  );
  const [epoch] = new Set(received.map((m) => m.epoch));
  assert.deepEqual(
    received.map((m) => `${m.epoch}/${m.offset}`),
    received.map((_, i) => `${epoch}/${i + 1}`),
    "one stream, offsets 1, 2, 3, … with no gap",
  );
  assert.ok(spanning >= 1, "a publish was under way across the restart");
  assert.deepEqual(
    rejoins.map((e) => [e.room, e.recovered]),
    [["r", true]],
    "the reader rejoined once, without losing anything",
  );
});
