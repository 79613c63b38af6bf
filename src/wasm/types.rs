//! The TypeScript declarations of every object that crosses the JS boundary, and the opaque Rust
//! handles that name them in signatures, so the generated `.d.ts` has no `any` in its public API.

use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/// <reference lib="esnext.disposable" />
/** Any JSON value: what `data` frames and presence carry. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A room's pattern parameters. */
export interface PatternParams {
  /** The value at every multiple of `resetInterval`. */
  seed: number;
  /** What each value is multiplied by before it is collapsed. */
  multiplier: number;
  /** Steps per phase. */
  resetInterval: number;
}

/** Pattern parameters where each field is optional: omitted ones take the defaults 7, 7, 100. */
export type PatternParamsInit = Partial<PatternParams>;

/** Why a frame was refused. */
export type Reason =
  | "malformed" | "tooLarge" | "patternMismatch" | "senderMismatch" | "replay"
  | "futureStep" | "stale" | "desync" | "rateLimited" | "full" | "unexpected" | "unavailable"
  | "outOfOrder" | "forbidden";

/** Who sent a stamped frame, at which room step, with which pattern value. */
export interface Stamp {
  sender: number;
  step: number;
  pattern: number;
}

/** A room's settings, sent in every welcome. */
export interface RoomConfig {
  pattern: PatternParams;
  /** How far ahead of a receiver's clock a step may be. */
  maxFuture: number;
  /** How far behind the step of a data message or signal may be before it is stale (document messages never are); `null` keeps late messages. */
  staleWindow: number | null;
}

/** What a relay accepts from a connection, announced in its welcome. */
export interface RelayLimits {
  /** Largest frame, in bytes; larger messages travel in parts. */
  maxFrame: number;
  /** Largest message put back together from parts, in bytes. */
  maxMessage: number;
  /** Frames per second, on average. */
  rate: number;
  /** Frames at once, above the average. */
  burst: number;
  /** Bytes of stored messages (data and updates) per second, on average. */
  bandwidth: number;
  /** Bytes of stored messages at once, above the average. */
  bandwidthBurst: number;
}

/** A member of a room. */
export interface Peer {
  node: number;
  name: string;
}

/** A peer's latest presence. */
export interface PresenceEntry {
  node: number;
  name: string;
  data: Json;
}

/** One protocol frame; `kind` names the variant. */
export type Frame =
  | { kind: "join"; room: string; name: string; since: number; log?: number; resume?: Uint8Array | null; config?: RoomConfig | null; floor?: boolean }
  | { kind: "welcome"; node: number; resume: Uint8Array; config: RoomConfig; limits: RelayLimits; high: number; log: number; peers: Peer[]; floor?: number }
  | { kind: "caughtUp"; high: number; position: number }
  | { kind: "peerJoined"; peer: Peer }
  | { kind: "peerLeft"; node: number }
  | { kind: "ack"; step: number; position: number }
  | { kind: "reject"; step: number; reason: Reason; detail: string }
  | { kind: "presence"; sender: number; data: Json }
  | { kind: "part"; total: number; offset: number; bytes: Uint8Array }
  | { kind: "fence"; step: number }
  | { kind: "rename"; name: string }
  | { kind: "peerRenamed"; peer: Peer }
  | (Stamp & { kind: "data"; data: Json })
  | (Stamp & { kind: "signal"; data: Json })
  | (Stamp & { kind: "update"; doc: string; update: Uint8Array })
  | (Stamp & { kind: "checkpoint"; doc: string; stateVector: Uint8Array; deletes: string; digest: string })
  | (Stamp & { kind: "syncRequest"; doc: string; stateVector: Uint8Array; to: number })
  | (Stamp & { kind: "syncState"; doc: string; update: Uint8Array; to: number })
  | { kind: "snapshot"; doc: string; state: Uint8Array };

/** A decoded frame; `position` is the room log position the relay set on a stored message. */
export type Received = Frame & { position?: number };

