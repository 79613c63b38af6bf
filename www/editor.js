// The demo editor: CodeMirror 6 bound to a Y.Text with y-codemirror.next, kept in sync through
// the relay by pattern-mesh/yjs's MeshProvider. Remote cursors and selections carry each
// member's name and colour (Yjs awareness over the client's presence); the mesh panel shows the
// room's step, pattern, peers and anomalies. Bundled by .ci/build-demo.mjs into build/editor.js.
import * as Y from "yjs";
import { Awareness } from "y-protocols/awareness";
import { EditorView, basicSetup } from "codemirror";
import { Prec } from "@codemirror/state";
import { keymap } from "@codemirror/view";
import { yCollab, yUndoManagerKeymap } from "y-codemirror.next";
import init from "../pkg/pattern_mesh.js";
import { MeshProvider } from "../pkg/yjs.js";
import { mountPanel, panelHtml, roomFromUrl, relayUrl, nameInput } from "./panel.js";

const colours = ["#d1495b", "#2e86ab", "#3c9d5d", "#8f5fbf", "#e07b00", "#00897b", "#c2185b", "#5c6bc0"];

document.getElementById("panel").innerHTML = panelHtml;
await init();
const room = roomFromUrl("doc");
document.getElementById("game-link").href = `game.html?room=${encodeURIComponent(room.replace(/^doc-/, "game-"))}`;
document.getElementById("textarea-link").href = `textarea.html?room=${encodeURIComponent(room)}`;

const ydoc = new Y.Doc();
const awareness = new Awareness(ydoc);
const name = nameInput();
const colour = colours[ydoc.clientID % colours.length];
awareness.setLocalStateField("user", { name, color: colour, colorLight: `${colour}33` });
document.getElementById("name").addEventListener("change", (e) => {
  awareness.setLocalStateField("user", { name: e.target.value, color: colour, colorLight: `${colour}33` });
});

const provider = await MeshProvider.connect(ydoc, { url: relayUrl(), room, name, doc: "content", awareness });
const client = provider.client;
client.on("error", (e) => console.error(e));
// The provider's errors (an update the relay refused for good, ...) show in the panel's log.
const isDemo = mountPanel(client, { room, onError: (listener) => provider.onError(listener) });
client.on("message", ({ data }) => isDemo(data));

const ytext = ydoc.getText("content");
const view = new EditorView({
  doc: ytext.toString(),
  // Undo and redo through Y.UndoManager, ahead of CodeMirror's own history (which would take
  // back other members' edits too): only this tab's edits are undone.
  extensions: [
    Prec.high(keymap.of(yUndoManagerKeymap)),
    basicSetup,
    EditorView.lineWrapping,
    yCollab(ytext, awareness, { undoManager: new Y.UndoManager(ytext) }),
  ],
  parent: document.getElementById("editor"),
});
view.focus();
Object.assign(window, { meshClient: client, meshProvider: provider, meshDoc: ydoc, meshView: view });
document.body.dataset.ready = "true";
