// The textarea binding of the editor: local input becomes splices of a shared text, and remote
// changes arrive as deltas applied in place with setRangeText, which moves the caret and the
// selection with the text around them. `text` is anything with insert(index, chunk),
// delete(index, length), toString() and observe(fn(delta, origin)) whose origin is "local" for
// this page's own edits: pattern-mesh's SharedText, or an adapter over another CRDT (the
// keystroke benchmark binds a Yjs Y.Text the same way). Indexes are UTF-16 code units.
// `onRemote(inserted)` runs after each remote change is on screen, with the inserted strings.
export function bindTextarea(editor, text, { onRemote } = {}) {
  let shadow = text.toString();
  editor.value = shadow;

  const onInput = () => {
    const next = editor.value;
    const prev = shadow;
    let start = 0;
    while (start < prev.length && start < next.length && prev[start] === next[start]) start++;
    let endPrev = prev.length, endNext = next.length;
    while (endPrev > start && endNext > start && prev[endPrev - 1] === next[endNext - 1]) { endPrev--; endNext--; }
    // Never cut a surrogate pair: an edit next to an emoji that starts or ends with the same
    // code unit would otherwise send half of each pair, which the document stores as U+FFFD.
    if (start > 0 && isHigh(prev.charCodeAt(start - 1))) start--;
    if (endPrev < prev.length && isLow(prev.charCodeAt(endPrev))) { endPrev++; endNext++; }
    shadow = next;
    if (endPrev > start) text.delete(start, endPrev - start);
    if (endNext > start) text.insert(start, next.slice(start, endNext));
  };
  editor.addEventListener("input", onInput);

  const stop = text.observe((delta, origin) => {
    if (origin === "local") return;
    let at = 0;
    const inserted = [];
    for (const op of delta) {
      if (op.retain !== undefined) {
        at += op.retain;
      } else if (op.insert !== undefined) {
        editor.setRangeText(op.insert, at, at, "preserve");
        at += op.insert.length;
        inserted.push(op.insert);
      } else if (op.delete !== undefined) {
        editor.setRangeText("", at, at + op.delete, "preserve");
      }
    }
    // The shared text is the truth; should the textarea ever differ, it takes the text back.
    const truth = text.toString();
    if (editor.value !== truth) editor.value = truth;
    shadow = truth;
    onRemote?.(inserted);
  });

  return () => {
    editor.removeEventListener("input", onInput);
    stop?.();
  };
}

const isHigh = (unit) => unit >= 0xd800 && unit < 0xdc00;
const isLow = (unit) => unit >= 0xdc00 && unit < 0xe000;
