// Types of pattern-mesh/yjs, the Yjs provider.
import type * as Y from "yjs";
import type { Awareness } from "y-protocols/awareness";
import type { MeshClient, MeshClientOptions, MeshDocument } from "./pattern_mesh.js";

/** The `document` option of `MeshClient.connect` for a Y.Doc; remote updates it applies carry `origin` (default: the returned object). */
export function meshDocument(ydoc: Y.Doc, origin?: unknown): MeshDocument;

/** Options of `MeshProvider.connect`: the client's, plus the document's frame name and an awareness. */
export interface MeshProviderOptions extends Omit<MeshClientOptions, "document" | "persist"> {
  /** The name the Y.Doc's update frames carry (default `"content"`): 1 to 64 bytes of UTF-8, not `"*"`. */
  doc?: string;
  /** A y-protocols Awareness of the Y.Doc: its local state (cursor, user name and colour) becomes this client's presence, the others' presences become its remote states. */
  awareness?: Awareness;
}

/** Keeps a Y.Doc in sync through a pattern-mesh room. */
export class MeshProvider {
  /** Connects a client for `ydoc`; resolves once the room's updates are in it. Rejects as `MeshClient.connect` does, and with `InvalidArgument` for a Y.Doc that has a provider already (destroy it first). */
  static connect(ydoc: Y.Doc, options: MeshProviderOptions): Promise<MeshProvider>;
  /** The client: its events (`status`, `refused`, `anomaly`, ...) concern this document. */
  readonly client: MeshClient;
  readonly doc: Y.Doc;
  readonly awareness: Awareness | null;
  /** Whether an update of this Y.Doc will never reach the room: the relay refused it for good (a room at its size limit, or a member that may only read: what its Y.Doc held before connecting or loaded while connecting that the room lacks, or an edit, an observer's among them), or it could not be sent (larger than the relay accepts, a closed client). Yjs applies a client's edits in order, so no other member shows this Y.Doc's edits from that one on. The error listeners hear it when it happens. A new Y.Doc loaded from the room (a new provider) shares edits again. */
  readonly diverged: boolean;
  /** Calls `listener` when an update or the awareness state cannot be sent, the relay refuses an update of this Y.Doc for good (see `diverged`), another member's awareness state is refused (it does not decode, or speaks for a client id not its own), or the client has an `error` event (a `PanicError` stopped it: `diverged` turns true); returns a function that unsubscribes. Without listeners such errors go to `console.error`. */
  onError(listener: (error: Error) => void): () => void;
  /** Stops syncing (rejects with `InvalidArgument` for options that are not an object, or a `wait` below 0): sends what waits and, while the relay is reached, waits up to `wait` ms (default 5,000) for it to acknowledge them, sending what is edited meanwhile too; then removes the others' awareness states here and closes the client (the others see it leave). Resolves to the number of messages not acknowledged (the error listeners hear of any). */
  destroy(options?: { wait?: number }): Promise<number>;
}
