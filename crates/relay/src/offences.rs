//! Who stopped which room: a member whose messages stop a room twice within
//! [`crate::RelayConfig::offence_bar`] is kept out of that room for as long.
//!
//! A room stops when a member's update walks too far to apply or makes applying it panic, or
//! the room panics on a member's message ([`pattern_mesh_core::room::Output::Stop`] names the
//! node): every member is closed, to reconnect, and the relay pays the bound and a reload. No
//! honest client sends such an update on purpose, and one whose update was refused does not
//! send it again; one stop is forgiven, the second bars the member's access-token user (or,
//! without one, its address) from that room, on this relay. A stop for an update over the
//! apply budget names no one: a loaded machine can make one of an honest update.

use std::collections::HashMap;
use std::net::IpAddr;

/// Who a stop counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Offender {
    /// The user an access token names (its hash).
    User(u64),
    /// An address, on a relay without tokens (keyed as the address's budgets are).
    Address(IpAddr),
}

impl Offender {
    /// The user of `user` (a hash, 0 for none), else the address.
    pub(crate) fn of(user: u64, address: IpAddr) -> Self {
        match user {
            0 => Offender::Address(address),
            user => Offender::User(user),
        }
    }

    /// What the offender is, for a close reason.
    fn what(&self) -> &'static str {
        match self {
            Offender::User(_) => "this access token's user",
            Offender::Address(_) => "this address",
        }
    }
}

struct Record {
    /// Stops counted since `since`.
    stops: u32,
    /// When the first of them was, in the relay's milliseconds.
    since: u64,
    /// Kept out until then (0: not kept out).
    until: u64,
}

/// The stops of each room by each offender, within the bar's time.
pub(crate) struct Offences {
    bar_ms: u64,
    records: HashMap<(String, Offender), Record>,
}

impl Offences {
    /// No stops yet; `bar_ms` is both the time within which two stops bar an offender and how
    /// long the bar lasts (0: no bar).
    pub(crate) fn new(bar_ms: u64) -> Self {
        Self {
            bar_ms,
            records: HashMap::new(),
        }
    }

    /// Counts a stop of `room` by `offender` at `now`; returns whether it is now kept out.
    pub(crate) fn count(&mut self, room: &str, offender: Offender, now: u64) -> bool {
        if self.bar_ms == 0 {
            return false;
        }
        let bar = self.bar_ms;
        // What has expired goes: a stop is rare (each costs its sender a refusal and the room a
        // reload), so a walk over the records here is cheap.
        self.records
            .retain(|_, r| r.since.saturating_add(bar) > now || r.until > now);
        let record = self
            .records
            .entry((room.to_owned(), offender))
            .or_insert(Record {
                stops: 0,
                since: now,
                until: 0,
            });
        if record.since.saturating_add(bar) <= now {
            record.stops = 0;
            record.since = now;
        }
        record.stops += 1;
        if record.stops >= 2 {
            record.until = now.saturating_add(bar);
        }
        record.until > now
    }

    /// If `offender` is kept out of `room` at `now`, the reason to close its join with (short:
    /// a close reason holds 123 bytes).
    pub(crate) fn barred(&self, room: &str, offender: Offender, now: u64) -> Option<String> {
        let record = self.records.get(&(room.to_owned(), offender))?;
        let left = record.until.checked_sub(now).filter(|&left| left > 0)?;
        Some(format!(
            "{} stopped the room twice within {} s; it may join again in {} s",
            offender.what(),
            self.bar_ms / 1_000,
            left.div_ceil(1_000)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Offender = Offender::User(1);

    #[test]
    fn the_second_stop_within_the_bar_keeps_the_offender_out_of_that_room_for_the_bar() {
        let mut offences = Offences::new(600_000);
        assert!(!offences.count("doc", A, 1_000));
        assert_eq!(offences.barred("doc", A, 1_001), None);
        assert!(offences.count("doc", A, 2_000));
        let reason = offences.barred("doc", A, 2_001).unwrap();
        assert!(reason.contains("may join again in 600 s"), "{reason}");
        assert_eq!(offences.barred("other", A, 2_001), None);
        assert_eq!(offences.barred("doc", Offender::User(2), 2_001), None);
        assert_eq!(offences.barred("doc", A, 602_000), None);
    }

    #[test]
    fn stops_further_apart_than_the_bar_are_forgiven() {
        let mut offences = Offences::new(600_000);
        assert!(!offences.count("doc", A, 0));
        assert!(!offences.count("doc", A, 600_000));
        assert!(offences.count("doc", A, 700_000));
    }

    #[test]
    fn without_a_bar_no_one_is_kept_out() {
        let mut offences = Offences::new(0);
        for now in 0..3 {
            assert!(!offences.count("doc", A, now));
        }
        assert_eq!(offences.barred("doc", A, 3), None);
    }
}
