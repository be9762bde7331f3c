//! Memory limits: the admission rule that refuses an allocation which would
//! take an interpreter's live bytes over its limit.
//!
//! A [`Budget`] belongs to one interpreter. It holds the limit and what
//! hitting it did (refused requests, the largest refused request); the live
//! bytes it is checked against come from whoever counts them (the hooks'
//! ledger, or the allocator's heaps), so that the rule lives here once and each
//! back end only says what its interpreter holds now.
//!
//! # The rule
//!
//! A request for `size` bytes is admitted if `live + in_flight + size` stays
//! within the limit, where `in_flight` is what other admitted requests of the
//! same interpreter have asked for and not yet [settled](Budget::settle).
//! After a refusal the interpreter gets a *reserve* of [`RESERVE`] bytes above
//! its limit, once: CPython needs a little memory to raise and handle the
//! MemoryError (a traceback object per frame it unwinds, the frames of the
//! `except` block). The reserve is gone again once the live bytes are back
//! under the limit, and the next crossing is refused again.
//!
//! # The peak
//!
//! An interpreter's live bytes only grow through admitted requests, so the
//! highest `live + in_flight + size` an admission saw is the peak of its
//! live bytes over all domains, exact when its requests do not race
//! (otherwise a little above). Each budget keeps it while it has a limit or
//! is *watched* ([`Budget::watch`]: no limit, only the peak, which is what
//! the pytest plugin's `interheap_limit` marker reads).
//!
//! # Concurrency
//!
//! Admission adds `size` to `in_flight` (SeqCst) *before* reading the live
//! bytes, and the back end adds the block to its live bytes *before* settling
//! (taking `size` off `in_flight`). Of two requests racing for the last bytes,
//! each sees the other's `in_flight` or its live bytes (the SeqCst order puts
//! one addition first), so both cannot be admitted past the limit: the limit
//! holds exactly, at the price of a spurious refusal when two requests race
//! within `size` of it. Between recording and settling a block counts twice,
//! which can only refuse, never admit, too much.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

/// Bytes an interpreter may go over its limit after a refusal, so that
/// raising and handling the MemoryError does not fail too.
pub const RESERVE: u64 = 256 * 1024;

/// `Budget::limit_plus_one` when there is no limit (so that all-zero bytes
/// are a budget with no limit: the ledger zero-fills its buckets).
const NO_LIMIT: u64 = 0;

/// One interpreter's limit and what it refused. See the module docs.
pub struct Budget {
    /// The limit plus one, or [`NO_LIMIT`].
    limit_plus_one: AtomicU64,
    in_flight: AtomicU64,
    /// Set by a refusal; cleared by the first admission under the limit.
    in_reserve: AtomicBool,
    refused: AtomicU64,
    largest_refused: AtomicU64,
    /// Whether the limit was set for this interpreter (or a default was
    /// applied to it), so that a default limit no longer applies.
    configured: AtomicBool,
    /// The reserve in bytes, minus [`RESERVE`] (wrapping; so that all-zero
    /// bytes mean the default reserve).
    reserve_delta: AtomicU64,
    /// The highest live bytes an admission saw (see the module docs).
    peak: AtomicU64,
    /// Whether admissions compute the peak even with no limit.
    watched: AtomicBool,
    /// Whether the interpreter's start-up is known to be over (see
    /// [`Budget::mark_started`]).
    started: AtomicBool,
}

/// What [`Budget::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Admission {
    /// No limit: go on; nothing to settle.
    Unlimited,
    /// Within the limit (or the reserve): go on, then call
    /// [`Budget::settle`] with the same size once the block is counted in the
    /// live bytes, or the allocation failed.
    Admitted,
    /// Over the limit: refuse the request (it is counted); nothing to settle.
    Refused,
}

impl Admission {
    /// Whether the request may go on.
    pub fn allowed(self) -> bool {
        self != Admission::Refused
    }
}

