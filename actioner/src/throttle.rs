//! Rate limits for the wake relay: a token bucket per client address and one for all clients
//! together. The table of clients is bounded: past [`MAX_CLIENTS`] the idle ones are dropped,
//! and an address that finds no room shares one bucket with every other such address, so a
//! flood from many addresses costs memory for none of them.

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

    /// Admits a request from `client` at `now`, or says when to try again.
    pub fn admit(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Buckets {
            total,
            clients,
            overflow,
            swept,
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
        // Check both before taking from either.
        let mut own = *bucket;
        let mut all = *total;
        own.take(per_client, now)?;
        all.take(self.total, now)?;
        *bucket = own;
        *total = all;
        Ok(())
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
