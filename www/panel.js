// The mesh panel shared by the demo pages: connection, room step and pattern, phase, peers,
// counts and a scrolling anomaly log, plus the controls that send tampered frames.
import { encode, PatternGenerator } from "../pkg/pattern_mesh.js";

const $ = (id) => document.getElementById(id);

/** The room from `?room=`, or a fresh one written into the URL so the link can be shared. */
export function roomFromUrl(prefix) {
  const url = new URL(location.href);
  let room = url.searchParams.get("room");
  if (!room) {
    room = `${prefix}-${Math.random().toString(36).slice(2, 8)}`;
    url.searchParams.set("room", room);
    history.replaceState(null, "", url);
  }
  return room;
}

/**
 * The relay to connect to: this page's, or `?relay=` (a WebSocket URL, or several separated by
 * commas: relays on one Redis, tried in turn).
 */
export function relayUrl() {
  const relay = new URLSearchParams(location.search).get("relay");
  if (relay?.includes(",")) return relay.split(",").map((url) => url.trim()).filter(Boolean);
  return relay ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

/** The display name, kept in localStorage. */
export function nameInput() {
  const input = $("name");
  input.value = localStorage.getItem("pattern-mesh-name") || `guest-${Math.floor(Math.random() * 1000)}`;
  input.addEventListener("change", () => localStorage.setItem("pattern-mesh-name", input.value));
  return input.value;
}

const base64 = (bytes) => btoa(String.fromCharCode(...bytes));
const unbase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

/** Wires the panel to a connected client. Returns a function that says whether a message is
 * the panel's own (a tamper demonstration) and handles it. What the client refuses or reports
 * as an error shows in the anomaly log too, and so does what `onError` (a function that
 * subscribes a listener to errors of another source, such as a Yjs provider) hears. */
export function mountPanel(client, { room, pattern = new PatternGenerator(), onError = null }) {
  $("share").href = location.href;
  $("share").textContent = room;
  const anomalies = new Map();
  let received = 0;
  let sentOnce = false;
  // Set while the client's pacer holds messages back for a second or more (a large paste).
  let paced = "";

  const renderStep = () => {
    const step = client.step;
    $("step").textContent = step;
    $("pattern").textContent = pattern.computeValue(step);
    $("phase").textContent = pattern.phase(step);
    $("checkpoint").textContent = pattern.nextBoundary(step);
    $("digest").textContent = client.digest;
    $("pending").textContent = `${client.pendingCount}${paced}`;
  };
  const renderStatus = (status, reason) => {
    const el = $("status");
    el.textContent = status;
    // Why it is not open (a close code and reason, a timeout, a new identity), on hover.
    el.title = reason ?? "";
    el.className = `status ${status}`;
    $("offline").classList.toggle("shown", status !== "open");
  };
  const renderCounts = () => {
    $("received").textContent = received;
    const rows = [...anomalies.entries()].sort();
    $("anomaly-total").textContent = rows.reduce((sum, [, n]) => sum + n, 0);
    $("counts").replaceChildren(...rows.map(([reason, n]) => {
      const tr = document.createElement("tr");
      tr.innerHTML = `<td></td><td></td>`;
      tr.children[0].textContent = reason;
      tr.children[1].textContent = n;
      tr.dataset.reason = reason;
      return tr;
    }));
  };
  const log = (anomaly) => {
    const key = `${anomaly.source}:${anomaly.reason}`;
    anomalies.set(key, (anomalies.get(key) || 0) + 1);
    const li = document.createElement("li");
    li.innerHTML = `<span class="when"></span> <span class="reason"></span> <span class="detail"></span>`;
    li.querySelector(".when").textContent = new Date().toLocaleTimeString();
    li.querySelector(".reason").textContent = `${anomaly.source} ${anomaly.reason}`;
    li.querySelector(".detail").textContent = anomaly.detail;
    $("log").prepend(li);
    renderCounts();
  };

  client.on("status", renderStatus);
  client.on("step", renderStep);
  client.on("anomaly", log);
  // Nothing this tab sends is lost without a word on the page.
  client.on("refused", (r) => log({ source: "refused", reason: r.reason, detail: `this tab's ${r.kind} will never reach the room: ${r.detail}` }));
  const problem = (e) => log({ source: "error", reason: e?.name || "Error", detail: e?.message ?? String(e) });
  client.on("error", problem);
  onError?.(problem);
  client.on("message", () => { received += 1; renderCounts(); });
  client.on("paced", ({ waitMs }) => {
    paced = waitMs ? `, held back by the pacer to stay under the relay's rate (the next in ${(waitMs / 1000).toFixed(1)} s)` : "";
    renderStep();
  });
  const renderPeers = (peers) => {
    $("peers").replaceChildren(...peers.map((p) => {
      const li = document.createElement("li");
      li.textContent = `${p.name || "anonymous"} (node ${p.node})`;
      return li;
    }));
    $("peer-count").textContent = peers.length + 1;
  };
  client.on("peers", ({ peers }) => renderPeers(peers));
  // A new name in the field reaches every peer (and every later join).
  $("name").addEventListener("change", () => {
    try {
      client.setName($("name").value);
    } catch (e) {
      log({ source: "local", reason: e.name, detail: e.message });
    }
  });
  renderPeers(client.peers);
  renderStatus(client.status);
  renderStep();
  renderCounts();
  $("me").textContent = `node ${client.node}`;
  setInterval(renderStep, 500);

  // Tamper demonstrations: the relay refuses the raw frame (this tab sees the reject), and the
  // same bytes travel inside a valid message so that every other tab runs them through its
  // own validator and shows what it would do with them.
  const demonstrate = (frame, what) => {
    const bytes = encode(frame);
    client.sendRaw(bytes);
    client.broadcast({ demo: what, frame: base64(bytes) });
    sentOnce = true;
  };
  $("tamper-pattern").addEventListener("click", () => {
    const step = client.step + 1;
    const right = pattern.computeValue(step);
    const wrong = right === 9 ? 1 : right + 1;
    demonstrate({ kind: "data", sender: client.node, step, pattern: wrong, data: { tampered: true } }, "wrong pattern");
  });
  $("tamper-replay").addEventListener("click", async () => {
    // Step 1 is a replay once this tab has had a message stored.
    if (!sentOnce) {
      client.broadcast({ demo: "first message" });
      sentOnce = true;
      while (client.pendingCount > 0) await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const step = 1;
    demonstrate({ kind: "data", sender: client.node, step, pattern: pattern.computeValue(step), data: { replayed: true } }, "replayed step");
  });

  return (data) => {
    if (data && typeof data === "object" && typeof data.demo === "string") {
      if (typeof data.frame === "string") client.inspect(unbase64(data.frame));
      return true;
    }
    return false;
  };
}

/** The panel's markup, the same on every page. */
export const panelHtml = `
  <section class="card" aria-labelledby="conn-h">
    <h2 id="conn-h">Connection</h2>
    <dl>
      <dt>Status</dt><dd><span id="status" class="status">connecting</span></dd>
      <dt>This tab</dt><dd id="me">-</dd>
      <dt>Room</dt><dd><a id="share" href="#">-</a></dd>
      <dt>Unacknowledged</dt><dd id="pending">0</dd>
    </dl>
  </section>
  <section class="card" aria-labelledby="clock-h">
    <h2 id="clock-h">Room clock</h2>
    <dl>
      <dt>Step</dt><dd id="step">0</dd>
      <dt>Pattern value</dt><dd id="pattern">-</dd>
      <dt>Phase</dt><dd id="phase">0</dd>
      <dt>Next checkpoint</dt><dd id="checkpoint">-</dd>
      <dt>Document digest</dt><dd id="digest">-</dd>
    </dl>
  </section>
  <section class="card" aria-labelledby="peers-h">
    <h2 id="peers-h">Peers (<span id="peer-count">1</span> in the room)</h2>
    <ul class="peers" id="peers"></ul>
  </section>
  <section class="card" aria-labelledby="anomalies-h">
    <h2 id="anomalies-h">Messages and anomalies</h2>
    <dl>
      <dt>Messages received</dt><dd id="received">0</dd>
      <dt>Anomalies</dt><dd id="anomaly-total">0</dd>
    </dl>
    <table class="counts" aria-label="Anomalies by reason"><tbody id="counts"></tbody></table>
    <div class="controls" style="margin:.6rem 0">
      <button id="tamper-pattern" type="button">Send a tampered message</button>
      <button id="tamper-replay" type="button">Send a replayed step</button>
    </div>
    <ol class="log" id="log" aria-label="Anomaly log" aria-live="polite"></ol>
  </section>`;
