//! The deterministic pattern: a room's `value(step)`, computed alike by every node.
//!
//! The seed specification defines the pattern iteratively. With `k = step mod reset_interval`,
//! `value(step)` is the room's `seed` when `k = 0`, and otherwise the digit collapse of the previous
//! value times the `multiplier`. Walking that chain costs `k` multiplications per call, and the
//! seed's answer, a cache of every step seen, grows without bound.
//!
//! The digit collapse is the digital root, and the digital root is multiplicative modulo 9. So for
//! `k >= 1` the chain equals `collapse(seed * multiplier^k)`, and `multiplier^k mod 9` repeats with
//! a period that divides 6 from `k = 2` on. [`PatternConfig`] keeps those eight values in a fixed
//! table when it is built, and [`PatternConfig::value`] is one division and one table look-up: O(1)
//! time, O(1) memory. The tests check the table against the iterative definition.
//!
//! A pattern value is a public function of the step. It catches nodes that disagree about the step
//! and accidental corruption of the step field; it authenticates nothing, since anyone can compute it.

use serde::{Deserialize, Serialize};

/// A room's logical clock reading. Steps only grow; the highest step a node has accepted is its
/// `local` step (see [`crate::clock`]).
pub type Step = u64;

/// A pattern value: what [`PatternConfig::value`] gives for a step.
pub type PatternValue = u64;

/// Collapses `n` to one digit by summing its decimal digits until one is left: `157 -> 13 -> 4`.
///
/// `collapse_digits(0)` is 0, and for `n > 0` the result is the digital root `1 + (n - 1) mod 9`.
/// This is the seed specification's `collapseDigits`, digit by digit, without strings.
pub fn collapse_digits(mut n: u64) -> u64 {
    while n > 9 {
        let mut sum = 0;
        while n > 0 {
            sum += n % 10;
            n /= 10;
        }
        n = sum;
    }
    n
}

/// Why a [`PatternConfig`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A reset interval of 0 would make `step mod reset_interval` undefined.
    #[error("reset_interval must be at least 1 (got 0)")]
    ZeroResetInterval,
    /// A seed of 0 makes every value 0: the pattern could never catch anything.
    #[error("seed must be at least 1: a seed of 0 makes every pattern value 0")]
    ZeroSeed,
    /// A multiplier of 0 makes every value after a reset 0.
    #[error("multiplier must be at least 1: a multiplier of 0 makes every value after a reset 0")]
    ZeroMultiplier,
    /// `seed × multiplier` or `9 × multiplier` does not fit in 64 bits, so the iterative
    /// definition would overflow.
    #[error(
        "seed {seed} × multiplier {multiplier} overflows a 64-bit integer; use smaller values"
    )]
    Overflow {
        /// The refused seed.
        seed: u64,
        /// The refused multiplier.
        multiplier: u64,
    },
    /// A room setting outside its range.
    #[error("{field} is {value}; it must be between 1 and {max}")]
    OutOfRange {
        /// Which setting.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A value is larger than JavaScript can represent exactly (2^53 - 1).
    #[error("{field} is {value}, more than JavaScript's largest safe integer (2^53 - 1)")]
    UnsafeForJs {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Largest integer a JavaScript number holds exactly: `2^53 - 1`. Configurations are limited to
/// it so that a room behaves the same in Rust and in the browser.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The serialisable fields of a pattern configuration, before validation.
///
/// Every node of a room must use the same three numbers; the relay sends them in its welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PatternParams {
    /// The value at every multiple of `reset_interval` (default 7).
    pub seed: u64,
    /// What each value is multiplied by before it is collapsed (default 7).
    pub multiplier: u64,
    /// Steps between two resets to `seed`, the room's phase length (default 100).
    pub reset_interval: u64,
}

impl Default for PatternParams {
    fn default() -> Self {
        Self {
            seed: 7,
            multiplier: 7,
            reset_interval: 100,
        }
    }
}

/// A validated pattern configuration that computes `value(step)` in O(1).
///
/// ```
/// use pattern_mesh_core::pattern::PatternConfig;
/// let p = PatternConfig::default();
/// assert_eq!([0, 1, 2, 3, 4].map(|s| p.value(s)), [7, 4, 1, 7, 4]);
/// assert_eq!([100, 101, 102].map(|s| p.value(s)), [7, 4, 1]);
/// assert_eq!(p.phase(250), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternConfig {
    params: PatternParams,
    /// `table[k]` is the value at phase offset `k` for `k` in `1..=7`; from `k = 2` on the values
    /// repeat with period 6 (see the module documentation). `table[0]` is unused.
    table: [u8; 8],
}

