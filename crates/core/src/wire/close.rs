//! WebSocket close codes the relay uses, and what a client does after each.
//!
//! The codes travel in the WebSocket close frame with a reason (at most 123 bytes of UTF-8). The
//! 4000 range is ours; the others are the standard codes of RFC 6455.

/// The relay is shutting down: reconnect (to it or another relay) later.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the protocol: the first frame was not a join, too many malformed frames,
/// or a join the relay cannot accept (an invalid room configuration). Reconnecting cannot help.
pub const POLICY: u16 = 1008;
/// A message over the relay's limit that could not even be read.
pub const TOO_BIG: u16 = 1009;
/// An internal error (the room stopped after a storage failure): reconnect to resume.
pub const INTERNAL: u16 = 1011;
/// A limit was reached (rooms, members, connections): try again later.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// The connection's send queue was full: it did not keep up with the room. Reconnect and
/// resume from the last position.
pub const SLOW_CONSUMER: u16 = 4000;
/// The connection kept sending over its rate limit.
pub const RATE_LIMITED: u16 = 4001;
/// Another connection resumed the same node: this one is replaced, and must not reconnect, or
/// the two would take the node from each other forever.
pub const REPLACED: u16 = 4002;

/// The join was refused for its access token: none when the relay requires one, a bad
/// signature, or a token for another room. The reason says which. Reconnecting with the same
/// token cannot help.
pub const FORBIDDEN: u16 = 4003;
/// The access token expired, at the join or during the connection: reconnect with a fresh one.
pub const TOKEN_EXPIRED: u16 = 4004;
/// Nothing came from the connection for the relay's idle timeout (not even a heartbeat): it
/// is taken for dead. Reconnect.
pub const SILENT: u16 = 4005;

/// The longest close reason a WebSocket close frame carries, in bytes.
pub const MAX_REASON: usize = 123;

/// Whether reconnecting after `code` cannot help: the client stops and says why.
pub fn is_final(code: u16) -> bool {
    matches!(code, POLICY | REPLACED | FORBIDDEN)
}

/// `reason` cut to [`MAX_REASON`] bytes at a character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(100);
        let cut = truncate_reason(&reason);
        assert!(cut.len() <= MAX_REASON);
        assert_eq!(cut.len(), 122);
        assert_eq!(truncate_reason("short"), "short");
    }
}
