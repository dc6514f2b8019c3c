//! Duplication over an emulated WAN: tj runs in its own network namespace with its own etcd,
//! joined to bj by a veth pair with `tc netem` delay of 25 ms each way (50 ms RTT). Every
//! packet between the clusters (coordinator lookups, QUIC batches and acks) crosses the link.
//! Where such a namespace cannot be made (not root, no `ip`/`tc`, or a kernel without netem),
//! the test says so and puts the delay in a userspace UDP relay on the QUIC path instead
//! (`ferry_tests::delay`), so the dup still runs over a 50 ms RTT.

use std::time::{Duration, Instant};

use anyhow::Result;

use ferry_tests::delay::UdpDelay;
use ferry_tests::dup::{set_keys, wait_converged, TwoClusters};
use ferry_tests::netns::Wan;

#[test]
fn dup_converges_over_a_50ms_rtt_link() -> Result<()> {
    // Declared first so it is dropped last, after the processes inside it.
    let wan = Wan::create(25);
    let relay: Option<UdpDelay>;
    let w = match &wan {
        Ok(wan) => {
            eprintln!(
                "WAN: namespace {} behind a veth pair with netem 25 ms each way",
                wan.ns
            );
            relay = None;
            TwoClusters::start_wan("users", 4, 4, wan)?
        }
        Err(e) => {
            // This kernel may lack netem (CONFIG_NET_SCH_NETEM unset): the QUIC path then goes
            // through a userspace relay that delays every datagram 25 ms each way.
            eprintln!("WAN: no namespace with netem here ({e:#}); using a UDP relay that delays each datagram 25 ms each way");
            let mut w = TwoClusters::start("users", 4, 4)?;
            let r = UdpDelay::start(w.tj.receiver_quic, Duration::from_millis(25))?;
            w.tj.advertise_receiver_at(r.addr)?;
            relay = Some(r);
            w
        }
    };
    w.bj.add_dup("users", "tj")?;
    let mut con = w.bj.redis()?;
    let t = Instant::now();
    set_keys(&mut con, "wan", 20_000, &"w".repeat(100))?;
    let wrote = t.elapsed();
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    eprintln!(
        "20k writes in {wrote:?}; converged over the 50 ms RTT link {:?} after the first write",
        t.elapsed()
    );
    assert_eq!(entries, 20_000);

    // The shipper measured the lag on its side: at least one RTT, since an ack crosses the link.
    let sum = w.bj.shipper_metric("dup_time_lag_ms_sum")?;
    let count = w.bj.shipper_metric("dup_time_lag_ms_count")?;
    assert!(count > 0.0, "no acked batch was measured");
    let mean = sum / count;
    eprintln!("mean lag per acked batch: {mean:.1} ms over {count} batches");
    assert!(
        mean >= 50.0,
        "an ack crosses a 50 ms RTT link, so the lag cannot be below it: {mean}"
    );
    drop(w);
    drop(relay);
    Ok(())
}
