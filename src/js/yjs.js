// pattern-mesh/yjs: a Yjs provider. Any Y.Doc (texts, maps, arrays, XML, rich text) travels
// through a pattern-mesh relay: its local updates go out as stamped, validated, durably logged
// update frames; validated remote updates are applied to it; sync requests are answered from
// it; and Yjs awareness (cursors, user names and colours) rides on the client's presence.
//
// The client calls the Y.Doc while it is busy: nothing here calls the client back from a Y.Doc
// or awareness event; what goes out is collected and sent in a microtask.
import * as Y from "yjs";
import {
  applyAwarenessUpdate,
  encodeAwarenessUpdate,
  removeAwarenessStates,
} from "y-protocols/awareness";
import { MeshClient } from "./pattern_mesh.js";

/**
 * The `document` option of `MeshClient.connect` for a Y.Doc: what the client's session needs of
 * a document. Remote updates it applies carry `origin` as their transaction origin (by default
 * the returned object itself, never `null`, which Y.UndoManager tracks as local): send the
 * updates of every other origin with `client.sendUpdate`.
 */
export function meshDocument(ydoc, origin) {
  const document = {
    applyUpdate: (update) => Y.applyUpdate(ydoc, update, origin === undefined ? document : origin),
    stateVector: () => Y.encodeStateVector(ydoc),
    diff: (stateVector) =>
      stateVector.length === 0 ? Y.encodeStateAsUpdate(ydoc) : Y.encodeStateAsUpdate(ydoc, stateVector),
    snapshot: () => Y.encodeSnapshot(Y.snapshot(ydoc)),
    texts: () => texts(ydoc),
    mergeUpdates: (updates) => Y.mergeUpdates(updates),
    // Updates Yjs holds back until the parts they build on arrive.
    pending: () => ydoc.store.pendingStructs !== null || ydoc.store.pendingDs !== null,
    whole: () => integratedState(ydoc),
  };
  return document;
}

/**
 * The Y.Doc's whole state without what Yjs holds back (updates and deletes waiting for clocks it
 * never received): it shows none of that, and the relay takes no update that needs clocks no one
 * wrote, so with it the rest would not reach the room either.
 */
function integratedState(ydoc) {
  const store = ydoc.store;
  const { pendingStructs, pendingDs } = store;
  store.pendingStructs = null;
  store.pendingDs = null;
  try {
    return Y.encodeStateAsUpdate(ydoc);
  } finally {
    store.pendingStructs = pendingStructs;
    store.pendingDs = pendingDs;
  }
}

/** [name, content] of every root type's text, as the built-in document counts it for digests. */
function texts(ydoc) {
  const out = [];
  for (const [name, type] of ydoc.share) {
    // Maps, arrays and XML fragments hold no string items at their top level. The built-in
    // document never opens a root as XML, so it counts a root XmlText's strings as here.
    let content = "";
    for (let item = type._start; item !== null; item = item.right) {
      if (!item.deleted && item.content instanceof Y.ContentString) content += item.content.str;
    }
    out.push([name, content]);
  }
  return out;
}

/** The one client id an awareness update holds (lib0 varuints: count, then client id), or null. */
function soleClient(update) {
  let at = 0;
  const varUint = () => {
    let value = 0;
    for (let shift = 0; shift < 53; shift += 7) {
      if (at >= update.length) return null;
      const byte = update[at++];
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return value;
    }
    return null;
  };
  return varUint() === 1 ? varUint() : null;
}

const toBase64 = (bytes) => {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
};
const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

/**
 * Keeps a Y.Doc in sync through a pattern-mesh room.
 *
 * ```js
 * import * as Y from "yjs";
 * import { Awareness } from "y-protocols/awareness";
 * import { MeshProvider } from "pattern-mesh/yjs";
 * const ydoc = new Y.Doc();
 * const awareness = new Awareness(ydoc);
 * const provider = await MeshProvider.connect(ydoc, { url, room: "notes", name: "ada", awareness });
 * ```
 */
