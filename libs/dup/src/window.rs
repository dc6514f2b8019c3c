//! The shipping window of one (dup, partition) session, without I/O: which decrees are in flight,
//! what the receiver confirmed, and where to resume after a break. The session task feeds it
//! events (`on_sent`, `on_ack`, `on_disconnect`) and asks it what to do next.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_proto::Decree;
use thiserror::Error;

/// Limits of the window: in-flight batches and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batches: usize,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    first: Decree,
    last: Decree,
    bytes: u64,
    sent_at: Instant,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WindowError {
    /// The receiver confirmed a decree that was never sent: a protocol violation, or a receiver
    /// holding data from another session.
    #[error("receiver confirmed decree {acked}, but only decrees up to {sent} were sent")]
    AckBeyondSent { acked: Decree, sent: Decree },
    /// A batch does not continue where the previous one ended.
    #[error("batch {first}..={last} does not follow decree {expected_prev}")]
    NotContiguous {
        first: Decree,
        last: Decree,
        expected_prev: Decree,
    },
}

#[derive(Debug)]
pub struct Window {
    limits: Limits,
    /// Highest decree the receiver made durable.
    confirmed: Decree,
    /// Highest decree sent (equal to `confirmed` when nothing is in flight).
    sent: Decree,
    in_flight: VecDeque<InFlight>,
    bytes: u64,
}

