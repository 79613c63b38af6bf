//! A token bucket on a clock that is passed in: the relay's rate limit and the client's pacing
//! use the same arithmetic, so a client paced a little under the announced rate is never refused.

/// `rate` tokens a second, at most `capacity` at once. Time is in milliseconds.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_ms: f64,
    capacity: f64,
    tokens: f64,
    last: u64,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate: f64, capacity: f64, now: u64) -> Self {
        let capacity = capacity.max(1.0);
        Self {
            per_ms: rate.max(0.001) / 1_000.0,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: u64) {
        if now > self.last {
            let gained = (now - self.last) as f64 * self.per_ms;
            self.tokens = (self.tokens + gained).min(self.capacity);
            self.last = now;
        }
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

    /// When the bucket will be full again if nothing more is taken.
    pub fn full_at(&self) -> u64 {
        self.last + ((self.capacity - self.tokens).max(0.0) / self.per_ms).ceil() as u64
    }

    /// When [`TokenBucket::try_take_n`] of `n` will pass: the time to try again.
    pub fn ready_at(&self, n: u64) -> u64 {
        let want = (n as f64).min(self.capacity / 2.0).max(1.0);
        if self.tokens >= want {
            return self.last;
        }
        self.last + ((want - self.tokens) / self.per_ms).ceil() as u64
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
}
