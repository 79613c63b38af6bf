// Writes values.v1: one Yjs v1 update, written by Yjs from npm, that holds every kind of value
// content Yjs writes (numbers in each of lib0's forms, bigints, strings, binary, nested arrays
// and objects with keys in JavaScript's order, null, undefined), embeds, formats, XML and a
// sub-document. The relay's tests send it twice: the room's document (yrs) writes the same
// values its own way, and the second send must be taken as what the room holds.
//
//   node tests/data/yjs/values.mjs
import { writeFile } from "node:fs/promises";
import { createRequire } from "node:module";

const root = new URL("../../../", import.meta.url);
const require = createRequire(new URL(".ci/package.json", root));
const Y = require("yjs");

const doc = new Y.Doc();
doc.clientID = 7_777;
const map = doc.getMap("m");
const numbers = [0, -0, 1, -5, 2 ** 31 - 1, 2 ** 31, -(2 ** 40), 1.5, 0.1, 1e300, NaN, Infinity, -Infinity];
numbers.forEach((n, i) => map.set(`n${i}`, n));
map.set("big", 2n ** 62n);
map.set("big+1", 2n ** 62n + 1n);
map.set("small big", 5n);
map.set("largest big", 2n ** 63n - 1n);
map.set("smallest big", -(2n ** 63n));
map.set("text", "wörld 😀 \ud800");
map.set("bytes", new Uint8Array([0, 1, 255]));
map.set("object", { b: 1, a: { d: [1, 2, { z: null, y: "y" }], c: true }, 10: 1, 2: 2.25 });
map.set("nothing", null);
map.set("undefined", undefined);
map.set("flags", [true, false]);
map.set("sub", new Y.Doc({ guid: "sub-guid", meta: { a: 1 } }));
const array = doc.getArray("a");
array.push([1, "x", { k: 1.5, j: [null] }, [0.1, 3]]);
const text = doc.getText("t");
text.insert(0, "hello");
text.insertEmbed(2, { image: "x.png", w: 1.5, alt: { lang: "en" } });
text.format(0, 3, { bold: true, color: { r: 1, g: 0.5 } });
const xml = doc.getXmlFragment("x");
const p = new Y.XmlElement("p");
p.setAttribute("class", "lead");
p.insert(0, [new Y.XmlText("para")]);
xml.insert(0, [p]);

await writeFile(new URL("values.v1", import.meta.url), Y.encodeStateAsUpdate(doc));