impl Window {
    /// A window resuming after `confirmed` (from etcd or the receiver's `Welcome`).
    pub fn new(confirmed: Decree, limits: Limits) -> Window {
        Window {
            limits,
            confirmed,
            sent: confirmed,
            in_flight: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn confirmed(&self) -> Decree {
        self.confirmed
    }

    /// The first decree of the next batch to send.
    pub fn next_decree(&self) -> Decree {
        self.sent.next()
    }

    /// Whether another batch may be sent now.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.limits.max_batches.max(1)
            && self.bytes < self.limits.max_bytes.max(1)
    }

    pub fn in_flight_batches(&self) -> usize {
        self.in_flight.len()
    }

    /// Records a batch as sent.
    pub fn on_sent(
        &mut self,
        first: Decree,
        last: Decree,
        bytes: u64,
        now: Instant,
    ) -> Result<(), WindowError> {
        if first != self.sent.next() || last < first {
            return Err(WindowError::NotContiguous {
                first,
                last,
                expected_prev: self.sent,
            });
        }
        self.in_flight.push_back(InFlight {
            first,
            last,
            bytes,
            sent_at: now,
        });
        self.bytes += bytes;
        self.sent = last;
        Ok(())
    }

    /// Applies an ack. Acks may be cumulative and may repeat; an older ack is ignored. Returns the
    /// round-trip times of the batches this ack completed.
    pub fn on_ack(&mut self, acked: Decree, now: Instant) -> Result<Vec<Duration>, WindowError> {
        if acked > self.sent {
            return Err(WindowError::AckBeyondSent {
                acked,
                sent: self.sent,
            });
        }
        let mut rtts = Vec::new();
        if acked <= self.confirmed {
            return Ok(rtts);
        }
        self.confirmed = acked;
        while let Some(b) = self.in_flight.front() {
            if b.last > acked {
                break;
            }
            rtts.push(now.saturating_duration_since(b.sent_at));
            self.bytes -= b.bytes;
            self.in_flight.pop_front();
        }
        Ok(rtts)
    }

    /// After a broken connection: everything unconfirmed will be sent again, starting at the
    /// returned decree. `receiver_confirmed` is the receiver's `Welcome` on reconnect, which may be
    /// ahead of ours (an ack lost with the connection) but never behind what it once acked.
    pub fn on_reconnect(&mut self, receiver_confirmed: Decree) -> Decree {
        self.confirmed = self.confirmed.max(receiver_confirmed);
        self.sent = self.confirmed;
        self.in_flight.clear();
        self.bytes = 0;
        self.sent.next()
    }

    /// How long the oldest unacknowledged batch has waited.
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        self.in_flight
            .front()
            .map(|b| now.saturating_duration_since(b.sent_at))
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const LIMITS: Limits = Limits {
        max_batches: 4,
        max_bytes: 1 << 20,
    };

    #[test]
    fn acks_free_room_in_order() {
        let t = Instant::now();
        let mut w = Window::new(Decree(10), LIMITS);
        for i in 0..4 {
            assert!(w.has_room());
            let first = w.next_decree();
            w.on_sent(first, Decree(first.0 + 9), 100, t).expect("sent");
            assert_eq!(w.in_flight_batches(), i + 1);
        }
        assert!(!w.has_room(), "window full at 4 batches");
        assert_eq!(
            w.on_ack(Decree(25), t).expect("ack").len(),
            1,
            "ack inside the 2nd batch completes only the 1st"
        );
        assert_eq!(w.confirmed(), Decree(25));
        assert!(w.has_room());
        assert!(
            w.on_ack(Decree(20), t).expect("old ack").is_empty(),
            "older acks are ignored"
        );
        assert_eq!(w.on_ack(Decree(50), t).expect("ack").len(), 3);
        assert_eq!(w.in_flight_batches(), 0);
        assert_eq!(
            w.on_ack(Decree(51), t),
            Err(WindowError::AckBeyondSent {
                acked: Decree(51),
                sent: Decree(50)
            })
        );
    }

    #[test]
    fn gaps_are_refused() {
        let mut w = Window::new(Decree(0), LIMITS);
        assert!(w.on_sent(Decree(2), Decree(3), 1, Instant::now()).is_err());
        assert!(w.on_sent(Decree(1), Decree(0), 1, Instant::now()).is_err());
    }

    /// Seeded simulation of a lossy link: batches and acks are lost, connections break, acks are
    /// reordered and repeated. Whatever happens, the receiver sees every decree, in order, and the
    /// shipper's confirmed decree never passes what the receiver holds, nor goes back.
    #[test]
    fn simulated_lossy_link_delivers_everything_in_order() {
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let t = Instant::now();
            let total = 500u64;
            let mut w = Window::new(Decree(0), LIMITS);
            let mut receiver = Decree(0); // durable at the receiver
            let mut link: Vec<(Decree, Decree)> = Vec::new(); // batches in flight on the wire
            let mut acks: Vec<Decree> = Vec::new();
            let mut last_confirmed = Decree(0);
            for _ in 0..20_000 {
                if receiver.0 >= total && w.confirmed().0 >= total {
                    break;
                }
                match rng.random_range(0..10) {
                    0..=3 if w.has_room() && w.next_decree().0 <= total => {
                        let first = w.next_decree();
                        let last = Decree((first.0 + rng.random_range(0..20)).min(total));
                        w.on_sent(first, last, 10, t).expect("contiguous");
                        link.push((first, last));
                    }
                    4..=5 if !link.is_empty() => {
                        let (first, last) = link.remove(0);
                        if rng.random_bool(0.9) {
                            // The receiver accepts only the batch that continues its log.
                            if first <= receiver.next() && last > receiver {
                                receiver = last;
                            }
                            acks.push(receiver);
                        }
                    }
                    6..=7 if !acks.is_empty() => {
                        let i = rng.random_range(0..acks.len());
                        let a = acks.swap_remove(i);
                        if rng.random_bool(0.9) {
                            w.on_ack(a, t).expect("acks never pass what was sent");
                        }
                    }
                    8 if rng.random_bool(0.05) => {
                        link.clear();
                        acks.clear();
                        let resume = w.on_reconnect(receiver);
                        assert_eq!(resume, receiver.next(), "seed {seed}");
                    }
                    _ => {}
                }
                assert!(
                    w.confirmed() <= receiver,
                    "seed {seed}: confirmed past the receiver"
                );
                assert!(
                    w.confirmed() >= last_confirmed,
                    "seed {seed}: confirmed went back"
                );
                last_confirmed = w.confirmed();
            }
            assert_eq!(receiver, Decree(total), "seed {seed}: everything delivered");
        }
    }
}
