//! Choosing a group for a request (the routing policy), ejecting groups that keep failing (a
//! circuit breaker per group), and bounding retries (a budget shared by all requests).

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How the router picks among usable groups of a model. Every policy prefers groups whose queue
/// had room at the last poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The group with the fewest outstanding tokens: the larger of the router's own count
    /// (prompt + remaining max_new_tokens of its requests there) and the cached tokens the
    /// leader reported in its last `Load` (which include other routers' requests).
    LeastTokens,
    /// Requests whose prompts share their first blocks of tokens go to the same group (where
    /// that prefix's KV may be cached): rendezvous (consistent) hashing of the prefix, with
    /// bounded load, so a hot prefix spills over instead of piling up. A session id, when
    /// given, is the key instead.
    Prefix,
    /// Least tokens, but a request with a session id goes to the session's group (rendezvous
    /// hashing with bounded load). The default: see docs/benchmarks.md.
    #[default]
    Session,
    /// Each group in turn.
    RoundRobin,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastTokens => "least-tokens",
            Policy::Prefix => "prefix",
            Policy::Session => "session",
            Policy::RoundRobin => "round-robin",
        }
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "least-tokens" => Ok(Policy::LeastTokens),
            "prefix" => Ok(Policy::Prefix),
            "session" => Ok(Policy::Session),
            "round-robin" => Ok(Policy::RoundRobin),
            other => Err(format!(
                "unknown routing policy '{other}': use least-tokens, prefix, session or round-robin"
            )),
        }
    }
}

/// Tokens per block, and blocks hashed, for prefix affinity: the first 64 tokens (a system
/// prompt or a shared document start) decide the group.
pub const PREFIX_BLOCK: usize = 16;
pub const PREFIX_BLOCKS: usize = 4;

/// A group may take up to this factor of the average load before an affinity key spills to the
/// next group in its order (consistent hashing with bounded loads, Mirrokni et al. 2018).
const LOAD_FACTOR: f64 = 1.25;

/// What a request offers for affinity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteKey {
    pub session: Option<u64>,
    pub prefix: Option<u64>,
}

impl RouteKey {
    pub fn new(session_id: &str, prompt: &[u32]) -> Self {
        Self {
            session: (!session_id.is_empty()).then(|| fnv1a(session_id.as_bytes(), &[])),
            prefix: prefix_key(prompt),
        }
    }
}

/// A hash of the prompt's first whole blocks (up to [`PREFIX_BLOCKS`]); prompts shorter than
/// one block hash whole.
pub fn prefix_key(prompt: &[u32]) -> Option<u64> {
    if prompt.is_empty() {
        return None;
    }
    let n = if prompt.len() < PREFIX_BLOCK {
        prompt.len()
    } else {
        (prompt.len() / PREFIX_BLOCK).min(PREFIX_BLOCKS) * PREFIX_BLOCK
    };
    let bytes: Vec<u8> = prompt[..n].iter().flat_map(|t| t.to_le_bytes()).collect();
    Some(fnv1a(&bytes, &[]))
}

pub fn fnv1a(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.iter().chain([0u8].iter()).chain(b) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One candidate as the policy sees it.
pub struct Candidate<'a> {
    pub url: &'a str,
    /// Requests ahead of a new one (ours in flight + the leader's running and waiting).
    pub requests: u64,
    /// Outstanding tokens (see [`Policy::LeastTokens`]).
    pub tokens: u64,
}

/// The index of the chosen candidate; `rr` is the rotation counter (ties and round robin).
pub fn choose(policy: Policy, cands: &[Candidate<'_>], key: RouteKey, rr: usize) -> Option<usize> {
    if cands.is_empty() {
        return None;
    }
    let affinity = match policy {
        Policy::Prefix => key.session.or(key.prefix),
        Policy::Session => key.session,
        Policy::LeastTokens | Policy::RoundRobin => None,
    };
    if let Some(k) = affinity {
        return Some(bounded_rendezvous(cands, k));
    }
    let n = cands.len();
    if policy == Policy::RoundRobin {
        return Some(rr % n);
    }
    let min = cands.iter().map(|c| c.tokens).min()?;
    // Ties rotate, so equal groups share a burst that arrives between two polls.
    (0..n)
        .map(|i| (rr + i) % n)
        .find(|&i| cands[i].tokens == min)
}

/// Candidates in the key's rendezvous order (highest hash of key and URL first); the first whose
/// load stays within [`LOAD_FACTOR`] times the average (counting this request) takes it.
fn bounded_rendezvous(cands: &[Candidate<'_>], key: u64) -> usize {
    let total: u64 = cands.iter().map(|c| c.requests).sum::<u64>() + 1;
    let bound = (LOAD_FACTOR * total as f64 / cands.len() as f64).ceil() as u64;
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(fnv1a(&key.to_le_bytes(), cands[i].url.as_bytes())));
    order
        .iter()
        .copied()
        .find(|&i| cands[i].requests < bound)
        .unwrap_or(order[0])
}

/// Consecutive failures that eject a group.
pub const BREAKER_THRESHOLD: u32 = 3;
/// First ejection; doubles with each failed probe, up to [`BREAKER_MAX`].
pub const BREAKER_BASE: Duration = Duration::from_secs(5);
pub const BREAKER_MAX: Duration = Duration::from_secs(60);

/// A group's circuit breaker. Closed: in rotation. Open: ejected until `open_until`; then one
/// request at a time is let through as a probe: success closes it, failure ejects it for twice
/// as long.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    trips: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// What a recorded outcome did to the breaker, for logs and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum BreakerChange {
    None,
    Ejected(Duration),
    Closed,
}