impl Default for PatternConfig {
    fn default() -> Self {
        // Not `expect`: that would keep `ConfigError`'s `Debug` (and the standard library's
        // string escaping) in every wasm build for a panic that cannot happen.
        Self::new(PatternParams::default())
            .unwrap_or_else(|_| unreachable!("the default configuration is valid"))
    }
}

impl TryFrom<PatternParams> for PatternConfig {
    type Error = ConfigError;

    fn try_from(params: PatternParams) -> Result<Self, ConfigError> {
        Self::new(params)
    }
}

impl PatternConfig {
    /// Validates `params` and precomputes the value table.
    pub fn new(params: PatternParams) -> Result<Self, ConfigError> {
        let PatternParams {
            seed,
            multiplier,
            reset_interval,
        } = params;
        if reset_interval == 0 {
            return Err(ConfigError::ZeroResetInterval);
        }
        if seed == 0 {
            return Err(ConfigError::ZeroSeed);
        }
        if multiplier == 0 {
            return Err(ConfigError::ZeroMultiplier);
        }
        for (field, value) in [
            ("seed", seed),
            ("multiplier", multiplier),
            ("resetInterval", reset_interval),
        ] {
            if value > MAX_SAFE_INTEGER {
                return Err(ConfigError::UnsafeForJs { field, value });
            }
        }
        if seed.checked_mul(multiplier).is_none() || multiplier.checked_mul(9).is_none() {
            return Err(ConfigError::Overflow { seed, multiplier });
        }
        // Walk the iterative definition for offsets 1..=7; it is exact, and the offsets beyond
        // repeat (multiplier^k mod 9 has a period dividing 6 from k = 2 on).
        let mut table = [0u8; 8];
        let mut value = seed;
        for slot in table.iter_mut().skip(1) {
            value = collapse_digits(value * multiplier);
            *slot = value as u8;
        }
        Ok(Self { params, table })
    }

    /// The configuration's parameters.
    pub fn params(&self) -> PatternParams {
        self.params
    }

    /// The value at every phase start.
    pub fn seed(&self) -> u64 {
        self.params.seed
    }

    /// What each value is multiplied by before it is collapsed.
    pub fn multiplier(&self) -> u64 {
        self.params.multiplier
    }

    /// Steps per phase.
    pub fn reset_interval(&self) -> u64 {
        self.params.reset_interval
    }

    /// The pattern value of `step`, in constant time.
    pub fn value(&self, step: Step) -> PatternValue {
        let k = step % self.params.reset_interval;
        match k {
            0 => self.params.seed,
            1..=7 => u64::from(self.table[k as usize]),
            _ => u64::from(self.table[2 + ((k - 2) % 6) as usize]),
        }
    }

    /// Whether `pattern` is the value of `step`.
    pub fn matches(&self, step: Step, pattern: PatternValue) -> bool {
        self.value(step) == pattern
    }

    /// The phase `step` belongs to: `step / reset_interval`. Phase boundaries are the room's
    /// synchronisation checkpoints.
    pub fn phase(&self, step: Step) -> u64 {
        step / self.params.reset_interval
    }

