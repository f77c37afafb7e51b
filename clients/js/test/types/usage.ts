// Compiled (never run) against the emitted declarations, without the DOM library: what an app
// writes type-checks, and the mistakes marked @ts-expect-error do not.
import WebSocket from "ws";
import {
  ChatClient,
  ChatError,
  type Ack,
  type ChatMessage,
  type ErrorCode,
  type HistoryPage,
  type JoinedEvent,
  type PresencePage,
  type StreamPosition,
  type Welcome,
} from "@chatcluster/client";

export async function usage(): Promise<void> {
  const client = new ChatClient({ url: "wss://chat.example/ws", getToken: async () => "jwt", WebSocket });
  const off = client.on("message", (m: ChatMessage) => console.log(m.room, m.epoch, m.offset, m.sender.name, m.body, m.ts));
  off();
  client.on("disconnected", ({ code, reason, willReconnect }) => console.log(code + 1, reason.trim(), !willReconnect));
  client.on("reconnecting", ({ attempt, delayMs }) => console.log(attempt + delayMs));
  client.on("joined", (e: JoinedEvent) => console.log(e.recovered && e.rejoined, e.offset + 1));
  client.on("user_joined", ({ room, user }) => console.log(room, user.id));
  client.on("error", (e: ChatError) => {
    const code: ErrorCode = e.code;
    console.log(code, e.message);
  });
  // @ts-expect-error: no such event
  client.on("messages", () => {});
  // @ts-expect-error: a message has no `text`
  client.on("message", (m) => m.text);

  const welcome: Welcome = await client.connect();
  console.log(welcome.session_id, welcome.resumed, client.state === "connected");
  const joined: JoinedEvent = await client.join("lobby");
  const ack: Ack = await client.publish("lobby", "hi", { key: "k1" });
  // @ts-expect-error: bodies are strings
  await client.publish("lobby", 42);
  const since: StreamPosition = { epoch: ack.epoch, offset: joined.offset };
  const page: HistoryPage = await client.history("lobby", { since, limit: 10 });
  for await (const more of client.historyPages("lobby", since)) console.log(more.more, page.complete);
  const members: PresencePage = await client.presence("lobby");
  for await (const p of client.presencePages("lobby")) console.log(p.users.length, members.next);
  await client.leave("lobby");
  try {
    await client.publish("lobby", "late");
  } catch (e) {
    if (e instanceof ChatError && e.code === "not_joined") client.close();
  }
}