impl Breaker {
    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May the group get a request now?
    pub fn available(&self, now: Instant) -> bool {
        let s = self.state();
        match s.open_until {
            None => true,
            Some(t) => now >= t && !s.probing,
        }
    }

    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.state().open_until.is_some()
    }

    /// The group was picked; returns true if this request is its probe.
    pub fn picked(&self, now: Instant) -> bool {
        let mut s = self.state();
        if s.open_until.is_some_and(|t| now >= t) {
            s.probing = true;
            return true;
        }
        false
    }

    /// A probe ended without an outcome (client gone): let the next request probe.
    pub fn probe_abandoned(&self) {
        self.state().probing = false;
    }

    pub fn success(&self) -> BreakerChange {
        let mut s = self.state();
        let was_open = s.open_until.is_some();
        *s = BreakerState::default();
        if was_open {
            BreakerChange::Closed
        } else {
            BreakerChange::None
        }
    }

    pub fn failure(&self, now: Instant) -> BreakerChange {
        let mut s = self.state();
        let trip = if s.open_until.is_some() {
            true // a failed probe
        } else {
            s.failures += 1;
            s.failures >= BREAKER_THRESHOLD
        };
        if !trip {
            return BreakerChange::None;
        }
        s.trips += 1;
        let cooldown = BREAKER_BASE
            .saturating_mul(1 << (s.trips - 1).min(6))
            .min(BREAKER_MAX);
        s.open_until = Some(now + cooldown);
        s.failures = 0;
        s.probing = false;
        BreakerChange::Ejected(cooldown)
    }
}

/// Retries allowed: [`Self::RATIO`] of the requests seen, plus [`Self::FLOOR_PER_SEC`] a
/// second, banked up to [`Self::CAP`]. When groups fail wholesale, retries then add at most
/// that much load instead of multiplying it.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<(f64, Instant)>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            state: Mutex::new((Self::CAP, Instant::now())),
        }
    }
}

impl RetryBudget {
    pub const RATIO: f64 = 0.1;
    pub const FLOOR_PER_SEC: f64 = 5.0;
    pub const CAP: f64 = 50.0;