    /// The first step of the phase after the one `step` is in: the next checkpoint.
    /// Saturates at `u64::MAX`.
    pub fn next_boundary(&self, step: Step) -> Step {
        (self.phase(step).saturating_add(1)).saturating_mul(self.params.reset_interval)
    }
}

/// The seed specification's iterative definition, step by step from the last reset. It costs
/// `step mod reset_interval` multiplications; it exists to check [`PatternConfig::value`] against.
pub fn iterative_value(params: &PatternParams, step: Step) -> PatternValue {
    let k = step % params.reset_interval;
    let mut value = params.seed;
    for _ in 0..k {
        value = collapse_digits(value * params.multiplier);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_follows_the_seed_examples() {
        assert_eq!(collapse_digits(157), 4);
        assert_eq!(collapse_digits(49), 4);
        assert_eq!(collapse_digits(28), 1);
        assert_eq!(collapse_digits(0), 0);
        assert_eq!(collapse_digits(9), 9);
        assert_eq!(collapse_digits(u64::MAX), 1 + (u64::MAX - 1) % 9);
    }

    #[test]
    fn collapse_is_the_digital_root() {
        for n in 1..100_000u64 {
            assert_eq!(collapse_digits(n), 1 + (n - 1) % 9, "n = {n}");
        }
    }

    #[test]
    fn default_sequence_matches_the_seed_table() {
        let p = PatternConfig::default();
        let first: Vec<_> = (0..5).map(|s| p.value(s)).collect();
        assert_eq!(first, [7, 4, 1, 7, 4]);
        let after_reset: Vec<_> = (100..103).map(|s| p.value(s)).collect();
        assert_eq!(after_reset, [7, 4, 1]);
    }

    #[test]
    fn the_seed_illustration_of_step_47_is_not_what_the_algorithm_gives() {
        // The seed document says "step 47 -> 6"; with seed 7 and multiplier 7 the sequence is
        // 7, 4, 1 repeating, so step 47 (47 mod 3 = 2) is 1. The algorithm wins.
        assert_eq!(PatternConfig::default().value(47), 1);
    }

    #[test]
    fn phases_and_boundaries() {
        let p = PatternConfig::default();
        assert_eq!(p.phase(0), 0);
        assert_eq!(p.phase(99), 0);
        assert_eq!(p.phase(100), 1);
        assert_eq!(p.next_boundary(0), 100);
        assert_eq!(p.next_boundary(100), 200);
        assert_eq!(p.next_boundary(u64::MAX), u64::MAX);
    }

    #[test]
    fn closed_form_equals_iteration_below_one_million_with_the_defaults() {
        let params = PatternParams::default();
        let p = PatternConfig::new(params).unwrap();
        for step in 0..1_000_000 {
            assert_eq!(p.value(step), iterative_value(&params, step), "step {step}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let base = PatternParams::default();
        let with = |f: fn(&mut PatternParams)| {
            let mut p = base;
            f(&mut p);
            PatternConfig::new(p)
        };
        assert_eq!(
            with(|p| p.reset_interval = 0),
            Err(ConfigError::ZeroResetInterval)
        );
        assert_eq!(with(|p| p.seed = 0), Err(ConfigError::ZeroSeed));
        assert_eq!(with(|p| p.multiplier = 0), Err(ConfigError::ZeroMultiplier));
        assert!(matches!(
            with(|p| {
                p.seed = MAX_SAFE_INTEGER;
                p.multiplier = MAX_SAFE_INTEGER;
            }),
            Err(ConfigError::Overflow { .. })
        ));
        assert!(matches!(
            with(|p| p.seed = MAX_SAFE_INTEGER + 1),
            Err(ConfigError::UnsafeForJs { field: "seed", .. })
        ));
        let message = with(|p| p.reset_interval = 0).unwrap_err().to_string();
        assert!(message.contains("reset_interval"), "{message}");
    }
}
