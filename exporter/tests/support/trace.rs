//! A synthetic day of a home-lab inference box, one reading per second, for replaying through
//! the idle engine: a quiet night with cron spikes, a model download at low CPU (07:00-07:40),
//! a morning of bursty inference (first request a few minutes after 08:00, until noon), a quiet
//! afternoon, a gaming evening (18:00-23:00), a quiet late hour.

/// What the host is doing, as a person would say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Nothing (cron jobs aside).
    Quiet,
    /// Downloading a model: busy network, low CPU, no GPU.
    Download,
    /// Someone uses the inference service, in bursts.
    Inference,
    /// Someone plays a game.
    Gaming,
}

impl Activity {
    /// Whether suspending now would hurt someone.
    pub fn busy(self) -> bool {
        self != Activity::Quiet
    }
}

/// One second of the trace.
#[derive(Debug, Clone, Copy)]
pub struct Second {
    /// Seconds since midnight.
    pub t: u64,
    /// CPU utilization, 0..1.
    pub cpu: f64,
    /// Utilization of the busiest GPU, 0..1.
    pub gpu: f64,
    /// Network bytes per second, in and out.
    pub network: u64,
    /// What is going on.
    pub activity: Activity,
}

/// xorshift64*: deterministic noise.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.next()
    }
}

const HOUR: u64 = 3600;

/// The day, 86 400 seconds.
pub fn day(seed: u64) -> Vec<Second> {
    let mut noise = Noise(seed.max(1));
    let mut out = Vec::with_capacity(24 * HOUR as usize);
    // Inference bursts: (start, length) within 08:00-12:00.
    let mut bursts = Vec::new();
    let mut t = 8 * HOUR;
    while t < 12 * HOUR {
        t += noise.between(120.0, 360.0) as u64;
        let length = noise.between(5.0, 40.0) as u64;
        bursts.push((t, length));
        t += length;
    }
    let mut cron_until = 0;
    for t in 0..24 * HOUR {
        let first_request = bursts.first().map_or(12 * HOUR, |(start, _)| *start);
        let activity = match t {
            t if (7 * HOUR..7 * HOUR + 40 * 60).contains(&t) => Activity::Download,
            // From the first request on, someone is working with the models until noon.
            t if (first_request..12 * HOUR).contains(&t) => Activity::Inference,
            t if (18 * HOUR..23 * HOUR).contains(&t) => Activity::Gaming,
            _ => Activity::Quiet,
        };
        let (cpu, gpu, network) = match activity {
            Activity::Quiet => {
                // A cron job every ~20 minutes: a few seconds at 30-60 % CPU.
                if t > cron_until && noise.next() < 1.0 / 1200.0 {
                    cron_until = t + noise.between(2.0, 6.0) as u64;
                }
                let cpu = if t <= cron_until {
                    noise.between(0.3, 0.6)
                } else {
                    noise.between(0.005, 0.04)
                };
                (cpu, 0.0, noise.between(500.0, 5_000.0) as u64)
            }
            Activity::Download => (
                noise.between(0.03, 0.07),
                0.0,
                noise.between(30e6, 60e6) as u64,
            ),
            Activity::Inference => {
                if bursts.iter().any(|(s, l)| (*s..s + l).contains(&t)) {
                    (noise.between(0.15, 0.3), noise.between(0.6, 0.95), 200_000)
                } else {
                    (noise.between(0.01, 0.04), noise.between(0.0, 0.02), 5_000)
                }
            }
            Activity::Gaming => (noise.between(0.25, 0.45), noise.between(0.7, 0.99), 300_000),
        };
        out.push(Second {
            t,
            cpu,
            gpu,
            network,
            activity,
        });
    }
    out
}
