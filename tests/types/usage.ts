// Compiled (never run) by `tsc --strict` in tests/js/package.test.mjs: the package's types as an
// application in strict TypeScript uses them.
import init, { MeshClient, SharedDocument, type Status, type Anomaly } from "../../pkg/pattern_mesh.js";

export async function main(url: string): Promise<string> {
  await init();
  const history: number[] = [];
  const client = await MeshClient.connect({
    url, room: "typed", name: "ts", connectTimeout: 5000,
    on: { message: ({ step }) => history.push(step), status: (status: Status) => console.log(status) },
  });
  const statuses: Status[] = [client.status];
  const off = client.on("status", (status: Status, reason?: string) => {
    statuses.push(status);
    if (reason !== undefined) console.log(reason);
  });
  client.on("anomaly", (anomaly: Anomaly) => console.warn(anomaly.reason, anomaly.detail));
  client.on("error", (error: Error) => console.error(error.name, error.message));
  client.on("message", ({ sender, step, data }) => console.log(sender, step, data));
  client.on("paced", ({ waitMs, messages }) => console.log(`${messages} pending; the next goes in ${waitMs} ms`));
  const text = client.text("content");
  text.insert(0, "hello");
  text.delete(0, 1);
  text.observe((delta, origin) => console.log(delta.length, origin === "local"));
  off();
  const doc = new SharedDocument();
  const update: Uint8Array = doc.insert("t", 0, "x");
  doc.applyUpdate(update);
  client.close();
  return text.toString() + doc.text("t") + statuses.join() + history.length;
}
