// Wire types of ChatCluster protocol v1, as described in docs/protocol.md. The source of truth is
// node/src/protocol.rs: change these with it. Types only: this module emits no code.

/** A position in a room's stream: the `offset` of a message in stream `epoch`. */
export interface StreamPosition {
  epoch: string;
  offset: number;
}

export interface User {
  id: string;
  name: string;
}

/** One room message, live or from history. */
export interface ChatMessage {
  room: string;
  offset: number;
  epoch: string;
  sender: User;
  body: string;
  /** Milliseconds since the Unix epoch, on the node that sequenced the message. */
  ts: number;
}

/** Codes of the server's `error` frames. */
export type ServerErrorCode =
  | "bad_request"
  | "unknown_type"
  | "invalid_room"
  | "not_joined"
  | "forbidden"
  | "rate_limited"
  | "too_many_rooms"
  | "already_joined"
  | "unavailable"
  | "internal"
  | "unsupported_data"
  | "draining";

/** The first frame of every connection. */
export interface Welcome {
  session_id: string;
  node_id: string;
  user: User;
  roles: string[];
  protocol: string;
  ping_interval_secs: number;
  /** The connection took over the session named by `?session=`: its rooms are rejoined. */
  resumed: boolean;
}

/** The answer to `join`: `offset` is the room's latest. */
export interface Joined {
  room: string;
  epoch: string;
  offset: number;
  /** Every message after the `since` of the join was delivered before this. */
  recovered: boolean;
}

/** The answer to `publish`: where the message (or, for a repeated key, its first copy) is. */
export interface Ack {
  room: string;
  offset: number;
  epoch: string;
}

/** One page of a room's history. */
export interface HistoryPage {
  room: string;
  epoch: string;
  messages: ChatMessage[];
  /** `false` when older messages than the ones asked for were already dropped. */
  complete: boolean;
  /** Messages after these were left out: ask again with `since` at the last one. */
  more: boolean;
}

/** One page of a room's members. */
export interface PresencePage {
  room: string;
  users: User[];
  /** Where the next page starts, when this one did not hold every user. */
  next?: number;
}

/** A user's first connection joined a room, or its last one left. */
export interface UserEvent {
  room: string;
  user: User;
}

type Request<T> = T & { id?: string };

export type ClientFrame =
  | Request<{ type: "join"; room: string; since?: StreamPosition }>
  | Request<{ type: "leave"; room: string }>
  | Request<{ type: "publish"; room: string; body: string; key?: string }>
  | Request<{ type: "history"; room: string; since?: StreamPosition; limit?: number }>
  | Request<{ type: "presence"; room: string; offset?: number }>
  | Request<{ type: "ping" }>;

type Answer<K extends string, T> = T & { type: K; id?: string };

export type ServerFrame =
  | ({ type: "welcome" } & Welcome)
  | Answer<"joined", Joined>
  | Answer<"left", { room: string }>
  | Answer<"ack", Ack>
  | ({ type: "message" } & ChatMessage)
  | Answer<"history", HistoryPage>
  | ({ type: "user_joined" | "user_left" } & UserEvent)
  | Answer<"presence", PresencePage>
  | Answer<"pong", {}>
  | Answer<"error", { code: ServerErrorCode; message: string }>;
