//! What a client reads of its own access token: the claims a JSON Web Token carries, as the
//! JSON its middle part encodes.
//!
//! The client does not verify the token (it does not hold the key, and need not): the relay
//! verifies every token and judges every write. A client reads its own token's `access` claim
//! only to refuse a read-only member's edit before its document shows it (see
//! [`crate::session::Session::set_read_only`]).

/// The JSON of a JSON Web Token's claims (its middle part, base64url without padding), or
/// `None` for a token that is not one (the relay will say what is wrong with it).
pub fn claims(token: &str) -> Option<Vec<u8>> {
    let mut parts = token.split('.');
    let (_header, claims, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    base64url(claims)
}

/// Decodes base64url without padding (RFC 4648 §5, as JSON Web Tokens write it); `None` for
/// anything else.
fn base64url(text: &str) -> Option<Vec<u8>> {
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut held) = (0u32, 0u32);
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    // The bits left over pad the last byte, and are zero in a canonical encoding.
    (bits == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The claims of a token the relay's tests sign (HS256), as the relay reads them.
    #[test]
    fn a_tokens_claims_are_the_json_of_its_middle_part() {
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJyIiwicm9vbSI6ImRvYyIsImFjY2VzcyI6InJlYWQiLCJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJl";
        assert_eq!(
            claims(token).as_deref(),
            Some(&br#"{"sub":"r","room":"doc","access":"read","exp":4102444800}"#[..])
        );
    }

    #[test]
    fn base64url_decodes_every_length_and_refuses_what_is_not_it() {
        assert_eq!(base64url("").as_deref(), Some(&b""[..]));
        assert_eq!(base64url("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64url("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64url("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(base64url("-_8").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64url("YQ=="), None, "padding");
        assert_eq!(base64url("Y+Q"), None, "base64, not base64url");
        assert_eq!(base64url("Y"), None, "a length no encoding has");
        assert_eq!(base64url("YR"), None, "bits left over");
        assert_eq!(claims("not a token"), None);
        assert_eq!(claims("a.b.c.d"), None);
    }
}
