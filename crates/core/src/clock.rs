//! The step clock: a node's view of the room's global step.
//!
//! A node keeps `local`, its view of the room's step. Sending takes `local + 1`; accepting a
//! message whose step is above `local` moves `local` up by exactly one, whatever that step is;
//! joining fast-forwards to the room's step from the relay's welcome. Every move reports whether
//! it crossed into a new phase, because phase boundaries are the room's checkpoints (see
//! [`crate::pattern::PatternConfig::phase`]).
//!
//! **Why one step per message.** The relay moves the room's step by the same rule (a message it
//! fans out to everyone, stamped above the room step, adds one), so the room step counts
//! messages, and no sender can drag it: a member stamping each message 1,000 steps ahead moves
//! it no faster than one stamping `local + 1`. Under the seed's rule (the highest step wins)
//! such a member pushed every honest member's inputs behind a game room's stale window.
//!
//! The same rule keeps receivers in agreement with the relay: a receiver takes messages in the
//! order the relay accepted them, and its own sends only add to `local`, so when a message
//! arrives `local` is at least the room step the relay checked it against. A message the relay
//! found within `max_future` is then within `max_future` of the receiver too.

use crate::pattern::{PatternConfig, PatternValue, Step};

/// A step to send at, with its pattern value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The step.
    pub step: Step,
    /// `value(step)`.
    pub pattern: PatternValue,
}

/// How the clock moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// `local` before.
    pub from: Step,
    /// `local` after (equal to `from` when the clock did not move).
    pub to: Step,
    /// The phase entered, if the move crossed one or more phase boundaries.
    pub entered_phase: Option<u64>,
}

impl Advance {
    /// Whether the clock moved forward.
    pub fn moved(&self) -> bool {
        self.to > self.from
    }
}

/// The clock cannot go past `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the step clock is at its maximum, {}", u64::MAX)]
pub struct StepOverflow;

/// A node's step clock.
#[derive(Debug, Clone)]
pub struct StepClock {
    pattern: PatternConfig,
    local: Step,
}

impl StepClock {
    /// A clock at step 0.
    pub fn new(pattern: PatternConfig) -> Self {
        Self { pattern, local: 0 }
    }

    /// The highest step accepted or sent.
    pub fn local(&self) -> Step {
        self.local
    }

    /// The pattern the clock stamps with.
    pub fn pattern(&self) -> &PatternConfig {
        &self.pattern
    }

    /// The phase of `local`.
    pub fn phase(&self) -> u64 {
        self.pattern.phase(self.local)
    }

    /// The next phase boundary after `local`: the step of the next checkpoint.
    pub fn next_checkpoint(&self) -> Step {
        self.pattern.next_boundary(self.local)
    }

    /// Takes the next step to send at (`local + 1`), moving `local` to it.
    // Not an iterator: the clock also moves on `accept` and `join`, and it can fail.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<(Tick, Advance), StepOverflow> {
        let step = self.local.checked_add(1).ok_or(StepOverflow)?;
        let advance = self.move_to(step);
        Ok((
            Tick {
                step,
                pattern: self.pattern.value(step),
            },
            advance,
        ))
    }

    /// Records an accepted message's step: a step above `local` moves `local` by one.
    pub fn accept(&mut self, step: Step) -> Advance {
        if step > self.local {
            self.move_to(self.local + 1)
        } else {
            self.move_to(self.local)
        }
    }

    /// Moves past `step` at once: for a frame this node sent outside the clock (a raw frame),
    /// whose step no later message of the node may share.
    pub fn pass(&mut self, step: Step) -> Advance {
        self.move_to(step)
    }

    /// Fast-forwards to the room's high step on joining. The value of any step is O(1), so
    /// nothing is replayed from the last reset.
    pub fn join(&mut self, room_high: Step) -> Advance {
        self.move_to(room_high)
    }

    /// Moves `local` back to `step` (never forward): for a node the relay says may stamp from
    /// there, whose clock was ahead of the room (restored at a stored ceiling).
    pub fn rewind(&mut self, step: Step) {
        self.local = self.local.min(step);
    }

    fn move_to(&mut self, step: Step) -> Advance {
        let from = self.local;
        let to = from.max(step);
        self.local = to;
        let entered_phase =
            (self.pattern.phase(to) > self.pattern.phase(from)).then(|| self.pattern.phase(to));
        Advance {
            from,
            to,
            entered_phase,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_takes_local_plus_one_with_its_pattern() {
        let mut clock = StepClock::new(PatternConfig::default());
        let (tick, _) = clock.next().unwrap();
        assert_eq!(
            tick,
            Tick {
                step: 1,
                pattern: 4
            }
        );
        assert_eq!(clock.local(), 1);
        let (tick, _) = clock.next().unwrap();
        assert_eq!(
            tick,
            Tick {
                step: 2,
                pattern: 1
            }
        );
    }

    #[test]
    fn a_message_ahead_moves_the_clock_by_one_whatever_its_step() {
        let mut clock = StepClock::new(PatternConfig::default());
        assert_eq!(clock.accept(1_000).to, 1);
        assert_eq!(clock.accept(2_000).to, 2);
        let back = clock.accept(2);
        assert!(!back.moved());
        assert_eq!(clock.local(), 2);
        assert_eq!(clock.next().unwrap().0.step, 3);
        assert_eq!(clock.pass(10).to, 10);
        assert_eq!(clock.next().unwrap().0.step, 11);
    }

    #[test]
    fn crossing_a_boundary_reports_the_phase_entered() {
        let mut clock = StepClock::new(PatternConfig::default());
        assert_eq!(clock.join(99).entered_phase, None);
        let (tick, advance) = clock.next().unwrap();
        assert_eq!(
            tick,
            Tick {
                step: 100,
                pattern: 7
            }
        );
        assert_eq!(advance.entered_phase, Some(1));
        assert_eq!(clock.phase(), 1);
        assert_eq!(clock.next_checkpoint(), 200);
        assert_eq!(clock.join(250).entered_phase, Some(2));
        assert_eq!(
            clock.join(120).entered_phase,
            None,
            "joining never goes back"
        );
        assert_eq!(clock.local(), 250);
    }

    #[test]
    fn the_clock_refuses_to_wrap() {
        let mut clock = StepClock::new(PatternConfig::default());
        clock.join(u64::MAX);
        assert_eq!(clock.next(), Err(StepOverflow));
    }
}