    fn refill(s: &mut (f64, Instant), now: Instant, add: f64) {
        let secs = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + secs * Self::FLOOR_PER_SEC + add).min(Self::CAP);
        s.1 = now;
    }

    /// A new request: earns [`Self::RATIO`] of a retry.
    pub fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::refill(&mut s, Instant::now(), Self::RATIO);
    }

    /// Takes one retry if the budget has it.
    pub fn try_withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::refill(&mut s, Instant::now(), 0.0);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cands<'a>(urls: &'a [&'a str], requests: &[u64]) -> Vec<Candidate<'a>> {
        urls.iter()
            .zip(requests)
            .map(|(u, &r)| Candidate {
                url: u,
                requests: r,
                tokens: r * 100,
            })
            .collect()
    }

    const URLS: [&str; 3] = ["http://a:1", "http://b:1", "http://c:1"];

    #[test]
    fn policies_parse_and_name_themselves() {
        for p in [
            Policy::LeastTokens,
            Policy::Prefix,
            Policy::Session,
            Policy::RoundRobin,
        ] {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
        }
        let e = "fastest".parse::<Policy>().unwrap_err();
        assert!(e.contains("least-tokens") && e.contains("'fastest'"), "{e}");
    }

    #[test]
    fn prefix_keys_cover_the_first_blocks_only() {
        let sys: Vec<u32> = (0..100).collect();
        let mut a = sys.clone();
        a.extend([7, 8, 9]);
        let mut b = sys.clone();
        b.extend([1, 2]);
        assert_eq!(prefix_key(&a), prefix_key(&b));
        assert_ne!(prefix_key(&a), prefix_key(&(50..150).collect::<Vec<_>>()));
        // Short prompts hash whole; 20 tokens hash their first block.
        assert_ne!(prefix_key(&[1, 2, 3]), prefix_key(&[1, 2, 4]));
        let x: Vec<u32> = (0..20).collect();
        let mut y = x.clone();
        y[18] = 99;
        assert_eq!(prefix_key(&x), prefix_key(&y));
        assert_eq!(prefix_key(&[]), None);
    }

    #[test]
    fn least_tokens_and_round_robin() {
        let c = cands(&URLS, &[3, 1, 2]);
        for rr in 0..5 {
            assert_eq!(
                choose(Policy::LeastTokens, &c, RouteKey::default(), rr),
                Some(1)
            );
        }
        let picks: Vec<usize> = (0..6)
            .map(|rr| choose(Policy::RoundRobin, &c, RouteKey::default(), rr).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        // Least tokens ignores affinity keys.
        let key = RouteKey {
            session: Some(1),
            prefix: Some(2),
        };
        assert_eq!(choose(Policy::LeastTokens, &c, key, 0), Some(1));
    }

    #[test]
    fn affinity_sticks_spreads_keys_and_spills_when_overloaded() {
        let idle = cands(&URLS, &[0, 0, 0]);
        let mut seen = std::collections::HashSet::new();
        for k in 0..30u64 {
            let key = RouteKey {
                session: None,
                prefix: Some(fnv1a(&k.to_le_bytes(), &[])),
            };
            let first = choose(Policy::Prefix, &idle, key, 0).unwrap();
            for rr in 1..4 {
                assert_eq!(choose(Policy::Prefix, &idle, key, rr), Some(first));
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "30 keys should use all 3 groups");

        let key = RouteKey {
            session: None,
            prefix: Some(42),
        };
        let home = choose(Policy::Prefix, &idle, key, 0).unwrap();
        // The home group far above the average: the key spills to another group.
        let mut loads = [1, 1, 1];
        loads[home] = 9;
        let busy = cands(&URLS, &loads);
        assert_ne!(choose(Policy::Prefix, &busy, key, 0), Some(home));
        // Slightly above the average is within the bound: stays home.
        loads[home] = 2;
        let busy = cands(&URLS, &loads);
        assert_eq!(choose(Policy::Prefix, &busy, key, 0), Some(home));

        // Session: the session id decides; without one, least tokens.
        let s = RouteKey {
            session: Some(7),
            prefix: Some(42),
        };
        let by_session = choose(Policy::Session, &idle, s, 0);
        assert_eq!(choose(Policy::Prefix, &idle, s, 0), by_session);
        let c = cands(&URLS, &[3, 1, 2]);
        assert_eq!(choose(Policy::Session, &c, key, 0), Some(1));
    }

    #[test]
    fn breaker_ejects_after_repeated_failures_and_probes_back() {
        let b = Breaker::default();
        let t0 = Instant::now();
        assert_eq!(b.failure(t0), BreakerChange::None);
        assert_eq!(b.failure(t0), BreakerChange::None);
        // A success in between resets the count.
        assert_eq!(b.success(), BreakerChange::None);
        assert_eq!(b.failure(t0), BreakerChange::None);
        assert_eq!(b.failure(t0), BreakerChange::None);
        assert_eq!(b.failure(t0), BreakerChange::Ejected(BREAKER_BASE));
        assert!(!b.available(t0));
        let later = t0 + BREAKER_BASE;
        assert!(b.available(later));
        // One probe at a time.
        assert!(b.picked(later));
        assert!(!b.available(later));
        // A failed probe ejects for twice as long.
        assert_eq!(b.failure(later), BreakerChange::Ejected(BREAKER_BASE * 2));
        let again = later + BREAKER_BASE * 2;
        assert!(b.picked(again));
        b.probe_abandoned();
        assert!(b.available(again));
        assert!(b.picked(again));
        assert_eq!(b.success(), BreakerChange::Closed);
        assert!(b.available(again) && !b.is_open());
        assert!(!b.picked(again));
    }

    #[test]
    fn retry_budget_is_bounded() {
        let b = RetryBudget::default();
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.try_withdraw() {
                granted += 1;
            }
        }
        // The banked cap plus 10% of 1000 requests (plus a little floor refill while looping).
        assert!(
            (100..200).contains(&granted),
            "{granted} retries for 1000 requests"
        );
    }
}