/** The frames that carry a stamp and are validated. */
export type StampedFrame = Extract<Frame, Stamp>;

/** A step to send at, with its pattern value. */
export interface Tick {
  step: number;
  pattern: number;
}

/** How a clock moved. */
export interface Advance {
  from: number;
  to: number;
  /** The phase entered, when the move crossed a phase boundary. */
  enteredPhase: number | null;
}

/** Where a frame came from: straight from a connection (the relay's view), or forwarded to `receiver`. */
export type Origin = { connection: number } | { receiver: number };

/** The outcome of validating a frame. */
export type Verdict = { accepted: true } | { accepted: false; reason: Reason; detail: string };

/** Counts of verdicts: `accepted` and one entry per rejection reason. */
export type VerdictCounts = { accepted: number } & Record<Reason, number>;

/** A validator's settings; omitted fields take the defaults. */
export interface ValidatorOptions {
  /** The room's pattern (defaults 7, 7, 100). */
  pattern?: PatternParamsInit;
  /** How far ahead of the local clock a step may be (default 1000). */
  maxFuture?: number;
  /** How far behind the step of a data message or signal may be before it is stale (document messages never are); `null` (the default) keeps late messages. */
  staleWindow?: number | null;
  /** The most senders tracked at once (default 4096). */
  maxSenders?: number;
  /** A sender silent this long may be evicted when the table is full (default 600000). */
  idleAfterMs?: number;
}

/** Options of `MeshClient.connect`. */
export interface MeshClientOptions {
  /** The relay's WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`; or several relays that share one store (`--store redis://...`), tried in turn: after a failure or a drop the client connects to the next, with the same outbox and node. With `persist`, the first URL names the stored state. */
  url: string | string[];
  /** The room to join (1 to 128 bytes). */
  room: string;
  /** The display name others see. */
  name?: string;
  /** Settings for the room if this join creates it. */
  config?: RoomConfig;
  /** How long `connect` may try, in milliseconds, before it rejects with a `ConnectError` (default 10000). */
  connectTimeout?: number;
  /** Milliseconds between the heartbeats the client sends while joined, which the relay answers (default 15000). A connection that brings nothing for as long after a heartbeat went out (a network that went away without closing it: a laptop that slept, a changed Wi-Fi) is dropped with a `reconnecting` status that says so, and opened again. 0: no heartbeats (the relay then closes the connection after its idle timeout, 90 s by default, unless other frames keep it busy). */
  heartbeat?: number;
  /** The WebSocket class to connect with (default: the global one). Node before 22 has none: pass the `ws` package's. */
  WebSocket?: new (url: string) => unknown;
  /** Listeners added before the join, so that they hear the catch-up: the room's stored messages, the peers, the first status. */
  on?: { [K in keyof MeshEvents]?: (event: MeshEvents[K], reason?: string) => void };
  /** Keep the document and this tab's session (identity, log position, unsent messages) in IndexedDB (default false). `connect` then resolves as soon as the stored document is loaded, offline too; the client keeps trying to reach the relay (`connectTimeout` does not apply) and delivers what was stored, exactly once. Needs IndexedDB and Web Locks (https, or http on localhost), else `connect` rejects with a `StorageError`. */
  persist?: boolean;
  /** The access token, for a relay that checks tokens: a string, or a function that returns one (or a promise of one), called before every connection and reconnection, so that a token that expires is replaced without losing anything. Sent as the `token` parameter of the WebSocket URL. */
  token?: string | (() => string | Promise<string>);
  /** The application's document instead of the built-in one (`pattern-mesh/yjs` makes one from a `Y.Doc`: prefer its `MeshProvider`). Send its local updates with `sendUpdate`; `text()` is then unavailable, and `persist` is refused (persist the document beside the client, e.g. with y-indexeddb). Required in the transport-only build (`pattern-mesh/transport`), which has no document of its own. */
  document?: MeshDocument;
}