export class MeshProvider {
  /**
   * Connects a client for `ydoc` (options as `MeshClient.connect`'s, without `document` and
   * `persist`, plus `doc`, the name update frames carry, default `"content"`, and `awareness`,
   * a y-protocols `Awareness` of `ydoc`). A Y.Doc has one provider at a time: connecting a
   * second before the first is destroyed throws `InvalidArgument`. `on.error` hears the
   * client's errors and the provider's (see `onError`), from the start of the connect.
   * Resolves once the room's updates are in `ydoc`; rejects as `MeshClient.connect` does.
   */
  static async connect(ydoc, options = {}) {
    if (!(ydoc instanceof Y.Doc)) throw invalid(`MeshProvider.connect needs a Y.Doc, got ${typeof ydoc}`);
    if (typeof options !== "object" || options === null) throw invalid("the options must be an object");
    if ("document" in options) throw invalid("the provider makes the document option from the Y.Doc: leave it out");
    const { doc = "content", awareness = null, on = {}, ...rest } = options;
    if (typeof doc !== "string" || doc.length === 0) throw invalid("doc must be a non-empty string");
    const docBytes = new TextEncoder().encode(doc).length;
    if (docBytes > MAX_DOC_NAME) throw invalid(`doc must be 1 to ${MAX_DOC_NAME} bytes of UTF-8, got ${docBytes}`);
    if (doc === "*") throw invalid('doc "*" names the whole document in the protocol: choose another name');
    if (awareness !== null && awareness.doc !== ydoc) throw invalid("awareness must be an Awareness of the Y.Doc");
    if (typeof on !== "object" || on === null) throw invalid("on must be an object of listeners");
    for (const event of ["presence", "peers", "refused", "error"]) {
      if (on[event] !== undefined && typeof on[event] !== "function") throw invalid(`on.${event} must be a function`);
    }
    // A second provider would send each of the Y.Doc's updates again, and claim its awareness
    // client id from a second node (the other members then show that cursor for neither).
    if (attached.has(ydoc)) throw invalid("this Y.Doc has a provider already: destroy it first");
    const provider = new MeshProvider(ydoc, doc, awareness);
    // Heard from the start: what cannot be sent while connecting is reported here too.
    if (on.error) provider.onError(on.error);
    // What the Y.Doc holds before the room's updates arrive (loaded from y-indexeddb, say) goes
    // to the room too.
    if (ydoc.store.clients.size > 0) provider.#earlier = integratedState(ydoc);
    const document = meshDocument(ydoc, provider);
    const applyUpdate = document.applyUpdate;
    document.applyUpdate = (update) => {
      provider.#roomUpdates?.push(update);
      provider.#applying += 1;
      try {
        applyUpdate(update);
      } finally {
        provider.#applying -= 1;
      }
    };
    try {
      provider.#connecting = MeshClient.connect({
        ...rest,
        on: {
          ...on,
          presence: (event) => {
            provider.#presence(event);
            on.presence?.(event);
          },
          peers: (peers) => {
            provider.#peers(peers);
            on.peers?.(peers);
          },
          refused: (event) => {
            provider.#refused(event);
            on.refused?.(event);
          },
          // The client's errors reach the provider's listeners (`on.error` among them).
          error: (e) => provider.#clientError(e),
        },
        document,
      });
      provider.client = await provider.#connecting;
    } catch (e) {
      provider.#detach();
      throw e;
    }
    provider.#sendEarlier();
    provider.#flush();
    provider.#announce();
    return provider;
  }

  /** The client: its events (`status`, `refused`, `anomaly`, ...) concern this document. */
  client = null;
  /** The Y.Doc. */
  doc;
  /** The Awareness, or null. */
  awareness;
  /**
   * Whether an update of this Y.Doc will never reach the room: the relay refused it for good (a
   * room at its size limit, say), or it could not be sent (larger than the relay accepts, a
   * closed client). Yjs applies a client's edits in order, so no other member shows this
   * Y.Doc's edits from that one on. The error listeners hear it when it happens. A new Y.Doc
   * loaded from the room (a new provider) shares edits again.
   */
  diverged = false;
  #name;
  #updates = []; // [update, whether Yjs made it while applying a remote update]
  #earlier = null; // the Y.Doc's state before connect, while it waits for the room's
  #roomUpdates = []; // the room's updates applied while connecting; null once connected
  #applying = 0;
  #cleanups = new WeakSet(); // the transactions in which Yjs removed formatting marks itself
  #scheduled = false;
  #announceWanted = false;
  #nodes = new Map(); // node -> awareness client id
  #told = new Map(); // node -> the refusals of its awareness states already reported
  #destroyed = false; // no more updates are sent once the provider is destroyed
  #destroying = null;
  #listeners = new Set();
  #onUpdate;
  #onTransaction;
  #onAwareness;
  #onDestroy;
  #connecting = null; // MeshClient.connect's promise
  #unsent; // what a client stopped by a PanicError had not delivered, as that error says

  constructor(ydoc, doc, awareness) {
    attached.add(ydoc);
    this.doc = ydoc;
    this.#name = doc;
    this.awareness = awareness;
    // While a remote update is applied, Yjs removes the formatting marks it left redundant, in
    // a transaction of its own, alike on every replica that receives it. Told apart here, before
    // Yjs collects the marks it deleted: an application's observer that deletes anything else
    // at that moment makes an edit of its own.
    this.#onTransaction = (transaction) => {
      if (this.#applying > 0 && transaction.origin !== this && removesMarksOnly(transaction)) {
        this.#cleanups.add(transaction);
      }
    };
    this.#onUpdate = (update, origin, _doc, transaction) => {
      if (origin !== this) this.#queue(update, this.#cleanups.has(transaction));
    };
    ydoc.on("afterTransaction", this.#onTransaction);
    ydoc.on("update", this.#onUpdate);
    // An application that unmounts a document destroys its Y.Doc, which drops every listener
    // of it: the provider goes with it (what was edited before is still sent and waited for).
    this.#onDestroy = () => {
      this.destroy().catch((e) => this.#error(e));
    };
    ydoc.on("destroy", this.#onDestroy);
    if (awareness) {
      this.#onAwareness = ({ added, updated, removed }, origin) => {
        if (origin === this) return;
        const me = awareness.clientID;
        if (added.includes(me) || updated.includes(me) || removed.includes(me)) {
          this.#announceWanted = true;
          this.#schedule();
        }
      };
      awareness.on("update", this.#onAwareness);
    }
  }

  /**
   * Calls `listener(error)` when an update or the awareness state cannot be sent (an update
   * larger than the relay accepts, a closed client), when the relay refuses an update of this
   * Y.Doc for good (see `diverged`), when another member's awareness state
   * is refused (it does not decode, or speaks for a client id not its own), and on the client's
   * `error` events (a `PanicError` stopped the client: what it had not sent is lost, and
   * `diverged` turns true; connect a new provider with a new Y.Doc). Without listeners such
   * errors go to `console.error`. Returns a function that unsubscribes.
   */
  onError(listener) {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /**
   * Stops syncing: sends what waits and, while the relay is reached, waits up to `wait` ms
   * (default 5,000) for it to acknowledge every message of this client, sending what is
   * edited meanwhile too (what is edited after the promise resolves stays local); then
   * removes the others' awareness states here and closes the client (the others see it
   * leave). Resolves to the number of messages the relay did not acknowledge (0: everything
   * arrived); when there are any, the error listeners hear it too.
   */
  destroy(options = {}) {
    if (typeof options !== "object" || options === null) {
      return Promise.reject(invalid(`destroy takes an options object, got ${options === null ? "null" : typeof options}`));
    }
    const { wait = 5_000 } = options;
    if (typeof wait !== "number" || !(wait >= 0)) {
      return Promise.reject(invalid(`wait must be a number of milliseconds, 0 or more, got ${String(wait)}`));
    }
    this.#destroying ??= this.#destroy(wait);
    return this.#destroying;
  }

  async #destroy(wait) {
    // Destroyed while it connects (the Y.Doc destroyed as the application unmounts it): the
    // client it is about to have is closed too, once it is there.
    if (this.client === null && this.#connecting !== null) {
      try {
        await this.#connecting;
      } catch {
        // `connect` rejects to its caller.
      }
      // `connect` takes the client first (it awaited before this did).
      await null;
    }
    const client = this.client;
    let left = 0;
    let status = "closed";
    // A client stopped by a PanicError throws from then on (its instance was replaced): it is
    // taken for closed, and what it had not delivered is what that error said.
    let stopped = false;
    const read = (get, otherwise) => {
      try {
        return get();
      } catch {
        stopped = true;
        return otherwise;
      }
    };
    try {
      // Out of the Y.Doc's transaction first. Called from an observer (or an update listener
      // added before the provider's), the transaction's update is not out yet: Yjs emits it
      // after the observers, synchronously, so the provider hears it before this microtask.
      // And the client is busy while it applies a remote update.
      await null;
      if (this.awareness) this.awareness.off("update", this.#onAwareness);
      this.#flush();
      // What is typed while the relay acknowledges goes out too, and is waited for.
      const deadline = Date.now() + wait;
      while (client && read(() => client.status, "closed") === "open" && read(() => client.pendingCount, 0) > 0 && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      this.#destroyed = true;
      this.#detach();
      this.#flush();
      left = read(() => client?.pendingCount ?? 0, 0);
      status = read(() => client?.status ?? status, "closed");
    } finally {
      this.#destroyed = true;
      this.#detach();
      if (this.awareness) {
        this.#forget([...this.#nodes.values()]);
      }
      read(() => client?.close());
    }
    if (stopped) {
      // The PanicError reaches the listeners in a task of its own: waited for, for its count.
      if (this.#unsent === undefined) await new Promise((resolve) => setTimeout(resolve, 0));
      // That error told the listeners already.
      return this.#unsent ?? 0;
    }
    if (left > 0) {
      this.#error(new Error(`destroyed with ${left} message(s) the relay had not acknowledged (status ${status}): they did not reach the room`));
    }
    return left;
  }

  #detach() {
    attached.delete(this.doc);
    this.doc.off("update", this.#onUpdate);
    this.doc.off("afterTransaction", this.#onTransaction);
    this.doc.off("destroy", this.#onDestroy);
    if (this.awareness) this.awareness.off("update", this.#onAwareness);
  }

  #queue(update, consequence = false) {
    this.#updates.push([update, consequence]);
    this.#schedule();
  }

  /**
   * Of what the Y.Doc held before it connected and what it got while connecting (from
   * y-indexeddb, say, loading as the client connects), keeps to send only what the room
   * lacks: nothing when the room holds all of it, the room's text as an earlier visit stored
   * it. A member that may only read cannot send it: what the room lacks is sent all the same,
   * and refused as any edit of such a member is (`diverged`).
   */
  #sendEarlier() {
    const earlier = this.#earlier === null ? [] : [[this.#earlier, false]];
    const room = this.#roomUpdates;
    this.#earlier = null;
    this.#roomUpdates = null;
    // Only what the room lacks: the whole Y.Doc, sent again at every connection, was stored
    // again each time (and, near the room's byte limit, refused as `full`); and a viewer's
    // stored copy of the room, loaded while it connected, was refused as its edit.
    const waiting = [...earlier, ...this.#updates];
    if (waiting.length > 0) this.#updates = lacking(room, waiting);
  }

  #schedule() {
    if (this.#scheduled || this.client === null || this.#destroyed) return;
    this.#scheduled = true;
    queueMicrotask(() => {
      this.#scheduled = false;
      if (this.#destroyed) return;
      this.#flush();
      if (this.#announceWanted) this.#announce();
    });
  }

  #flush() {
    if (this.client === null || this.#updates.length === 0) return;
    const updates = this.#updates;
    this.#updates = [];
    // What Yjs made itself while applying a remote update, every replica that received it makes
    // too: a member that may only read leaves it to the writers (sent, it would be refused, and
    // the Y.Doc counted as diverged for an edit no one made).
    const reads = readOnly(this.client);
    // One at a time: the client merges what waits while the message fits the relay's limit.
    // Merged here, edits that each fit could make one that does not, and all would be lost.
    for (const [update, consequence] of updates) {
      if (consequence && reads) continue;
      try {
        this.client.sendUpdate(this.#name, update);
      } catch (e) {
        // The Y.Doc holds an update the room never will: the others would hold back what
        // follows it, so nothing after it is sent either.
        this.diverged = true;
        this.#error(e);
        return;
      }
    }
  }

  #announce() {
    this.#announceWanted = false;
    if (!this.awareness || this.client === null) return;
    const me = this.awareness.clientID;
    try {
      this.client.setPresence({
        yjs: { client: me, awareness: toBase64(encodeAwarenessUpdate(this.awareness, [me])) },
      });
    } catch (e) {
      this.#error(e);
    }
  }

  #presence({ sender, data }) {
    const yjs = data && typeof data === "object" ? data.yjs : undefined;
    if (!this.awareness || !yjs || typeof yjs.awareness !== "string") return;
    // A member speaks for its own awareness state only: one entry, its own client id, which no
    // other member (and not this tab) holds. Anything else would let it move, rename or hide
    // another member's cursor. Each refusal is reported once per member: a member that sends
    // the same refused state again and again does not flood the error listeners.
    const refuse = (why) => {
      const told = this.#told.get(sender) ?? new Set();
      this.#told.set(sender, told);
      if (told.has(why) || told.size >= 16) return;
      told.add(why);
      this.#error(new Error(`node ${sender}'s awareness state is refused: ${why}`));
    };
    let update;
    try {
      update = fromBase64(yjs.awareness);
    } catch {
      return refuse("it is not base64");
    }
    const client = soleClient(update);
    if (client === null) return refuse("it must hold exactly one client's state");
    if (client !== yjs.client) return refuse(`it names client ${client}, not ${yjs.client}`);
    if (client === this.awareness.clientID) return refuse("it claims this tab's client id");
    for (const [node, owned] of this.#nodes) {
      // The member shown under a client id keeps it until it leaves or takes another: a
      // second member naming it would otherwise hide or take over the first one's cursor
      // with one message.
      if (owned === client && node !== sender) return refuse(`client ${client} is node ${node}'s`);
    }
    const previous = this.#nodes.get(sender);
    try {
      applyAwarenessUpdate(this.awareness, update, this);
    } catch (e) {
      return refuse(`it does not decode: ${e.message ?? e}`);
    }
    this.#nodes.set(sender, client);
    // A member that changed its client id (a new Y.Doc) leaves its old state behind: remove it.
    if (previous !== undefined && previous !== client) this.#forget([previous]);
  }

  /** Removes the awareness states of `clients`, and what y-protocols keeps of them (their
   * clocks, which it never drops: a member naming a new client id in each presence would
   * grow them without bound). */
  #forget(clients) {
    removeAwarenessStates(this.awareness, clients, this);
    for (const client of clients) this.awareness.meta.delete(client);
  }

  #clientError(e) {
    // A panic stopped the client: what it had not sent is lost, and this Y.Doc's edits reach
    // the room no more.
    if (e?.name === "PanicError") {
      this.diverged = true;
      if (typeof e.unsent === "number") this.#unsent = e.unsent;
    }
    this.#error(e);
  }

  #refused({ kind, doc, reason, detail }) {
    if (kind !== "update" || doc !== this.#name) return;
    this.diverged = true;
    this.#error(new Error(`the relay refused an update of this Y.Doc (${reason}: ${detail}): the room does not hold it, and no other member shows this Y.Doc's edits from it on`));
  }

  #peers({ peers }) {
    if (!this.awareness) return;
    const present = new Set(peers.map((p) => p.node));
    const gone = [];
    for (const [node, client] of this.#nodes) {
      if (!present.has(node)) {
        gone.push(client);
        this.#nodes.delete(node);
      }
    }
    for (const node of this.#told.keys()) if (!present.has(node)) this.#told.delete(node);
    if (gone.length > 0) this.#forget(gone);
  }

  #error(e) {
    if (this.#listeners.size === 0) console.error("pattern-mesh/yjs:", e);
    for (const listener of this.#listeners) {
      // A listener that throws keeps neither the others nor the provider from going on.
      try {
        listener(e);
      } catch (thrown) {
        console.error("pattern-mesh/yjs: an error listener threw:", thrown);
      }
    }
  }
}

/** Whether the client's member may only read (false for a client that can no longer say). */
function readOnly(client) {
  try {
    return client.readOnly;
  } catch {
    return false;
  }
}

/** Whether `transaction` only removed formatting marks: it wrote no block, and every item it
 * deleted is a mark. */
function removesMarksOnly(transaction) {
  for (const [client, clock] of transaction.afterState) {
    if (transaction.beforeState.get(client) !== clock) return false;
  }
  let marks = true;
  Y.iterateDeletedStructs(transaction, transaction.deleteSet, (item) => {
    if (item instanceof Y.GC || !(item.content instanceof Y.ContentFormat)) marks = false;
  });
  return marks;
}

/**
 * What each of `updates` (`[update, consequence]`, in order) adds to a document made of the
 * room's `room` updates and the ones before it: its blocks the document lacks, and its
 * deletions. An update that adds nothing is left out; Yjs's own consequences are kept as they
 * are.
 */
function lacking(room, updates) {
  const scratch = new Y.Doc({ gc: false });
  try {
    for (const u of room) Y.applyUpdate(scratch, u);
    let added = false;
    scratch.on("update", () => { added = true; });
    const out = [];
    for (const [update, consequence] of updates) {
      if (consequence) {
        out.push([update, consequence]);
        continue;
      }
      const vector = Y.encodeStateVector(scratch);
      added = false;
      Y.applyUpdate(scratch, update);
      // What waits for blocks the scratch lacks is sent too: the room may lack them as well.
      const held = scratch.store.pendingStructs !== null || scratch.store.pendingDs !== null;
      if (added || held) out.push([Y.diffUpdate(update, vector), false]);
    }
    return out;
  } finally {
    scratch.destroy();
  }
}

/** The longest document name the protocol carries, in bytes of UTF-8. */
const MAX_DOC_NAME = 64;

/** The Y.Docs that have a provider: one each. */
const attached = new WeakSet();

function invalid(message) {
  const e = new Error(message);
  e.name = "InvalidArgument";
  return e;
}
