//! Checks that a text is one JSON value (RFC 8259), without building it: the decoder's check on
//! every data, signal and presence payload.
//!
//! The grammar is the one `JSON.parse` and serde_json accept: no comments, no trailing commas,
//! no leading zeros or `+`, whitespace only as space, tab, line feed and carriage return, no
//! raw control characters inside strings, and any `\u` escape of four hex digits (a lone
//! surrogate included, as `JSON.parse` takes it). Nesting has no limit of its own: the stack of
//! open containers holds its first 32 levels in place and one byte a level past them, never
//! deeper than the text is long. Nothing recurses.

use std::fmt;

/// Why a text is not one JSON value: what was wrong, and the byte offset where it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonError {
    /// What was wrong ("expected a value", "a control character in a string", ...).
    pub problem: &'static str,
    /// The byte offset in the text where it was found.
    pub offset: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.offset)
    }
}

impl std::error::Error for JsonError {}

/// Checks that `text` is exactly one JSON value, with only whitespace around it.
pub fn check(text: &str) -> Result<(), JsonError> {
    let mut checker = Checker {
        bytes: text.as_bytes(),
        at: 0,
    };
    checker.value()?;
    checker.whitespace();
    if checker.at < checker.bytes.len() {
        return Err(checker.error("text after the value"));
    }
    Ok(())
}

/// The closing bytes of the open containers: the first 32 levels in place, deeper ones on the
/// heap, so that ordinary payloads check without allocating.
#[derive(Default)]
struct Stack {
    near: [u8; 32],
    deeper: Vec<u8>,
    depth: usize,
}

impl Stack {
    fn push(&mut self, close: u8) {
        match self.near.get_mut(self.depth) {
            Some(slot) => *slot = close,
            None => self.deeper.push(close),
        }
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        if self.depth >= self.near.len() {
            self.deeper.pop();
        }
    }

    fn last(&self) -> Option<u8> {
        let top = self.depth.checked_sub(1)?;
        self.near.get(top).or(self.deeper.last()).copied()
    }
}

struct Checker<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Checker<'_> {
    fn error(&self, problem: &'static str) -> JsonError {
        JsonError {
            problem,
            offset: self.at,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// One value, arrays and objects included: the open containers are a [`Stack`] of their
    /// closing bytes.
    fn value(&mut self) -> Result<(), JsonError> {
        let mut open = Stack::default();
        loop {
            // A value starts here.
            self.whitespace();
            match self.peek() {
                Some(b'[') => {
                    self.at += 1;
                    self.whitespace();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                    } else {
                        open.push(b']');
                        continue;
                    }
                }
                Some(b'{') => {
                    self.at += 1;
                    self.whitespace();
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                    } else {
                        self.key()?;
                        open.push(b'}');
                        continue;
                    }
                }
                Some(b'"') => self.string()?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.word(b"true")?,
                Some(b'f') => self.word(b"false")?,
                Some(b'n') => self.word(b"null")?,
                Some(_) => return Err(self.error("expected a value")),
                None => return Err(self.error("the text ended where a value was expected")),
            }
            // A value ended: close what it completes, up to a comma that starts the next one.
            loop {
                let Some(close) = open.last() else {
                    return Ok(());
                };
                self.whitespace();
                match self.peek() {
                    Some(b',') => {
                        self.at += 1;
                        if close == b'}' {
                            self.whitespace();
                            self.key()?;
                        }
                        break;
                    }
                    Some(b) if b == close => {
                        self.at += 1;
                        open.pop();
                    }
                    Some(_) if close == b']' => {
                        return Err(self.error("expected `,` or `]` in an array"))
                    }
                    Some(_) => return Err(self.error("expected `,` or `}` in an object")),
                    None => return Err(self.error("the text ended inside an array or object")),
                }
            }
        }
    }

    /// An object's key and its colon.
    fn key(&mut self) -> Result<(), JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a string key"));
        }
        self.string()?;
        self.whitespace();
        if self.peek() != Some(b':') {
            return Err(self.error("expected `:` after a key"));
        }
        self.at += 1;
        Ok(())
    }

    /// A string, from its opening quote.
    fn string(&mut self) -> Result<(), JsonError> {
        self.at += 1;
        loop {
            self.at += plain_run(&self.bytes[self.at..]);
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.at += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.at += 1
                        }
                        Some(b'u') => {
                            self.at += 1;
                            for _ in 0..4 {
                                match self.peek() {
                                    Some(b) if b.is_ascii_hexdigit() => self.at += 1,
                                    Some(_) => return Err(self.error("an invalid `\\u` escape")),
                                    None => return Err(self.error("the text ended in a string")),
                                }
                            }
                        }
                        Some(_) => return Err(self.error("an invalid escape")),
                        None => return Err(self.error("the text ended in a string")),
                    }
                }
                Some(_) => return Err(self.error("a control character in a string")),
                None => return Err(self.error("the text ended in a string")),
            }
        }
    }

    /// A number: `-`? (`0` or a digit 1-9 then digits), then `.` digits?, then an exponent?
    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.at += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.error("a number with a leading zero"));
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.digits_required()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.digits_required()?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn digits_required(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'0'..=b'9') => {
                self.digits();
                Ok(())
            }
            _ => Err(self.error("expected a digit")),
        }
    }

    /// `true`, `false` or `null`.
    fn word(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.error("expected a value"))
        }
    }
}

