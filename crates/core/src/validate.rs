//! The validator: the rules every receiver, and the relay, applies to a stamped frame before it is
//! applied, stored or forwarded.
//!
//! The rules run in this order, and the first that fails names the [`Reason`]:
//!
//! 1. the frame decodes and is within limits (the decoder: `malformed`, `tooLarge`; count them
//!    with [`Validator::record`]);
//! 2. `pattern == value(step)`, else `patternMismatch`;
//! 3. the sender is who the frame came from, else `senderMismatch` (see [`Origin`]);
//! 4. `step > last_step[sender]`, else `replay`: per sender, steps strictly increase, and this,
//!    not the pattern, is what stops a message from being used twice;
//! 5. `step <= local + max_future`, else `futureStep`: a node may not drag the room clock forward;
//! 6. with a stale window (real-time rooms), `step >= local - stale_window`, else `stale`; for
//!    live data and signals only (see [`Kind::may_be_stale`]): a late edit is still an edit, and
//!    what a client replays from the log is history (see [`Validator::check_logged`]).
//!
//! Per-sender state is one entry per sender, bounded by [`ValidatorConfig::max_senders`]. When the
//! table is full, senders idle for longer than [`ValidatorConfig::idle_after_ms`] are evicted, and
//! if that frees too little, the least recently seen quarter goes; each sweep frees at least a
//! quarter of the table, so the cost per message stays O(1) amortised. Eviction never opens a
//! replay hole: the validator remembers the highest step of every evicted sender as a floor, and
//! a sender it does not know must send above that floor.
//!
//! The validator is sans-IO: the caller passes the receiver's clock (`local`) and the time in
//! milliseconds, so the same code runs in the browser, in the relay and in tests.

use crate::vec_map::VecMap;

use crate::pattern::{ConfigError, PatternConfig, Step};
use crate::wire::{Kind, NodeId, Reason, RoomConfig, Stamp};

/// Where a stamped frame came from, for rule 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Straight from a connection whose node id is known (the relay's view): the sender must be
    /// this id.
    Connection(NodeId),
    /// Forwarded by the relay to the node `receiver`: a frame that claims to come from the
    /// receiver itself, or from the never-assigned id 0, is forged.
    Relayed {
        /// The receiving node's own id.
        receiver: NodeId,
    },
}

/// The outcome of validating one stamped frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every rule passed; the sender's last step is now this frame's step.
    Accepted,
    /// A rule failed; nothing was recorded for the sender.
    Rejected(Reason),
}

impl Verdict {
    /// Whether the frame was accepted.
    pub fn is_accepted(self) -> bool {
        self == Verdict::Accepted
    }
}

/// A validator's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidatorConfig {
    /// The room's pattern.
    pub pattern: PatternConfig,
    /// Rule 5: how far ahead of the receiver's clock a step may be.
    pub max_future: u64,
    /// Rule 6: how far behind the step of a data message or signal may be; `None` keeps late
    /// messages (documents). Document messages are never stale (see [`Kind::may_be_stale`]).
    pub stale_window: Option<u64>,
    /// The most senders tracked at once.
    pub max_senders: usize,
    /// A sender not heard from for this long may be evicted when the table is full.
    pub idle_after_ms: u64,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        // Not `expect`, for the reason `PatternConfig::default` gives.
        Self::for_room(&RoomConfig::default())
            .unwrap_or_else(|_| unreachable!("the default room configuration is valid"))
    }
}

impl ValidatorConfig {
    /// The settings for a room, with the default sender table (4,096 senders, idle after 10
    /// minutes).
    pub fn for_room(room: &RoomConfig) -> Result<Self, ConfigError> {
        room.check()?;
        Ok(Self {
            pattern: PatternConfig::new(room.pattern)?,
            max_future: room.max_future,
            stale_window: room.stale_window,
            max_senders: 4_096,
            idle_after_ms: 10 * 60 * 1_000,
        })
    }
}

/// How many frames ended with each verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames accepted.
    pub accepted: u64,
    /// Frames rejected, by reason, indexed by `reason.code() - 1`.
    rejected: [u64; Reason::ALL.len()],
}

