//! What a client session keeps in storage so that it survives its process (a browser tab that
//! closes, a crash): its identity in the room, where it is in the room's log, and its outbox.
//!
//! A [`Session`](crate::session::Session) made with
//! [`SessionConfig::persist`](crate::session::SessionConfig::persist) asks its driver to store
//! [`Saved`] whenever it changes ([`Output::Save`](crate::session::Output::Save)), and sends no
//! message before the stamp it carries is stored: a message that may have reached the relay is
//! always in storage with the stamp it went out with. A session restored from it
//! ([`SessionConfig::restore`](crate::session::SessionConfig::restore)) resumes the node, sends
//! its outbox again under the same stamps (the relay answers `replay` for what it stored
//! already), and so delivers every message exactly once.
//!
//! The document is not part of it: the driver stores the document's updates beside it, in the
//! same write (see the browser client's IndexedDB store).

use crate::pattern::Step;
use crate::wire::{
    read_room_config, room_config, Body, DecodeError, Frame, Limits, NodeId, Reader, ResumeToken,
    RoomConfig, Stamp, Stamped, Writer,
};

/// The first byte of an encoded [`Saved`]: the format's version.
const VERSION: u8 = 1;

/// A session's state as storage keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// The node id the relay gave (0: never joined).
    pub node: NodeId,
    /// The token that resumes `node`.
    pub token: Option<ResumeToken>,
    /// The identity of the room's log the position counts in (0: none yet).
    pub log: u64,
    /// The last log position seen: catch-up continues after it.
    pub position: u64,
    /// The room's configuration from the last welcome.
    pub room: Option<RoomConfig>,
    /// The node's ceiling: the session stamped no step above it, and a session restored from
    /// this state starts its clock there.
    pub step: Step,
    /// Messages stamped and maybe sent, not yet acknowledged: encoded frames, in step order.
    pub sent: Vec<Vec<u8>>,
    /// Messages not stamped yet, in order: each body encoded in a frame with a zero stamp.
    pub unsent: Vec<Vec<u8>>,
    /// The relay lost the room's history (`log` is its new log), and this session's document
    /// has not gone back to it yet: a session restored from this state gives it back once it
    /// has caught up. (Stored last, and only when set: a state stored before the field existed
    /// reads as `false`.)
    pub give_back: bool,
    /// An edit of the document was refused for good ([`Session::diverged`](crate::session::Session::diverged)):
    /// the stored document holds what the room does not, and a session restored from this
    /// state sets it aside ([`Saved::set_aside_document`]). Not part of [`Saved::encode`]:
    /// storage keeps it beside the encoded state, which a tab of an older version of the
    /// package reads too (a byte it does not know would have it delete the record).
    pub diverged: bool,
}

/// What a stored [`Saved`] covers, for [`Session::handle_saved`](crate::session::Session::handle_saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Every stamped message up to this step is stored.
    pub upto: Step,
    /// The node's ceiling: no step above it was used.
    pub ceiling: Step,
    /// The log the steps are of (another log, after the relay lost the room, begins again).
    pub log: u64,
    /// The node the steps are of (a new node's steps begin again).
    pub node: NodeId,
}

impl Saved {
    /// What storing this state covers.
    pub fn stored(&self) -> Stored {
        Stored {
            upto: self.upto(),
            ceiling: self.step,
            log: self.log,
            node: self.node,
        }
    }

    /// The highest step among the stamped messages (0 if none): storing this state covers
    /// every stamp up to it.
    pub fn upto(&self) -> Step {
        self.sent
            .iter()
            .filter_map(|bytes| crate::wire::peek_stamp(bytes).map(|(_, s)| s.step))
            .max()
            .unwrap_or(0)
    }

    /// Encodes the state for storage.
    pub fn encode(&self) -> Vec<u8> {
        let size = 64
            + self.sent.iter().map(|b| b.len() + 5).sum::<usize>()
            + self.unsent.iter().map(|b| b.len() + 5).sum::<usize>();
        let mut w = Writer::with_capacity(size);
        w.u8(VERSION);
        w.var(self.node);
        w.flag(self.token.is_some());
        if let Some(token) = &self.token {
            w.raw(token);
        }
        w.var(self.log);
        w.var(self.position);
        w.flag(self.room.is_some());
        if let Some(config) = &self.room {
            room_config(&mut w, config);
        }
        w.var(self.step);
        for list in [&self.sent, &self.unsent] {
            w.var(list.len() as u64);
            for bytes in list {
                w.bytes(bytes);
            }
        }
        if self.give_back {
            w.flag(true);
        }
        w.0
    }

