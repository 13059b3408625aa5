//! A small seeded generator (splitmix64) for the tests' plans, so a failing plan can be
//! replayed with `OPTOUT_SEED=<u64>` (each test prints its seed).

pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// `OPTOUT_SEED` if set, else the test's `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("OPTOUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
