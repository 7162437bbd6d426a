//! Rate limits for the wake relay: a token bucket per client address, charged for every
//! request before anything else is read, and one for all clients together, charged only for
//! requests that carried the relay key (so clients without it cannot spend it for the rest).
//! The table of clients is bounded: past [`MAX_CLIENTS`] the idle ones are dropped, and an
//! address that finds no room shares one bucket with every other such address, so a flood
//! from many addresses costs memory for none of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Client addresses tracked at most.
pub const MAX_CLIENTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_minute: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(per_minute),
            at: now,
        }
    }

    fn refill(&mut self, per_minute: u32, now: Instant) {
        let rate = f64::from(per_minute) / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(per_minute));
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, per_minute: u32, now: Instant) -> Result<(), Duration> {
        self.refill(per_minute, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let rate = f64::from(per_minute.max(1)) / 60.0;
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Debug)]
struct Buckets {
    total: Bucket,
    clients: HashMap<IpAddr, Bucket>,
    /// The bucket addresses share when the table is full.
    overflow: Bucket,
    /// When idle clients were last dropped (at most once a second).
    swept: Instant,
}

/// Requests per minute per client and in all.
#[derive(Debug)]
pub struct Throttle {
    per_client: u32,
    total: u32,
    buckets: Mutex<Buckets>,
}

impl Throttle {
    /// At most `per_client` requests a minute from one address, `total` from all.
    pub fn new(per_client: u32, total: u32) -> Self {
        let now = Instant::now();
        Self {
            per_client,
            total,
            buckets: Mutex::new(Buckets {
                total: Bucket::full(total, now),
                clients: HashMap::new(),
                overflow: Bucket::full(per_client, now),
                swept: now,
            }),
        }
    }

    /// Charges `client`'s own budget at `now`, or says when to try again.
    pub fn admit_client(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Buckets {
            clients,
            overflow,
            swept,
            ..
        } = &mut *buckets;
        let per_client = self.per_client;
        if clients.len() >= MAX_CLIENTS
            && !client.is_some_and(|c| clients.contains_key(&c))
            && now.saturating_duration_since(*swept) >= Duration::from_secs(1)
        {
            *swept = now;
            // Drop the clients whose bucket has filled up again: they are as good as new.
            clients.retain(|_, bucket| {
                bucket.refill(per_client, now);
                bucket.tokens < f64::from(per_client)
            });
        }
        let bucket = match client {
            Some(client) if clients.len() < MAX_CLIENTS || clients.contains_key(&client) => clients
                .entry(client)
                .or_insert_with(|| Bucket::full(per_client, now)),
            _ => overflow,
        };
        bucket.take(per_client, now)
    }

    /// Charges the budget all clients share at `now`, or says when to try again.
    pub fn admit_total(&self, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buckets.total.take(self.total, now)
    }

    /// Both budgets at once (a client's, then the shared one).
    pub fn admit(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        self.admit_client(client, now)?;
        self.admit_total(now)
    }

    /// Client addresses tracked now.
    pub fn clients(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clients
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Option<IpAddr> {
        Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)))
    }

    #[test]
    fn each_client_gets_its_share_and_all_together_the_total() {
        let throttle = Throttle::new(3, 5);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(throttle.admit(ip(1), t0).is_ok());
        }
        let wait = throttle.admit(ip(1), t0).unwrap_err();
        assert!((19..=21).contains(&wait.as_secs()), "{wait:?}");
        assert!(throttle.admit(ip(2), t0).is_ok());
        assert!(throttle.admit(ip(2), t0).is_ok());
        assert!(throttle.admit(ip(3), t0).is_err(), "the total is spent");
        // Twenty seconds give client 1 a token back, and the total one.
        let later = t0 + Duration::from_secs(21);
        assert!(throttle.admit(ip(1), later).is_ok());
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_the_table_bounded() {
        let throttle = Throttle::new(6, 1_000_000);
        let t0 = Instant::now();
        for n in 0..200_000 {
            let _ = throttle.admit(ip(n), t0);
        }
        assert!(throttle.clients() <= MAX_CLIENTS);
        // Addresses past the table share one bucket: six requests among all of them.
        let admitted = (300_000..300_100)
            .filter(|n| throttle.admit(ip(*n), t0).is_ok())
            .count();
        assert!(admitted <= 6, "{admitted}");
        // Once the tracked clients are as good as new, newcomers get their own bucket again.
        let later = t0 + Duration::from_secs(61);
        assert!(throttle.admit(ip(400_000), later).is_ok());
        assert!(throttle.admit(ip(400_000), later).is_ok());
    }
}