impl Counters {
    /// Frames rejected for `reason`.
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected[usize::from(reason.code() - 1)]
    }

    /// Frames rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    /// Every reason with its count, in code order (zeros included).
    pub fn by_reason(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL.iter().map(|&r| (r, self.rejected(r)))
    }

    fn count(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Accepted => self.accepted += 1,
            Verdict::Rejected(reason) => self.rejected[usize::from(reason.code() - 1)] += 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct SenderState {
    last_step: Step,
    last_seen_ms: u64,
    /// `last_step` came from [`Validator::restore`], not from a frame this validator accepted.
    restored: bool,
}

/// Applies the rules to stamped frames and keeps the per-sender state they need.
#[derive(Debug, Clone)]
pub struct Validator {
    config: ValidatorConfig,
    senders: VecMap<NodeId, SenderState>,
    /// The highest last step of any evicted sender: an unknown sender must send above it.
    evicted_floor: Step,
    counters: Counters,
}

impl Validator {
    /// A validator with `config` and no senders yet.
    pub fn new(config: ValidatorConfig) -> Self {
        Self {
            config,
            senders: VecMap::new(),
            evicted_floor: 0,
            counters: Counters::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ValidatorConfig {
        &self.config
    }

    /// The counts of verdicts so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How many senders are tracked now.
    pub fn tracked_senders(&self) -> usize {
        self.senders.len()
    }

    /// The last accepted step of `sender`, if it is tracked.
    pub fn last_step(&self, sender: NodeId) -> Option<Step> {
        self.senders.get(&sender).map(|s| s.last_step)
    }

    /// The step `sender` must send above, when this validator knows it for certain: its last
    /// accepted step, or, for a sender not tracked, the highest last step of the evicted
    /// senders. `None` when the last step came from [`Validator::restore`] and nothing was
    /// accepted from the sender since: a restored step may miss what was never stored.
    pub fn floor(&self, sender: NodeId) -> Option<Step> {
        match self.senders.get(&sender) {
            Some(s) if s.restored => None,
            Some(s) => Some(s.last_step),
            None => Some(self.evicted_floor),
        }
    }

    /// Restores a sender's last accepted step, from a log that outlived this validator (the
    /// relay after a restart). Keeps the higher of the known and the restored step.
    pub fn restore(&mut self, sender: NodeId, last_step: Step, now_ms: u64) {
        let (known, live) = self
            .senders
            .get(&sender)
            .map_or((0, false), |s| (s.last_step, !s.restored));
        let restored = !(live && known >= last_step);
        self.remember(sender, known.max(last_step), now_ms, restored);
    }

    /// Takes `sender` back with its exact last accepted step, kept by whoever let it go: unlike
    /// a restored one, its [`Validator::floor`] is known.
    pub fn resume(&mut self, sender: NodeId, last_step: Step, now_ms: u64) {
        let known = self.last_step(sender).unwrap_or(0);
        self.remember(sender, known.max(last_step), now_ms, false);
    }

    /// Counts a rejection decided elsewhere (a frame that did not decode, a rate limit), so that
    /// one set of counters covers every anomaly.
    pub fn record(&mut self, reason: Reason) {
        self.counters.count(Verdict::Rejected(reason));
    }

    /// Checks the stamp of a frame of `kind` against rules 2 to 6, given where it came from, the
    /// receiver's clock `local` and the time `now_ms`. On acceptance the sender's last step
    /// becomes the stamp's step; a rejection changes no state but the counters.
    pub fn check(
        &mut self,
        kind: Kind,
        stamp: &Stamp,
        origin: Origin,
        local: Step,
        now_ms: u64,
    ) -> Verdict {
        self.check_with(kind, stamp, origin, local, now_ms, true)
    }

    /// [`Validator::check`] for a message from the room log, which its log position proves new:
    /// a sender the validator does not track (evicted, or never seen) is judged by its own steps
    /// alone, not by the eviction floor. (A node that was offline while thousands of others
    /// passed through the room sends its edits at its own old steps, below the floor; they are
    /// not replays.) Nor is it ever stale: the room took it in time, and a client catching up
    /// receives it as history (a late joiner of a game room would otherwise count every input
    /// of the log as an anomaly).
    pub fn check_logged(
        &mut self,
        kind: Kind,
        stamp: &Stamp,
        origin: Origin,
        local: Step,
        now_ms: u64,
    ) -> Verdict {
        self.check_with(kind, stamp, origin, local, now_ms, false)
    }

    fn check_with(
        &mut self,
        kind: Kind,
        stamp: &Stamp,
        origin: Origin,
        local: Step,
        now_ms: u64,
        live: bool,
    ) -> Verdict {
        let verdict = self.judge(kind, stamp, origin, local, live);
        if verdict.is_accepted() {
            self.remember(stamp.sender, stamp.step, now_ms, false);
        }
        self.counters.count(verdict);
        verdict
    }

    /// The verdict [`Validator::check`] would give, without recording anything: for inspecting
    /// a frame that will not be applied.
    pub fn peek(&self, kind: Kind, stamp: &Stamp, origin: Origin, local: Step) -> Verdict {
        self.judge(kind, stamp, origin, local, true)
    }

    /// Rules 2 to 6 without side effects. A `live` message (not from the log) of an untracked
    /// sender must be above the eviction floor, and a live data message or signal may be stale.
    fn judge(&self, kind: Kind, stamp: &Stamp, origin: Origin, local: Step, live: bool) -> Verdict {
        use Verdict::Rejected;
        if !self.config.pattern.matches(stamp.step, stamp.pattern) {
            return Rejected(Reason::PatternMismatch);
        }
        let forged = match origin {
            Origin::Connection(node) => stamp.sender != node,
            Origin::Relayed { receiver } => stamp.sender == receiver || stamp.sender == 0,
        };
        if forged {
            return Rejected(Reason::SenderMismatch);
        }
        let untracked = if live { self.evicted_floor } else { 0 };
        let last = self
            .senders
            .get(&stamp.sender)
            .map_or(untracked, |s| s.last_step);
        if stamp.step <= last {
            return Rejected(Reason::Replay);
        }
        if stamp.step > local.saturating_add(self.config.max_future) {
            return Rejected(Reason::FutureStep);
        }
        if let Some(window) = self
            .config
            .stale_window
            .filter(|_| live && kind.may_be_stale())
        {
            if stamp.step < local.saturating_sub(window) {
                return Rejected(Reason::Stale);
            }
        }
        Verdict::Accepted
    }

    fn remember(&mut self, sender: NodeId, step: Step, now_ms: u64, restored: bool) {
        if !self.senders.contains_key(&sender) && self.senders.len() >= self.config.max_senders {
            self.evict(now_ms);
        }
        self.senders.insert(
            sender,
            SenderState {
                last_step: step,
                last_seen_ms: now_ms,
                restored,
            },
        );
    }

    /// Frees at least a quarter of the table: first every idle sender, then the least recently
    /// seen.
    fn evict(&mut self, now_ms: u64) {
        let capacity = self.config.max_senders;
        let target = capacity - capacity.div_ceil(4);
        let idle_after = self.config.idle_after_ms;
        let mut floor = self.evicted_floor;
        self.senders.retain(|_, s| {
            let idle = now_ms.saturating_sub(s.last_seen_ms) > idle_after;
            if idle {
                floor = floor.max(s.last_step);
            }
            !idle
        });
        if self.senders.len() > target {
            let mut seen: Vec<u64> = self.senders.values().map(|s| s.last_seen_ms).collect();
            let excess = self.senders.len() - target;
            // A heap sort rather than `select_nth_unstable`: eviction is rare, and the standard
            // library's selection adds kilobytes to the wasm package.
            crate::doc::heap_sort(&mut seen);
            let cutoff = seen[excess - 1];
            // Every sender seen before the cutoff goes, and as many seen at it as make up the
            // excess: a sender seen at the cutoff never keeps an older one in.
            let mut ties = excess - seen.iter().filter(|&&at| at < cutoff).count();
            self.senders.retain(|_, s| {
                let drop = s.last_seen_ms < cutoff
                    || (s.last_seen_ms == cutoff && ties > 0 && {
                        ties -= 1;
                        true
                    });
                if drop {
                    floor = floor.max(s.last_step);
                }
                !drop
            });
        }
        self.evicted_floor = floor;
    }

    /// A sentence that explains why `stamp` was rejected for `reason`, for reject frames and
    /// anomaly logs. Call it right after [`Validator::check`]: a rejection changes no state, so
    /// the explanation sees what the check saw.
    pub fn explain(&self, stamp: &Stamp, origin: Origin, local: Step, reason: Reason) -> String {
        let Stamp {
            sender,
            step,
            pattern,
        } = *stamp;
        match reason {
            Reason::PatternMismatch => format!(
                "pattern {pattern} is not the value of step {step}, which is {}",
                self.config.pattern.value(step)
            ),
            Reason::SenderMismatch => match origin {
                Origin::Connection(node) => {
                    format!("sender {sender} is not this connection's node id {node}")
                }
                Origin::Relayed { receiver } => {
                    format!("sender {sender} cannot be relayed to node {receiver}")
                }
            },
            Reason::Replay => format!(
                "step {step} is not above sender {sender}'s last accepted step {}",
                self.last_step(sender).unwrap_or(self.evicted_floor)
            ),
            Reason::FutureStep => format!(
                "step {step} is more than {} steps ahead of the local step {local}",
                self.config.max_future
            ),
            Reason::Stale => format!(
                "step {step} is more than {} steps behind the local step {local}",
                self.config.stale_window.unwrap_or(0)
            ),
            other => format!("rejected: {other}"),
        }
    }

    /// Stops tracking `sender` without touching the eviction floor: for a holder that keeps the
    /// sender's last step elsewhere (the relay's store) and restores it before the sender is
    /// judged again.
    pub fn release(&mut self, sender: NodeId) {
        self.senders.remove(&sender);
    }

    /// Forgets `sender` (it left for good), folding its last step into the eviction floor so that
    /// its old messages still count as replays.
    pub fn forget(&mut self, sender: NodeId) {
        if let Some(s) = self.senders.remove(&sender) {
            self.evicted_floor = self.evicted_floor.max(s.last_step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(sender: NodeId, step: Step) -> Stamp {
        Stamp {
            sender,
            step,
            pattern: PatternConfig::default().value(step),
        }
    }

    const RECEIVER: NodeId = 1 << 40;

    fn relayed() -> Origin {
        Origin::Relayed { receiver: RECEIVER }
    }

    #[test]
    fn a_good_message_is_accepted_and_recorded() {
        let mut v = Validator::new(ValidatorConfig::default());
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 5), relayed(), 4, 0),
            Verdict::Accepted
        );
        assert_eq!(v.last_step(1), Some(5));
        assert_eq!(v.counters().accepted, 1);
    }

    #[test]
    fn a_wrong_pattern_is_a_mismatch_and_changes_nothing() {
        let mut v = Validator::new(ValidatorConfig::default());
        let mut s = stamp(1, 5);
        s.pattern += 1;
        assert_eq!(
            v.check(Kind::Data, &s, relayed(), 4, 0),
            Verdict::Rejected(Reason::PatternMismatch)
        );
        assert_eq!(v.last_step(1), None);
        assert_eq!(v.counters().rejected(Reason::PatternMismatch), 1);
    }

    #[test]
    fn explanations_name_the_numbers() {
        let mut v = Validator::new(ValidatorConfig::default());
        assert!(v
            .check(Kind::Data, &stamp(1, 12), relayed(), 12, 0)
            .is_accepted());
        let replay = stamp(1, 9);
        assert_eq!(
            v.explain(&replay, relayed(), 12, Reason::Replay),
            "step 9 is not above sender 1's last accepted step 12"
        );
        let wrong = Stamp {
            pattern: 5,
            ..stamp(2, 12)
        };
        assert_eq!(
            v.explain(&wrong, relayed(), 12, Reason::PatternMismatch),
            "pattern 5 is not the value of step 12, which is 7"
        );
    }

    #[test]
    fn peek_judges_without_recording() {
        let mut v = Validator::new(ValidatorConfig::default());
        assert!(v.peek(Kind::Data, &stamp(1, 5), relayed(), 5).is_accepted());
        assert_eq!(v.last_step(1), None);
        assert!(v
            .check(Kind::Data, &stamp(1, 5), relayed(), 5, 0)
            .is_accepted());
        assert_eq!(
            v.peek(Kind::Data, &stamp(1, 5), relayed(), 5),
            Verdict::Rejected(Reason::Replay)
        );
        assert_eq!(v.counters().accepted, 1);
    }

    #[test]
    fn forged_senders_are_refused() {
        let mut v = Validator::new(ValidatorConfig::default());
        assert_eq!(
            v.check(Kind::Data, &stamp(2, 1), Origin::Connection(1), 0, 0),
            Verdict::Rejected(Reason::SenderMismatch)
        );
        assert_eq!(
            v.check(Kind::Data, &stamp(RECEIVER, 1), relayed(), 0, 0),
            Verdict::Rejected(Reason::SenderMismatch)
        );
        assert_eq!(
            v.check(Kind::Data, &stamp(0, 1), relayed(), 0, 0),
            Verdict::Rejected(Reason::SenderMismatch)
        );
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 1), Origin::Connection(1), 0, 0),
            Verdict::Accepted
        );
    }

    #[test]
    fn replays_and_steps_at_or_below_the_last_are_refused_per_sender() {
        let mut v = Validator::new(ValidatorConfig::default());
        assert!(v
            .check(Kind::Data, &stamp(1, 10), relayed(), 10, 0)
            .is_accepted());
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 10), relayed(), 10, 0),
            Verdict::Rejected(Reason::Replay)
        );
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 9), relayed(), 10, 0),
            Verdict::Rejected(Reason::Replay)
        );
        // Another sender may use a step sender 1 already used.
        assert!(v
            .check(Kind::Data, &stamp(2, 10), relayed(), 10, 0)
            .is_accepted());
    }

    #[test]
    fn future_steps_beyond_the_window_are_refused() {
        let mut v = Validator::new(ValidatorConfig::default());
        let max = v.config().max_future;
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 50 + max + 1), relayed(), 50, 0),
            Verdict::Rejected(Reason::FutureStep)
        );
        assert!(v
            .check(Kind::Data, &stamp(1, 50 + max), relayed(), 50, 0)
            .is_accepted());
    }

    /// A late edit is still an edit: refused as stale, it would be lost, and every later edit
    /// of its sender with it (they come after a gap in its clocks).
    #[test]
    fn only_data_and_signals_are_stale_document_messages_never_are() {
        let mut game = Validator::new(ValidatorConfig {
            stale_window: Some(20),
            ..ValidatorConfig::default()
        });
        for (sender, kind) in [(1, Kind::Data), (2, Kind::Signal)] {
            assert_eq!(
                game.check(kind, &stamp(sender, 979), relayed(), 1_000, 0),
                Verdict::Rejected(Reason::Stale),
                "{kind:?}"
            );
        }
        for (sender, kind) in [
            (3, Kind::Update),
            (4, Kind::SyncRequest),
            (5, Kind::SyncState),
            (6, Kind::Checkpoint),
        ] {
            assert!(
                game.check(kind, &stamp(sender, 3), relayed(), 1_000, 0)
                    .is_accepted(),
                "{kind:?}"
            );
        }
        // The other rules hold for them all the same.
        assert_eq!(
            game.check(Kind::Update, &stamp(3, 3), relayed(), 1_000, 0),
            Verdict::Rejected(Reason::Replay)
        );
    }

    /// What comes from the log was taken in time: a client catching up gets it as history.
    #[test]
    fn nothing_from_the_log_is_stale() {
        let mut game = Validator::new(ValidatorConfig {
            stale_window: Some(20),
            ..ValidatorConfig::default()
        });
        assert!(game
            .check_logged(Kind::Data, &stamp(1, 3), relayed(), 1_000, 0)
            .is_accepted());
        assert_eq!(
            game.check(Kind::Data, &stamp(1, 4), relayed(), 1_000, 0),
            Verdict::Rejected(Reason::Stale),
            "live, it is"
        );
    }

    #[test]
    fn stale_steps_are_refused_only_with_a_window() {
        let mut doc = Validator::new(ValidatorConfig::default());
        assert!(doc
            .check(Kind::Data, &stamp(1, 3), relayed(), 1_000, 0)
            .is_accepted());
        let mut game = Validator::new(ValidatorConfig {
            stale_window: Some(20),
            ..ValidatorConfig::default()
        });
        assert_eq!(
            game.check(Kind::Data, &stamp(1, 979), relayed(), 1_000, 0),
            Verdict::Rejected(Reason::Stale)
        );
        assert!(game
            .check(Kind::Data, &stamp(1, 980), relayed(), 1_000, 0)
            .is_accepted());
    }

    #[test]
    fn the_rules_apply_in_order() {
        let mut v = Validator::new(ValidatorConfig::default());
        // Wrong pattern and forged sender and future step: the pattern is reported.
        let s = Stamp {
            sender: RECEIVER,
            step: 1_000_000,
            pattern: 0,
        };
        assert_eq!(
            v.check(Kind::Data, &s, relayed(), 0, 0),
            Verdict::Rejected(Reason::PatternMismatch)
        );
        // Forged and future: forged.
        assert_eq!(
            v.check(Kind::Data, &stamp(RECEIVER, 1_000_000), relayed(), 0, 0),
            Verdict::Rejected(Reason::SenderMismatch)
        );
    }

    #[test]
    fn idle_senders_are_evicted_and_the_table_stays_bounded() {
        let mut v = Validator::new(ValidatorConfig {
            max_senders: 8,
            idle_after_ms: 1_000,
            ..ValidatorConfig::default()
        });
        for sender in 1..=8 {
            assert!(v
                .check(Kind::Data, &stamp(sender, sender), relayed(), 100, 0)
                .is_accepted());
        }
        assert_eq!(v.tracked_senders(), 8);
        // Sender 8 stays active; the others go idle.
        assert!(v
            .check(Kind::Data, &stamp(8, 20), relayed(), 100, 1_500)
            .is_accepted());
        assert!(v
            .check(Kind::Data, &stamp(9, 30), relayed(), 100, 2_000)
            .is_accepted());
        assert_eq!(
            v.tracked_senders(),
            2,
            "the idle senders 1..=7 were evicted"
        );
        assert_eq!(v.last_step(8), Some(20));
        for sender in 10..10_000 {
            let verdict = v.check(
                Kind::Data,
                &stamp(sender, 40 + sender),
                relayed(),
                20_000,
                2_000 + sender,
            );
            assert!(verdict.is_accepted(), "sender {sender}: {verdict:?}");
            assert!(v.tracked_senders() <= 8);
        }
    }

    /// The least recently seen go first, whatever the order of their ids: senders seen at the
    /// cutoff used to make up the excess before an older sender came up, which stayed.
    #[test]
    fn eviction_drops_the_least_recently_seen_before_ties_at_the_cutoff() {
        let mut v = Validator::new(ValidatorConfig {
            max_senders: 8,
            idle_after_ms: 1_000_000,
            ..ValidatorConfig::default()
        });
        let seen = [
            (1, 10),
            (2, 10),
            (3, 5),
            (4, 20),
            (5, 20),
            (6, 20),
            (7, 20),
            (8, 20),
        ];
        for (sender, at) in seen {
            assert!(v
                .check(Kind::Data, &stamp(sender, 1), relayed(), 100, at)
                .is_accepted());
        }
        assert!(v
            .check(Kind::Data, &stamp(9, 1), relayed(), 100, 30)
            .is_accepted());
        assert_eq!(v.tracked_senders(), 7);
        assert_eq!(v.last_step(3), None, "the least recently seen went");
        assert_eq!(
            [1, 2].map(|s| v.last_step(s).is_some()),
            [false, true],
            "one of the two seen at the cutoff went"
        );
    }

    #[test]
    fn eviction_does_not_open_a_replay_hole() {
        let mut v = Validator::new(ValidatorConfig {
            max_senders: 4,
            idle_after_ms: 10,
            ..ValidatorConfig::default()
        });
        assert!(v
            .check(Kind::Data, &stamp(1, 50), relayed(), 50, 0)
            .is_accepted());
        for sender in 2..=5 {
            assert!(v
                .check(Kind::Data, &stamp(sender, 50 + sender), relayed(), 60, 100)
                .is_accepted());
        }
        assert_eq!(v.last_step(1), None, "sender 1 was evicted");
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 50), relayed(), 60, 100),
            Verdict::Rejected(Reason::Replay)
        );
    }

    #[test]
    fn forgetting_a_sender_keeps_its_old_steps_replays() {
        let mut v = Validator::new(ValidatorConfig::default());
        assert!(v
            .check(Kind::Data, &stamp(1, 7), relayed(), 7, 0)
            .is_accepted());
        v.forget(1);
        assert_eq!(v.tracked_senders(), 0);
        assert_eq!(
            v.check(Kind::Data, &stamp(1, 7), relayed(), 7, 0),
            Verdict::Rejected(Reason::Replay)
        );
    }

    #[test]
    fn counters_cover_recorded_decode_errors() {
        let mut v = Validator::new(ValidatorConfig::default());
        v.record(Reason::Malformed);
        v.record(Reason::TooLarge);
        assert_eq!(v.counters().rejected(Reason::Malformed), 1);
        assert_eq!(v.counters().rejected_total(), 2);
    }
}