/** A document that lives outside the client and speaks Yjs v1 updates: what the client's session needs of it. Its methods are called while the client is busy and must not call the client back. A method that throws is an `error` event named `DocumentError`. */
export interface MeshDocument {
  /** Applies a validated remote update (any order, possibly more than once). */
  applyUpdate(update: Uint8Array): void;
  /** The document's state vector, v1 (`Y.encodeStateVector`). */
  stateVector(): Uint8Array;
  /** What a peer at `stateVector` lacks, as a v1 update; an empty `stateVector` asks for everything. */
  diff(stateVector: Uint8Array): Uint8Array;
  /** A Yjs snapshot, v1 (`Y.encodeSnapshot(Y.snapshot(doc))`): the version checkpoints compare. */
  snapshot(): Uint8Array;
  /** `[name, content]` of the root texts: what the checkpoint digest covers. */
  texts(): [string, string][];
  /** Merges updates into one (`Y.mergeUpdates`), so that edits waiting to be sent travel together. */
  mergeUpdates?(updates: Uint8Array[]): Uint8Array;
  /** Whether the document holds back remote updates until the parts they build on arrive (`ydoc.store.pendingStructs`); one held back for 10 s is a `desync` anomaly, and the room is asked for what is missing. */
  pending?(): boolean;
  /** The whole document as one v1 update without what it holds back (`Y.encodeStateAsUpdate` without `pendingStructs` and `pendingDs`): what the client gives back to a relay that lost the room's history, which takes no update that needs clocks no one wrote. Without it, `diff` of an empty state vector is given back, and refused whole if the document holds anything back. */
  whole?(): Uint8Array;
}

/** The client's connection status. */
export type Status = "connecting" | "open" | "reconnecting" | "closed";

/** A rejected frame: from the relay (a frame this client sent) or from local validation. */
export interface Anomaly {
  source: "relay" | "local";
  reason: Reason;
  detail: string;
  step: number;
  sender?: number;
}

/** A message of this client that the relay refused for good: it will never reach the room. */
export interface RefusedEvent {
  step: number;
  kind: "data" | "update";
  doc?: string;
  reason: Reason;
  detail: string;
}

/** Validated application data from a peer. */
export interface MessageEvent {
  sender: number;
  step: number;
  pattern: number;
  data: Json;
  /** `true` for a stored message (replayed to late joiners), `false` for one sent with `{ durable: false }`. */
  durable: boolean;
}

/** Options of `MeshClient.broadcast`. */
export interface BroadcastOptions {
  /** `false`: the relay passes the message on to the members present and never stores it (default `true`). */
  durable?: boolean;
}

/** The room step moved. */
export interface StepEvent {
  step: number;
  pattern: number;
  phase: number;
}

/** The members changed. */
export interface PeersEvent {
  peers: Peer[];
  joined?: Peer;
  left?: number;
  /** A peer that changed its name (`setName`), with the new name. */
  renamed?: Peer;
}

/** Messages of this client wait for its pacer, which keeps it a little under the rate and bandwidth the relay announced (after a paste of tens of megabytes, or once `rateLimited` refusals slowed the pace): told when what waits will take a second or more to go out, again when that wait has doubled, and with `waitMs` 0 when nothing waits for the pacer any more (it all went out, or the connection dropped: `status` says so). */
export interface PacedEvent {
  /** About how many milliseconds until what waits now has gone out; 0: the wait is over. */
  waitMs: number;
  /** Stored messages not yet acknowledged (`pendingCount`). */
  messages: number;
}

/** Ephemeral state from a peer. */
export interface PresenceEvent {
  sender: number;
  data: Json;
}