    /// Whether `bytes` were stored by a newer version of this format: a tab of an older
    /// version of the package cannot read them, and leaves them to a tab that can.
    pub fn stored_by_newer_version(bytes: &[u8]) -> bool {
        bytes.first().is_some_and(|&version| version > VERSION)
    }

    /// Decodes a stored state; an error says what was wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Saved, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let node = r.var("node")?;
        let token = if r.flag("token")? {
            Some(r.array::<16>("token")?)
        } else {
            None
        };
        let log = r.var("log")?;
        let position = r.var("position")?;
        let room = if r.flag("room")? {
            Some(read_room_config(&mut r)?)
        } else {
            None
        };
        let step = r.var("step")?;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let count = r.var("count")?;
            for _ in 0..count {
                list.push(r.bytes("message")?.to_vec());
            }
        }
        // Written only when set: a byte there must say so.
        let give_back = r.remaining() == 1 && bytes.last() == Some(&1);
        if give_back {
            r.u8("give back")?;
        }
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        let [sent, unsent] = lists;
        Ok(Saved {
            node,
            token,
            log,
            position,
            room,
            step,
            sent,
            unsent,
            give_back,
            diverged: false,
        })
    }

    /// The bodies of every message in the outbox, sent ones first; entries that do not decode
    /// are left out.
    pub fn bodies(&self) -> Vec<Body> {
        self.sent
            .iter()
            .chain(&self.unsent)
            .filter_map(|bytes| match decode_message(bytes) {
                Ok(Stamped { body, .. }) => Some(body),
                Err(_) => None,
            })
            .collect()
    }

    /// How many messages of the outbox do not decode (a damaged record, or a message of a newer
    /// version): [`Saved::bodies`] leaves them out, and whoever takes the outbox in says so.
    pub fn broken(&self) -> usize {
        self.sent
            .iter()
            .chain(&self.unsent)
            .filter(|bytes| decode_message(bytes).is_err())
            .count()
    }

    /// Whether another session may take in this outbox ([`Saved::adopt`]): not when a data
    /// message of it was stamped, which may have reached the relay under this identity and would
    /// arrive twice if sent again under another. Such a record waits for a tab that resumes its
    /// own identity, where the relay answers `replay` for what it has.
    pub fn adoptable(&self) -> bool {
        self.sent.iter().all(|bytes| {
            !matches!(
                decode_message(bytes),
                Ok(Stamped {
                    body: Body::Data { .. },
                    ..
                })
            )
        })
    }

    /// Takes in the outbox of another stored session of the same room (a tab that closed and
    /// that no open tab speaks for): its messages join this outbox unstamped, to go out under
    /// this session's identity. Only for an [`adoptable`](Saved::adoptable) one: its stamped
    /// messages are updates, which change nothing when they arrive twice.
    pub fn adopt(&mut self, other: &Saved) {
        for bytes in other.sent.iter().chain(&other.unsent) {
            // One that does not decode is kept as it is: the session restored from this
            // outbox says it is lost (see `Session::restore`).
            self.unsent.push(match decode_message(bytes) {
                Ok(Stamped { body, .. }) => encode_unsent(body),
                Err(_) => bytes.clone(),
            });
        }
        // A session never welcomed knows no log: it takes the other's, whose document the
        // stored one holds (one per room), read from the start of that log. Without it, a relay
        // that lost that log looks like a first visit, and the document never goes back.
        if self.log == 0 && other.room.is_some() {
            self.log = other.log;
            self.room = other.room;
            self.position = 0;
        }
        // What the other owed the same log, this session gives in its stead.
        if other.give_back && other.log == self.log && self.log != 0 {
            self.give_back = true;
        }
        // The document is one per room: the other's refused edit is in it.
        self.diverged |= other.diverged;
    }

    /// Copies the document updates of a live tab's outbox (another tab of the room, open now,
    /// whose record this session cannot take): its messages join this outbox unstamped, ahead
    /// of what this session writes. The stored document is one per room, so this tab shows
    /// that tab's edits, and its own edits may build on them: sent alone, they would be refused
    /// for clocks the relay lacks until that tab is back online. An update that arrives twice
    /// changes nothing. The live tab's other messages stay its own.
    pub fn carry_updates_of(&mut self, live: &Saved) {
        let carried: Vec<Vec<u8>> = live
            .sent
            .iter()
            .chain(&live.unsent)
            .filter_map(|bytes| match decode_message(bytes) {
                Ok(Stamped {
                    body: body @ Body::Update { .. },
                    ..
                }) => Some(encode_unsent(body)),
                _ => None,
            })
            .collect();
        self.unsent.splice(0..0, carried);
    }

    /// Whether a session restored from this state sets the stored document aside
    /// ([`Saved::set_aside_document`]): it diverged, and it is not owed to a relay that lost
    /// the room's history (where it may be the only copy of everyone's edits).
    pub fn sets_aside_document(&self) -> bool {
        self.diverged && !self.give_back
    }

    /// The stored document diverged from the room's (an edit of it was refused for good, and
    /// it shows what no one else does): the driver does not load it, and the session restored
    /// from this state catches up from the start of the room's log instead, into an empty
    /// document. Its outbox stays: what the room has of it is acknowledged (`replay`), the
    /// rest is sent, and what the room refuses is said to the application as ever. Returns the
    /// document updates of the outbox, for the driver to apply to the new document (they show
    /// where the room's document has what they build on).
    pub fn set_aside_document(&mut self) -> Vec<Vec<u8>> {
        self.diverged = false;
        self.position = 0;
        self.bodies()
            .into_iter()
            .filter_map(|body| match body {
                Body::Update { update, .. } => Some(update),
                _ => None,
            })
            .collect()
    }
}