/// How many bytes at the start of `bytes` are plain string characters: the offset of the first
/// quote, backslash or control byte, or the length. Eight bytes at a time, as serde_json does:
/// in each word, a byte's high bit is set when it is below 0x20 or equal to `"` or `\\`, and the
/// lowest such bit is exact (a borrow only carries upwards, past the first real match).
fn plain_run(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let found = (quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash
            | word.wrapping_sub(ONES * 0x20) & !word)
            & HIGH;
        if found != 0 {
            return at + (found.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(bytes.len() - at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What serde_json (the reference) says of `text`.
    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    #[test]
    fn accepts_and_refuses_what_json_parse_does() {
        for text in [
            "0",
            "-0",
            "-0.5e+10",
            "1E5",
            "123.456e-7",
            " \t\r\n[ ] ",
            "{}",
            r#"{"a":[1,{"b":null}],"c":"d"}"#,
            r#""\u0000\ud800\"\\\/\b\f\n\r\t""#,
            "\"é😀\"",
            "[true,false,null]",
            r#"{"a":1,"a":2}"#,
        ] {
            assert_eq!(check(text), Ok(()), "{text}");
            assert!(serde_accepts(text), "{text}");
        }
        for (text, problem, offset) in [
            ("", "the text ended where a value was expected", 0),
            ("  ", "the text ended where a value was expected", 2),
            ("01", "a number with a leading zero", 1),
            ("+1", "expected a value", 0),
            ("1.", "expected a digit", 2),
            ("1e", "expected a digit", 2),
            ("-", "expected a digit", 1),
            (".5", "expected a value", 0),
            ("[1,]", "expected a value", 3),
            ("[1 2]", "expected `,` or `]` in an array", 3),
            ("{\"a\" 1}", "expected `:` after a key", 5),
            ("{\"a\":1,}", "expected a string key", 7),
            ("{1:2}", "expected a string key", 1),
            ("{\"a\":1 \"b\":2}", "expected `,` or `}` in an object", 7),
            ("[[[", "the text ended where a value was expected", 3),
            ("[1", "the text ended inside an array or object", 2),
            ("\"abc", "the text ended in a string", 4),
            ("\"a\nb\"", "a control character in a string", 2),
            ("\"\\x\"", "an invalid escape", 2),
            ("\"\\u12g4\"", "an invalid `\\u` escape", 5),
            ("tru", "expected a value", 0),
            ("nul", "expected a value", 0),
            ("NaN", "expected a value", 0),
            ("1 2", "text after the value", 2),
            ("{} x", "text after the value", 3),
            ("\u{feff}1", "expected a value", 0),
            ("/* */ 1", "expected a value", 0),
        ] {
            assert_eq!(check(text), Err(JsonError { problem, offset }), "{text:?}");
            assert!(!serde_accepts(text), "{text:?}");
        }
    }

    #[test]
    fn a_plain_run_stops_at_the_first_special_byte_wherever_it_is() {
        // Every byte that is not special, around the values the word arithmetic compares with.
        let others = [b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff];
        for len in 0..40 {
            let plain: Vec<u8> = (0..len).map(|i| others[i % others.len()]).collect();
            assert_eq!(plain_run(&plain), len);
            for at in 0..len {
                for special in [b'"', b'\\', 0, 0x1f, b'\n'] {
                    let mut bytes = plain.clone();
                    bytes[at] = special;
                    assert_eq!(plain_run(&bytes), at, "{bytes:?}");
                }
            }
        }
        let high: Vec<u8> = (0x20..=0xffu8)
            .filter(|b| *b != b'"' && *b != b'\\')
            .collect();
        assert_eq!(plain_run(&high), high.len());
    }

    #[test]
    fn arrays_and_objects_close_in_order_at_every_depth() {
        for depth in 0..80 {
            let open: String = (0..depth)
                .map(|i| if i % 3 == 0 { "{\"a\":" } else { "[" })
                .collect();
            let closes: Vec<&str> = (0..depth)
                .rev()
                .map(|i| if i % 3 == 0 { "}" } else { "]" })
                .collect();
            let text = format!("{open}1{}", closes.concat());
            assert_eq!(check(&text), Ok(()), "{text}");
            for wrong in 0..depth {
                let mut closes = closes.clone();
                closes[wrong] = if closes[wrong] == "}" { "]" } else { "}" };
                let text = format!("{open}1{}", closes.concat());
                assert!(check(&text).is_err(), "{text}");
                assert!(!serde_accepts(&text), "{text}");
            }
        }
    }

    #[test]
    fn deep_nesting_needs_no_recursion() {
        let depth = 1_000_000;
        let text = "[".repeat(depth) + &"]".repeat(depth);
        assert_eq!(check(&text), Ok(()));
        let text = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
        assert_eq!(check(&text), Ok(()));
        let text = "[".repeat(depth) + &"]".repeat(depth - 1);
        assert!(check(&text).is_err());
    }

    /// A short JSON string, escapes and control characters included.
    fn short_string() -> impl Strategy<Value = String> {
        "[a-z\"\\\u{1}\u{1f}é😀]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap())
    }

    /// Any JSON value, as text with some whitespace.
    fn json_text() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            (-2i64..12).prop_map(|n| n.to_string()),
            (-2i64..12, 0u32..100).prop_map(|(n, f)| format!("{n}.{f}")),
            any::<f64>()
                .prop_filter("finite", |n| n.is_finite())
                .prop_map(|n| format!("{n:e}")),
            short_string(),
        ];
        leaf.prop_recursive(4, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8)
                    .prop_map(|v| format!("[{}]", v.join(" , "))),
                prop::collection::vec((short_string(), inner), 0..8).prop_map(|v| {
                    let fields: Vec<String> =
                        v.into_iter().map(|(k, v)| format!("{k}:\n{v}")).collect();
                    format!("{{ {} }}", fields.join(","))
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Every value serde_json writes, and every one a byte edit breaks (or not), gets the
        /// same answer as from serde_json.
        #[test]
        fn agrees_with_serde_json(
            text in json_text(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(
                b"[]{}\",:.-+eE0123456789 \t\n\\/ubfnrtal\x01\x1f".to_vec()
            )), 0..4),
        ) {
            prop_assert_eq!(check(&text), Ok(()), "{}", text);
            let mut bytes = text.into_bytes();
            for (at, op, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 => bytes.insert(i, byte),
                    1 if i < bytes.len() => { bytes.remove(i); }
                    _ if i < bytes.len() => bytes[i] = byte,
                    _ => {}
                }
            }
            // Edits may split a UTF-8 sequence: only whole texts are JSON candidates.
            if let Ok(text) = String::from_utf8(bytes) {
                prop_assert_eq!(check(&text).is_ok(), serde_accepts(&text), "{:?}", text);
            }
        }

        /// Texts strung together from pieces of JSON, most of them not JSON, get the same
        /// answer as from serde_json.
        #[test]
        fn pieces_agree_with_serde_json(pieces in prop::collection::vec(prop::sample::select(vec![
            "[", "]", "{", "}", ",", ":", " ", "\n", "\"", "\"a\"", "\\", "\\u00e9", "\\uD83D",
            "\\u12", "\\a", "\\/", "\\n", "\u{1}", "\u{7f}", "é", "0", "7", "-", "+", ".", "e",
            "E", "1.5", "true", "fals", "null", "nul", "x", "\"\\a\"", "\"\\uD83D\"", "\"\\u12\"",
            "\"\\u00e9\"", "\"\\/\\\\\\\"\"", "\"\\b\\f\\r\\t\"", "\"\u{1}\"", "\"\u{1f}\"", "\"\u{7f}\"",
        ]), 1..12)) {
            let text = pieces.concat();
            prop_assert_eq!(check(&text).is_ok(), serde_accepts(&text), "{:?}", text);
        }
    }
}