/// A budget's figures, as read by [`Budget::snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetSnapshot {
    /// The limit on live bytes (`None`: no limit).
    pub limit: Option<u64>,
    /// Requests refused because of the limit.
    pub refused: u64,
    /// The largest refused request, in bytes (0: none).
    pub largest_refused: u64,
    /// The peak of the live bytes over all domains while a limit was set or
    /// the budget was watched (0: never; see the module docs).
    pub peak: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl Budget {
    /// A budget with no limit (all-zero bytes are one too).
    pub const fn new() -> Self {
        Budget {
            limit_plus_one: AtomicU64::new(NO_LIMIT),
            in_flight: AtomicU64::new(0),
            in_reserve: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            largest_refused: AtomicU64::new(0),
            reserve_delta: AtomicU64::new(0),
            configured: AtomicBool::new(false),
            peak: AtomicU64::new(0),
            watched: AtomicBool::new(false),
            started: AtomicBool::new(false),
        }
    }

    /// Records that the interpreter's start-up is over, for a back end that
    /// applies a default limit only then and has no other sign of it (3.12,
    /// which records no whence): the thread that created the interpreter
    /// left it. Both back ends see that on their own paths and mark it here.
    pub fn mark_started(&self) {
        if !self.started.load(Relaxed) {
            self.started.store(true, Relaxed);
        }
    }

    /// Whether [`mark_started`](Self::mark_started) was called.
    pub fn is_started(&self) -> bool {
        self.started.load(Relaxed)
    }

    /// Starts (or stops) computing the peak with no limit, from `live` now.
    pub fn watch(&self, on: bool, live: u64) {
        if on {
            self.peak.store(live, Relaxed);
        }
        self.watched.store(on, Relaxed);
    }

    /// Whether the peak is computed with no limit.
    pub fn is_watched(&self) -> bool {
        self.watched.load(Relaxed)
    }

    fn note_peak(&self, wanted: u64) {
        if wanted > self.peak.load(Relaxed) {
            self.peak.fetch_max(wanted, Relaxed);
        }
    }

    /// Whether a limit was set (or removed) for this interpreter, or a
    /// default applied to it.
    #[inline]
    pub fn configured(&self) -> bool {
        self.configured.load(Relaxed)
    }

    /// Applies a default limit unless the budget was configured already
    /// (by `set_limit` or another default); true if it applied it.
    pub fn apply_default(&self, limit: u64) -> bool {
        if self.configured.swap(true, Relaxed) {
            return false;
        }
        self.limit_plus_one.store(limit.min(u64::MAX - 1) + 1, Relaxed);
        true
    }

    /// Sets how far the interpreter may go over its limit after a refusal
    /// ([`RESERVE`] unless set; 0: never).
    pub fn set_reserve(&self, bytes: u64) {
        self.reserve_delta.store(bytes.wrapping_sub(RESERVE), Relaxed);
    }

    fn reserve(&self) -> u64 {
        self.reserve_delta.load(Relaxed).wrapping_add(RESERVE)
    }

    /// The limit, if one is set.
    #[inline(always)]
    pub fn limit(&self) -> Option<u64> {
        let stored = self.limit_plus_one.load(Relaxed);
        (stored != NO_LIMIT).then(|| stored - 1)
    }

    /// Sets (or with `None` removes) the limit. It applies to requests from
    /// now on: blocks already live stay, even above a lowered limit.
    pub fn set_limit(&self, limit: Option<u64>) {
        self.limit_plus_one.store(limit.map_or(NO_LIMIT, |l| l.min(u64::MAX - 1) + 1), Relaxed);
        self.in_reserve.store(false, Relaxed);
        self.configured.store(true, Relaxed);
    }

    /// Lowers the limit to `limit` (or sets one where there was none); false,
    /// changing nothing, if that would raise it. What an interpreter may do
    /// to itself from inside: tighten its budget, never loosen it.
    pub fn lower_limit(&self, limit: u64) -> bool {
        let wanted = limit.min(u64::MAX - 1) + 1;
        let mut current = self.limit_plus_one.load(Relaxed);
        loop {
            if current != NO_LIMIT && wanted > current {
                return false;
            }
            match self.limit_plus_one.compare_exchange_weak(current, wanted, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.configured.store(true, Relaxed);
        true
    }

    /// Asks for `size` more bytes for an interpreter that holds `live()`
    /// bytes now (`live` is called only when there is a limit, or the
    /// budget is watched).
    pub fn admit(&self, size: u64, live: impl FnOnce() -> u64) -> Admission {
        let stored = self.limit_plus_one.load(Relaxed);
        if stored == NO_LIMIT {
            if self.watched.load(Relaxed) {
                self.note_peak(live().saturating_add(self.in_flight.load(Relaxed)).saturating_add(size));
            }
            return Admission::Unlimited;
        }
        let limit = stored - 1;
        let pending = self.in_flight.fetch_add(size, SeqCst).wrapping_add(size);
        let wanted = live().saturating_add(pending);
        if wanted <= limit {
            self.note_peak(wanted);
            if self.in_reserve.load(Relaxed) {
                self.in_reserve.store(false, Relaxed);
            }
            return Admission::Admitted;
        }
        if self.in_reserve.load(Relaxed) && wanted <= limit.saturating_add(self.reserve()) {
            self.note_peak(wanted);
            return Admission::Admitted;
        }
        self.in_flight.fetch_sub(size, SeqCst);
        self.in_reserve.store(true, Relaxed);
        self.refused.fetch_add(1, Relaxed);
        self.largest_refused.fetch_max(size, Relaxed);
        Admission::Refused
    }

    /// An admitted request of `size` bytes is counted in the live bytes (or failed).
    #[inline]
    pub fn settle(&self, size: u64) {
        self.in_flight.fetch_sub(size, SeqCst);
    }

    /// The limit and what it refused.
    pub fn snapshot(&self) -> BudgetSnapshot {
        BudgetSnapshot {
            limit: self.limit(),
            refused: self.refused.load(Relaxed),
            largest_refused: self.largest_refused.load(Relaxed),
            peak: self.peak.load(Relaxed),
        }
    }

    /// Forgets what was refused and the peak (the limit stays).
    pub fn reset(&self) {
        self.refused.store(0, Relaxed);
        self.largest_refused.store(0, Relaxed);
        self.peak.store(0, Relaxed);
    }
}

/// A limit for every interpreter with an ID of at least some first ID
/// whose own limit was never set: `set_default_limit` in the hooks and the
/// allocator. Each interpreter gets a [`Budget`] of its own with that limit.
pub struct DefaultLimit {
    /// The limit plus one (0: none).
    limit_plus_one: AtomicU64,
    from_id: AtomicU64,
}

impl Default for DefaultLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl DefaultLimit {
    /// No default.
    pub const fn new() -> Self {
        DefaultLimit { limit_plus_one: AtomicU64::new(0), from_id: AtomicU64::new(u64::MAX) }
    }

    /// Sets (or with `None` removes) the default, for interpreter IDs from `from_id` on.
    pub fn set(&self, limit: Option<u64>, from_id: i64) {
        self.from_id.store(from_id.max(0) as u64, Relaxed);
        self.limit_plus_one.store(limit.map_or(0, |l| l.min(u64::MAX - 1) + 1), Relaxed);
    }

    /// The default limit and the first interpreter ID it applies to.
    pub fn get(&self) -> Option<(u64, i64)> {
        let stored = self.limit_plus_one.load(Relaxed);
        (stored != 0).then(|| (stored - 1, self.from_id.load(Relaxed) as i64))
    }

    /// The default limit for interpreter `id`, if it applies to it.
    pub fn for_interpreter(&self, id: i64) -> Option<u64> {
        self.get().and_then(|(limit, from)| (id >= from).then_some(limit))
    }

    /// Gives `budget` (of interpreter `id`) the default, unless its limit
    /// was configured already or the default does not apply; true if it did.
    pub fn apply(&self, budget: &Budget, id: i64) -> bool {
        match self.for_interpreter(id) {
            Some(limit) if !budget.configured() => budget.apply_default(limit),
            _ => false,
        }
    }
}

/// A size in bytes from a number or a text such as `"256 MB"`, `"1.5GiB"`,
/// `"64k"`: decimal units (k, KB, M, MB, G, GB, T, TB: powers of 1000) and
/// binary ones (KiB, MiB, GiB, TiB: powers of 1024), case-insensitive, `B`
/// or nothing for bytes. Refuses negative, fractional-byte, empty and
/// unparseable sizes, and sizes that do not fit 63 bits.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let bad = || {
        format!(
            "invalid size {text:?}: expected a number of bytes, or a number and a unit such as \"256 MB\" or \"1 GiB\""
        )
    };
    if number.is_empty() || number.starts_with('.') && number.len() == 1 {
        return Err(bad());
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let too_big = || format!("size {text:?} is too large");
    let mut bytes = whole.checked_mul(scale).ok_or_else(too_big)?;
    if !frac.is_empty() {
        // Exact decimal arithmetic: frac / 10^len * scale.
        if frac.len() > 18 {
            return Err(bad());
        }
        let digits: u128 = frac.parse().map_err(|_| bad())?;
        let denominator = 10u128.pow(frac.len() as u32);
        let part = digits * u128::from(scale);
        if !part.is_multiple_of(denominator) {
            return Err(format!("size {text:?} is not a whole number of bytes"));
        }
        bytes = bytes.checked_add((part / denominator) as u64).ok_or_else(too_big)?;
    }
    if bytes > i64::MAX as u64 {
        return Err(too_big());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn the_peak_is_the_highest_live_total_an_admission_saw_limited_or_watched() {
        let b = Budget::new();
        // Neither limited nor watched: nothing is computed.
        assert_eq!(b.admit(100, || panic!("live read without a limit")), Admission::Unlimited);
        assert_eq!(b.snapshot().peak, 0);
        b.watch(true, 1_000);
        assert_eq!(b.admit(500, || 1_000), Admission::Unlimited);
        assert_eq!(b.admit(200, || 900), Admission::Unlimited);
        assert_eq!(b.snapshot().peak, 1_500);
        b.watch(false, 0);
        assert_eq!(b.admit(10_000, || panic!("live read while not watched")), Admission::Unlimited);
        // With a limit: admitted requests raise it, refused ones do not.
        b.set_limit(Some(4_000));
        b.watch(true, 2_000);
        assert_eq!(b.admit(1_000, || 2_000), Admission::Admitted);
        b.settle(1_000);
        assert_eq!(b.admit(5_000, || 3_000), Admission::Refused);
        assert_eq!(b.snapshot().peak, 3_000);
        b.reset();
        assert_eq!(b.snapshot().peak, 0);
    }

    #[test]
    fn a_limit_can_be_lowered_but_never_raised_that_way() {
        let b = Budget::new();
        assert!(b.lower_limit(1_000), "no limit: any limit is lower");
        assert_eq!(b.limit(), Some(1_000));
        assert!(!b.lower_limit(1_001));
        assert_eq!(b.limit(), Some(1_000));
        assert!(b.lower_limit(1_000) && b.lower_limit(10));
        assert_eq!(b.limit(), Some(10));
        assert!(b.configured());
    }

    #[test]
    fn no_limit_admits_everything() {
        let b = Budget::new();
        assert_eq!(b.admit(u64::MAX / 2, || unreachable!()), Admission::Unlimited);
        assert_eq!(b.snapshot(), BudgetSnapshot::default());
    }

    #[test]
    fn a_request_that_would_cross_the_limit_is_refused_and_counted() {
        let b = Budget::new();
        b.set_limit(Some(1000));
        assert_eq!(b.admit(400, || 600), Admission::Admitted, "exactly at the limit is admitted");
        b.settle(400);
        assert_eq!(b.admit(401, || 600), Admission::Refused);
        assert_eq!(b.admit(500, || 1000), Admission::Admitted, "within the reserve after a refusal");
        b.settle(500);
        assert_eq!(b.admit(RESERVE, || 1500), Admission::Refused, "beyond the reserve");
        let s = b.snapshot();
        assert_eq!((s.limit, s.refused, s.largest_refused), (Some(1000), 2, RESERVE));
    }

    #[test]
    fn after_a_refusal_the_reserve_is_granted_once_until_back_under_the_limit() {
        let b = Budget::new();
        b.set_limit(Some(1000));
        assert_eq!(b.admit(2000, || 900), Admission::Refused, "refused");
        // Raising the MemoryError may go over, within the reserve.
        assert_eq!(b.admit(500, || 900), Admission::Admitted);
        b.settle(500);
        assert_eq!(b.admit(RESERVE, || 1400), Admission::Refused, "not beyond the reserve");
        // Back under the limit: the reserve is gone.
        assert_eq!(b.admit(10, || 100), Admission::Admitted);
        b.settle(10);
        assert_eq!(b.admit(1000, || 110), Admission::Refused);
        assert_eq!(b.snapshot().refused, 3);
    }

    #[test]
    fn a_default_applies_once_and_never_over_an_explicit_setting() {
        let b = Budget::new();
        assert!(b.apply_default(100));
        assert_eq!(b.limit(), Some(100));
        assert!(!b.apply_default(5), "a default applies once");
        b.set_limit(None);
        assert!(!b.apply_default(5), "an explicit removal stands");
        assert_eq!(b.limit(), None);
        let c = Budget::new();
        c.set_limit(Some(7));
        assert!(!c.apply_default(5));
        assert_eq!(c.limit(), Some(7));
    }

    #[test]
    fn removing_or_raising_the_limit_admits_again() {
        let b = Budget::new();
        b.set_limit(Some(10));
        assert_eq!(b.admit(11, || 0), Admission::Refused);
        b.set_limit(Some(100));
        assert_eq!(b.admit(11, || 0), Admission::Admitted);
        b.settle(11);
        b.set_limit(None);
        assert_eq!(b.admit(1 << 40, || 0), Admission::Unlimited);
        assert_eq!(b.snapshot().limit, None);
    }

    #[test]
    fn racing_threads_never_take_live_bytes_over_the_limit() {
        // 4 threads allocate 1000-byte blocks against a 100 kB limit, recording
        // into a shared live counter before settling, as a back end does.
        let budget = Arc::new(Budget::new());
        budget.set_limit(Some(100_000));
        budget.set_reserve(0);
        let live = Arc::new(AtomicU64::new(0));
        let max_seen = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (budget, live, max_seen) = (budget.clone(), live.clone(), max_seen.clone());
                std::thread::spawn(move || {
                    let mut held = 0u64;
                    for round in 0..crate::iterations(20_000, 300) {
                        if round % 7 == 6 && held > 0 {
                            live.fetch_sub(1000, SeqCst);
                            held -= 1;
                            continue;
                        }
                        if budget.admit(1000, || live.load(SeqCst)).allowed() {
                            let now = live.fetch_add(1000, SeqCst) + 1000;
                            max_seen.fetch_max(now, SeqCst);
                            budget.settle(1000);
                            held += 1;
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(max_seen.load(SeqCst) <= 100_000, "{}", max_seen.load(SeqCst));
        assert!(budget.snapshot().refused > 0, "the limit was reached");
    }

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256 MB"), Ok(256_000_000));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size(" 1.5 GiB "), Ok(3 << 29));
        assert_eq!(parse_size("2g"), Ok(2_000_000_000));
        assert_eq!(parse_size("64k"), Ok(64_000));
        assert_eq!(parse_size("10 b"), Ok(10));
        assert_eq!(parse_size(".5 KB"), Ok(500));
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        for bad in ["", "-1", "-5 MB", "MB", "12 parsecs", "1.2.3", "1e9", ".", "0x10"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("invalid size"), "{bad:?}: {err}");
        }
        assert!(parse_size("1.0001 KB").unwrap_err().contains("whole number of bytes"));
        assert!(parse_size("99999999999 TB").unwrap_err().contains("too large"));
        assert!(parse_size("9223372036854775808").unwrap_err().contains("too large"));
    }
}
