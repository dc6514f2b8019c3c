//! A UDP relay that delays every datagram by a fixed time in each direction: a WAN link for
//! QUIC where the kernel has no `netem` (CONFIG_NET_SCH_NETEM unset). Order is kept, as netem
//! keeps it with a fixed delay; a full queue drops, as a full link buffer does. The link can be
//! cut (every datagram dropped, both ways) and healed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Datagrams queued per direction before the relay drops.
const QUEUE: usize = 65_536;

/// A running relay; stopped on drop.
pub struct UdpDelay {
    /// Where clients send to instead of the target.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl UdpDelay {
    /// Relays datagrams sent to [`UdpDelay::addr`] to `target`, and the answers back, each
    /// after `one_way`.
    pub fn start(target: SocketAddr, one_way: Duration) -> Result<UdpDelay> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("start the relay's runtime")?;
        let front = runtime.block_on(UdpSocket::bind("127.0.0.1:0"))?;
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        runtime.spawn(relay(Arc::new(front), target, one_way, cut.clone()));
        Ok(UdpDelay {
            addr,
            cut,
            runtime: Some(runtime),
        })
    }

    /// Cuts the link (`true`: every datagram is dropped, both ways) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for UdpDelay {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Sends each queued datagram when its time has come, in order.
async fn delayed_sender(
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
) {
    while let Some((at, datagram)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        let _ = match to {
            Some(to) => socket.send_to(&datagram, to).await,
            None => socket.send(&datagram).await,
        };
    }
}

async fn relay(front: Arc<UdpSocket>, target: SocketAddr, one_way: Duration, cut: Arc<AtomicBool>) {
    let mut upstreams: HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>)>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = upstreams.entry(client) {
            let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                continue;
            };
            if up.connect(target).await.is_err() {
                continue;
            }
            let up = Arc::new(up);
            // client -> target
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(delayed_sender(rx, up.clone(), None));
            // target -> client
            let (back_tx, back_rx) = mpsc::channel(QUEUE);
            tokio::spawn(delayed_sender(back_rx, front.clone(), Some(client)));
            let reader = up.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok(n) = reader.recv(&mut buf).await {
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let item = (Instant::now() + one_way, buf[..n].to_vec());
                    let _ = back_tx.try_send(item);
                }
            });
            slot.insert(tx);
        }
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(tx) = upstreams.get(&client) {
            let _ = tx.try_send((Instant::now() + one_way, buf[..n].to_vec()));
        }
    }
}