/// A body waiting to be stamped, as [`Saved::unsent`] holds it.
pub(crate) fn encode_unsent(body: Body) -> Vec<u8> {
    Frame::stamped(
        Stamp {
            sender: 0,
            step: 0,
            pattern: 0,
        },
        body,
    )
    .encode()
}

/// Decodes one message of a [`Saved`] outbox (or of the outbox in memory): this client
/// encoded it, under the limits of a relay that may have allowed more than the default, so
/// nothing bounds its length.
pub(crate) fn decode_message(bytes: &[u8]) -> Result<Stamped, DecodeError> {
    let limits = Limits {
        max_frame: usize::MAX,
        max_message: usize::MAX,
        ..Limits::default()
    };
    match Frame::decode_with(bytes, &limits)? {
        Frame::Stamped(stamped) => Ok(stamped),
        _ => Err(DecodeError::Empty("stamped message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Json;

    fn data(n: u64) -> Body {
        Body::Data {
            data: Json::from_value(&serde_json::json!({ "n": n })).unwrap(),
        }
    }

    /// A relay may allow messages over the default 64 MiB (`--max-message`): a stored message
    /// of such a size decoded as too large, and was lost on a reload, and dropped without a
    /// word when another tab took the outbox in.
    #[test]
    fn a_stored_message_over_the_default_message_limit_still_decodes() {
        let big = Frame::stamped(
            Stamp {
                sender: 3,
                step: 2,
                pattern: 5,
            },
            Body::Update {
                doc: "content".into(),
                update: vec![0; (65 << 20) + 1],
            },
        )
        .encode();
        let saved = Saved {
            sent: vec![big],
            ..Saved::default()
        };
        assert_eq!(saved.bodies().len(), 1);
        let mut other = Saved::default();
        other.adopt(&saved);
        assert_eq!(other.unsent.len(), 1);
    }

    /// A live tab's document updates are copied, unstamped; its other messages are not.
    #[test]
    fn a_live_tabs_updates_are_carried_and_its_other_messages_are_not() {
        let update = Body::Update {
            doc: "content".into(),
            update: vec![1, 2, 3],
        };
        let stamp = Stamp {
            sender: 3,
            step: 2,
            pattern: 5,
        };
        let live = Saved {
            sent: vec![
                Frame::stamped(stamp, update.clone()).encode(),
                Frame::stamped(stamp, data(1)).encode(),
            ],
            unsent: vec![encode_unsent(data(2)), encode_unsent(update.clone())],
            ..Saved::default()
        };
        let mut own = Saved {
            unsent: vec![encode_unsent(data(9))],
            ..Saved::default()
        };
        own.carry_updates_of(&live);
        assert_eq!(own.bodies(), vec![update.clone(), update, data(9)]);
    }

    #[test]
    fn a_saved_state_decodes_to_itself() {
        let saved = Saved {
            node: 7,
            token: Some([9; 16]),
            log: (1 << 53) - 1,
            position: 42,
            room: Some(RoomConfig::default()),
            step: 1_000,
            sent: vec![Frame::stamped(
                Stamp {
                    sender: 7,
                    step: 990,
                    pattern: 3,
                },
                data(1),
            )
            .encode()],
            unsent: vec![encode_unsent(data(2))],
            give_back: true,
            diverged: false,
        };
        let bytes = saved.encode();
        assert_eq!(Saved::decode(&bytes).unwrap(), saved);
        assert!(!Saved::stored_by_newer_version(&bytes));
        assert!(Saved::stored_by_newer_version(&[VERSION + 1, 0]));
        // A state stored before `give_back` existed (it ends after the lists) owes nothing.
        let old = Saved {
            give_back: false,
            ..saved.clone()
        };
        let old_bytes = &bytes[..bytes.len() - 1];
        assert_eq!(old.encode(), old_bytes);
        assert_eq!(Saved::decode(old_bytes).unwrap(), old);
        assert_eq!(saved.upto(), 990);
        assert_eq!(saved.bodies(), vec![data(1), data(2)]);
        assert_eq!(
            Saved::decode(&Saved::default().encode()).unwrap(),
            Saved::default()
        );
        // `diverged` is kept beside the bytes: they are what an older version wrote.
        let diverged = Saved {
            diverged: true,
            ..saved.clone()
        };
        assert_eq!(diverged.encode(), bytes);
    }

    /// A state whose document diverged sets the document aside when restored: it catches up
    /// from the start of the log, its outbox kept (its updates for the new document); not
    /// when it is owed to a relay that lost the room, where it may be the only copy.
    #[test]
    fn a_diverged_document_is_set_aside_unless_it_is_owed() {
        let update = Body::Update {
            doc: "content".into(),
            update: vec![1, 2, 3],
        };
        let mut saved = Saved {
            log: 5,
            position: 40,
            room: Some(RoomConfig::default()),
            unsent: vec![encode_unsent(data(1)), encode_unsent(update)],
            diverged: true,
            ..Saved::default()
        };
        assert!(!Saved {
            give_back: true,
            ..saved.clone()
        }
        .sets_aside_document());
        let mut adopting = Saved::default();
        adopting.adopt(&saved);
        assert!(adopting.diverged, "the one stored document is the other's");
        assert!(saved.sets_aside_document());
        assert_eq!(saved.set_aside_document(), [vec![1, 2, 3]]);
        assert_eq!((saved.position, saved.log, saved.diverged), (0, 5, false));
        assert_eq!(saved.unsent.len(), 2, "the outbox stays");
    }

    /// A closed tab's record whose stamped messages include a data message is not taken in
    /// by another identity (the message would arrive twice: once as stored under the first
    /// identity, once restamped); one whose stamped messages are updates, or that has only
    /// unsent ones, is.
    #[test]
    fn only_an_outbox_without_stamped_data_is_adopted() {
        let stamped = |body: Body| {
            Frame::stamped(
                Stamp {
                    sender: 3,
                    step: 2,
                    pattern: 5,
                },
                body,
            )
            .encode()
        };
        let update = Body::Update {
            doc: "content".into(),
            update: vec![0, 0],
        };
        let with_data = Saved {
            sent: vec![stamped(update.clone()), stamped(data(1))],
            ..Saved::default()
        };
        assert!(!with_data.adoptable());
        let with_update = Saved {
            sent: vec![stamped(update.clone())],
            unsent: vec![encode_unsent(data(2))],
            ..Saved::default()
        };
        assert!(with_update.adoptable());
        let mut mine = Saved::default();
        mine.adopt(&with_update);
        assert_eq!(mine.bodies(), vec![update, data(2)]);
    }

    #[test]
    fn a_damaged_saved_state_is_an_error_not_a_panic() {
        let bytes = Saved {
            sent: vec![vec![1, 2, 3]],
            ..Saved::default()
        }
        .encode();
        for cut in 0..bytes.len() {
            assert!(Saved::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            Saved::decode(&[2]),
            Err(DecodeError::UnknownVersion(2))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Saved::decode(&long),
            Err(DecodeError::TrailingBytes(1))
        ));
    }
}
