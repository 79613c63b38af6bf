//! A token bucket on a clock that is passed in: the relay's rate limit and the client's pacing
//! use the same arithmetic, so a client paced a little under the announced rate is never refused.

/// `rate` tokens a second, at most `capacity` at once. Time is in milliseconds.
///
/// A cost larger than the bucket goes into debt (see [`TokenBucket::try_take_n`]), repaid at
/// the debt rate, which is the rate unless [`TokenBucket::paced`] set another: a client paced
/// under the relay's rate owes the relay only what the relay's own bucket owes, repaid as fast.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_ms: f64,
    debt_per_ms: f64,
    capacity: f64,
    tokens: f64,
    last: u64,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate: f64, capacity: f64, now: u64) -> Self {
        let capacity = capacity.max(1.0);
        let per_ms = rate.max(0.001) / 1_000.0;
        Self {
            per_ms,
            debt_per_ms: per_ms,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// A full bucket at time `now` whose debt is repaid at `debt_rate` tokens a second (at
    /// least `rate`).
    pub fn paced(rate: f64, debt_rate: f64, capacity: f64, now: u64) -> Self {
        let mut bucket = Self::new(rate, capacity, now);
        bucket.debt_per_ms = bucket.per_ms.max(debt_rate / 1_000.0);
        bucket
    }

    /// The same bucket with `other`'s rates and capacity from `now` on: what it holds, or owes,
    /// it keeps (at most the new capacity).
    pub fn retune(&mut self, other: &TokenBucket, now: u64) {
        self.refill(now);
        self.per_ms = other.per_ms;
        self.debt_per_ms = other.debt_per_ms;
        self.capacity = other.capacity;
        self.tokens = self.tokens.min(self.capacity);
    }

    fn refill(&mut self, now: u64) {
        if now > self.last {
            let mut elapsed = (now - self.last) as f64;
            if self.tokens < 0.0 {
                let repaid_in = -self.tokens / self.debt_per_ms;
                if elapsed < repaid_in {
                    self.tokens += elapsed * self.debt_per_ms;
                    elapsed = 0.0;
                } else {
                    self.tokens = 0.0;
                    elapsed -= repaid_in;
                }
            }
            self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
            self.last = now;
        }
    }

    /// Milliseconds from the last refill until the bucket holds `want` tokens.
    fn wait_for(&self, want: f64) -> f64 {
        let mut tokens = self.tokens;
        let mut wait = 0.0;
        if tokens < 0.0 {
            wait += -tokens / self.debt_per_ms;
            tokens = 0.0;
        }
        wait + (want - tokens).max(0.0) / self.per_ms
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: u64) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens if they are there, or when the bucket is at least half full (a cost
    /// larger than that goes into debt, repaid before anything else passes: a large message is
    /// delayed, never refused forever, and the average rate holds).
    pub fn try_take_n(&mut self, n: u64, now: u64) -> bool {
        self.refill(now);
        let n = n as f64;
        if self.tokens >= n.min(self.capacity / 2.0).max(1.0) {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Puts `n` tokens taken at or before `now` back (at most up to the capacity): what was
    /// taken for something that did not happen.
    pub fn give_back(&mut self, n: u64, now: u64) {
        self.refill(now);
        self.tokens = (self.tokens + n as f64).min(self.capacity);
    }

    /// Whether [`TokenBucket::try_take_n`] of `n` would pass at `now`; takes nothing.
    pub fn can_take_n(&mut self, n: u64, now: u64) -> bool {
        self.refill(now);
        self.tokens >= (n as f64).min(self.capacity / 2.0).max(1.0)
    }

    /// When the bucket will be full again if nothing more is taken.
    pub fn full_at(&self) -> u64 {
        self.last + self.wait_for(self.capacity).ceil() as u64
    }

    /// About when `n` more tokens, taken as they come, will have been paid for: the time a
    /// backlog of `n` takes to pass.
    pub fn drained_at(&self, n: u64) -> u64 {
        if n == 0 {
            return self.last;
        }
        self.last + self.wait_for(n as f64).ceil() as u64
    }

    /// When [`TokenBucket::try_take_n`] of `n` will pass: the time to try again.
    pub fn ready_at(&self, n: u64) -> u64 {
        let want = (n as f64).min(self.capacity / 2.0).max(1.0);
        if self.tokens >= want {
            return self.last;
        }
        self.last + self.wait_for(want).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10.0, 5.0, 0);
        assert_eq!((0..10).filter(|_| bucket.try_take(0)).count(), 5);
        assert_eq!(bucket.ready_at(1), 100);
        assert!(!bucket.try_take(99));
        assert!(bucket.try_take(100));
        assert_eq!((0..100).filter(|_| bucket.try_take(1_000)).count(), 5);
    }

    /// Several threads share a bucket: one may pass a clock read a millisecond before another
    /// thread's. What the bucket holds decides, as for a take.
    #[test]
    fn can_take_n_takes_nothing_and_a_clock_read_earlier_still_passes() {
        let mut bucket = TokenBucket::new(10.0, 5.0, 0);
        assert!(bucket.try_take(100));
        assert!(bucket.can_take_n(1, 99));
        assert!(bucket.can_take_n(1, 99), "it took nothing");
        assert_eq!((0..10).filter(|_| bucket.try_take(99)).count(), 4);
        assert!(!bucket.can_take_n(1, 99));
    }

    #[test]
    fn a_cost_larger_than_the_bucket_waits_for_half_a_bucket_then_goes_into_debt() {
        let mut bucket = TokenBucket::new(10.0, 6.0, 0);
        assert!(bucket.try_take_n(8, 0));
        assert!(!bucket.try_take(0));
        assert_eq!(bucket.ready_at(1), 300, "the debt of 2 is repaid first");
        assert!(!bucket.try_take_n(8, 400));
        assert_eq!(bucket.ready_at(8), 500, "then half the bucket");
        assert!(bucket.try_take_n(8, 500));
    }

    #[test]
    fn a_paced_bucket_repays_its_debt_at_the_debt_rate_and_refills_at_its_own() {
        // 1 token a second, debt repaid at 10: a cost of 26 from a bucket of 6 owes 20 for 2 s.
        let mut bucket = TokenBucket::paced(1.0, 10.0, 6.0, 0);
        assert!(bucket.try_take_n(26, 0));
        assert_eq!(
            bucket.ready_at(1),
            3_000,
            "2 s of debt, then 1 s for a token"
        );
        assert_eq!(bucket.full_at(), 8_000);
        assert!(!bucket.try_take(2_990));
        assert!(bucket.try_take(3_010));
        // Retuned to a faster rate, it keeps what it owes.
        let mut owing = TokenBucket::paced(1.0, 10.0, 6.0, 0);
        owing.try_take_n(26, 0);
        owing.retune(&TokenBucket::paced(2.0, 10.0, 4.0, 1_000), 1_000);
        assert_eq!(
            owing.ready_at(1),
            2_500,
            "1 s of debt left, then half a second"
        );
    }
}