/** The events of a `MeshClient` and what their listeners receive. */
export interface MeshEvents {
  message: MessageEvent;
  anomaly: Anomaly;
  refused: RefusedEvent;
  peers: PeersEvent;
  status: Status;
  step: StepEvent;
  presence: PresenceEvent;
  paced: PacedEvent;
  /** The module panicked: an `Error` named `PanicError` that says what failed and how many messages were not delivered (the client is closed; `MeshClient.connect` works again and rejoins the room). Or, with `persist`, a `StorageError`: a write to IndexedDB failed (messages wait until a retry succeeds), or a stored record could not be read. Or a `DocumentError`: a method of the application's `document` threw or returned the wrong type. */
  error: Error;
}

export interface MeshClient {
  /** Subscribes to an event; returns a function that unsubscribes. A `status` listener also gets the reason (a close code, a timeout) when the status is not `open`. */
  on<K extends keyof MeshEvents>(event: K, listener: (event: MeshEvents[K], reason?: string) => void): () => void;
  /** Removes a listener added with `on`. */
  off<K extends keyof MeshEvents>(event: K, listener: (event: MeshEvents[K], reason?: string) => void): void;
}

/** One step of a text change. */
export type TextDelta = { retain: number } | { insert: string } | { delete: number };

/** Called after every change of a shared text. */
export type TextListener = (delta: TextDelta[], origin: "local" | "remote") => void;

/** Called when a clock enters a new phase. */
export type PhaseListener = (phase: number, step: number) => void;
"#;

#[wasm_bindgen]
extern "C" {
    /// `PatternParams` in TypeScript.
    #[wasm_bindgen(typescript_type = "PatternParams")]
    pub type JsPatternParams;
    /// `PatternParamsInit` in TypeScript.
    #[wasm_bindgen(typescript_type = "PatternParamsInit")]
    pub type JsPatternParamsInit;
    /// `Frame` in TypeScript.
    #[wasm_bindgen(typescript_type = "Frame")]
    pub type JsFrame;
    /// `Received` in TypeScript.
    #[wasm_bindgen(typescript_type = "Received")]
    pub type JsReceived;
    /// `StampedFrame | Uint8Array` in TypeScript.
    #[wasm_bindgen(typescript_type = "StampedFrame | Uint8Array")]
    pub type JsFrameOrBytes;
    /// `Tick` in TypeScript.
    #[wasm_bindgen(typescript_type = "Tick")]
    pub type JsTick;
    /// `Advance` in TypeScript.
    #[wasm_bindgen(typescript_type = "Advance")]
    pub type JsAdvance;
    /// `Origin` in TypeScript.
    #[wasm_bindgen(typescript_type = "Origin")]
    pub type JsOrigin;
    /// `Verdict` in TypeScript.
    #[wasm_bindgen(typescript_type = "Verdict")]
    pub type JsVerdict;
    /// `VerdictCounts` in TypeScript.
    #[wasm_bindgen(typescript_type = "VerdictCounts")]
    pub type JsVerdictCounts;
    /// `ValidatorOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "ValidatorOptions")]
    pub type JsValidatorOptions;
    /// `PhaseListener` in TypeScript.
    #[wasm_bindgen(typescript_type = "PhaseListener")]
    pub type JsPhaseListener;
    /// `MeshClientOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "MeshClientOptions")]
    pub type JsMeshClientOptions;
    /// `BroadcastOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "BroadcastOptions")]
    pub type JsBroadcastOptions;
    /// `TextListener` in TypeScript.
    #[wasm_bindgen(typescript_type = "TextListener")]
    pub type JsTextListener;
    /// `Json` in TypeScript.
    #[wasm_bindgen(typescript_type = "Json")]
    pub type JsJson;
    /// `Peer[]` in TypeScript.
    #[wasm_bindgen(typescript_type = "Peer[]")]
    pub type JsPeers;
    /// `PresenceEntry[]` in TypeScript.
    #[wasm_bindgen(typescript_type = "PresenceEntry[]")]
    pub type JsPresences;
    /// `() => void` in TypeScript.
    #[wasm_bindgen(typescript_type = "() => void")]
    pub type JsUnsubscribe;
}
