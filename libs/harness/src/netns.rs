//! A WAN link for tests: a network namespace joined to this one by a veth pair, with `tc netem`
//! delay on both ends. Processes of the far cluster run inside it (`ip netns exec`); this
//! process reaches them over the link's addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where a process runs: its address and the command prefix that puts it there.
#[derive(Debug, Clone)]
pub struct Place {
    pub ip: IpAddr,
    pub prefix: Vec<String>,
}

impl Place {
    /// This namespace, on 127.0.0.1.
    pub fn local() -> Place {
        Place {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            prefix: Vec::new(),
        }
    }

    /// A command for `program`, run in this place.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self.prefix.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        }
    }
}

/// A namespace with a veth link of `delay_ms` each way (RTT = 2 × delay; 0: no netem) to this
/// one. Deleted on drop.
pub struct Wan {
    pub ns: String,
    host_if: String,
    /// This side's address on the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's address on the link.
    pub ns_ip: Ipv4Addr,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Wan {
    /// Makes the namespace and the link. `Err` says why it cannot be made here (not root, no
    /// `ip`, no netem), so the caller can skip with that message.
    pub fn create(delay_ms: u32) -> Result<Wan> {
        let id = std::process::id() % 100_000;
        let ns = format!("ferry{id}");
        let subnet = 1 + id % 250;
        let wan = Wan {
            host_if: format!("vh{id}"),
            ns: ns.clone(),
            host_ip: Ipv4Addr::new(10, 201, subnet as u8, 1),
            ns_ip: Ipv4Addr::new(10, 201, subnet as u8, 2),
        };
        let ns_if = format!("vn{id}");
        let delay = format!("{delay_ms}ms");
        let host = format!("{}/24", wan.host_ip);
        let far = format!("{}/24", wan.ns_ip);
        run(&["ip", "netns", "add", &ns])?;
        // From here on, Drop cleans up.
        run(&[
            "ip",
            "link",
            "add",
            &wan.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", &ns])?;
        run(&["ip", "addr", "add", &host, "dev", &wan.host_if])?;
        run(&["ip", "link", "set", &wan.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", ns.as_str()];
            all.extend_from_slice(args);
            run(&all)
        };
        inside(&["ip", "addr", "add", &far, "dev", &ns_if])?;
        inside(&["ip", "link", "set", &ns_if, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        if delay_ms > 0 {
            run(&[
                "tc",
                "qdisc",
                "add",
                "dev",
                &wan.host_if,
                "root",
                "netem",
                "delay",
                &delay,
            ])?;
            inside(&[
                "tc", "qdisc", "add", "dev", &ns_if, "root", "netem", "delay", &delay,
            ])?;
        }
        Ok(wan)
    }

    /// The far side: inside the namespace, on its link address.
    pub fn far(&self) -> Place {
        Place {
            ip: IpAddr::V4(self.ns_ip),
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()],
        }
    }

    /// This side, on its link address (reachable from the namespace).
    pub fn near(&self) -> Place {
        Place {
            ip: IpAddr::V4(self.host_ip),
            prefix: Vec::new(),
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.ns]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}
