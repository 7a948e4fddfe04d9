//! Relays on loopback that delay the traffic they carry, in both directions,
//! by a base delay plus random jitter. They replace `netem`, which this
//! machine's kernel lacks: a node that advertises a relay's address in place
//! of its own gets every cluster message through it.
//!
//! [`UdpRelay`] carries gossip datagrams and delays each one on its own, so
//! jitter can reorder them, as it can on a real link. [`TcpRelay`] carries
//! forwarded consumptions and delays each chunk of a stream without
//! reordering, and its delay can be raised while it runs. A relay stops when
//! it is dropped or when its lifetime ends, whichever comes first.

mod tcp;
mod udp;

use std::ops::Range;
use std::time::Duration;

pub use tcp::TcpRelay;
pub use udp::UdpRelay;

/// Per-message delay, drawn uniformly from `millis`.
#[derive(Debug, Clone)]
pub struct Latency {
    pub millis: Range<u64>,
}

impl Latency {
    fn sample(&self, rng: &mut u64) -> Duration {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let span = self.millis.end.saturating_sub(self.millis.start).max(1);
        Duration::from_millis(self.millis.start + *rng % span)
    }
}
