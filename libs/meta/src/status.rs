//! The duplication status machine, as a pure function: `(status, event) -> new status`.
//!
//! ```text
//! DS_INIT ──Prepare──▶ DS_PREPARE ──Apply──▶ DS_APP ──Log──▶ DS_LOG ──Pause──▶ DS_PAUSE
//!    └───────────────────────Log────────────────────────────▶   ▲◀────Start───────┘
//! any ──Remove──▶ DS_REMOVED
//! ```
//!
//! Incremental dups go `DS_INIT → DS_LOG` directly; full dups go through `DS_PREPARE` (checkpoints
//! being made) and `DS_APP` (checkpoints being shipped and installed). An event that would lead to
//! the status a dup already has is a no-op, so a retried request is harmless. Everything else is
//! an [`IllegalTransition`]. This module does no I/O; the metadata layer reads the stored status,
//! calls [`transition`], and writes the result with a compare-and-swap.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a duplication is in its life. Stored as the Pegasus names (`"DS_LOG"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DupStatus {
    /// Just created; nothing decided yet.
    Init,
    /// Full dup: source partitions are making checkpoints.
    Prepare,
    /// Full dup: checkpoints are being shipped to and installed on the target.
    App,
    /// Plog records are being shipped.
    Log,
    /// Shipping is paused; the plog keeps everything after the confirmed decree.
    Pause,
    /// Removed. Also what an unknown stored status decodes to, so that a newer writer's status
    /// never makes an older process ship.
    Removed,
}

/// What a shipper does when a batch keeps failing. Stored as `"FAIL_SLOW"` and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum FailMode {
    /// Retry forever (the default): never lose a write, alert on lag.
    #[default]
    #[serde(rename = "FAIL_SLOW")]
    Slow,
    /// After bounded retries skip the batch and count it.
    #[serde(rename = "FAIL_SKIP")]
    Skip,
    /// Stop the dup and alert.
    #[serde(rename = "FAIL_FAST")]
    Fast,
}

/// Something that asks a dup to change status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DupEvent {
    /// Full dup accepted: make checkpoints (`DS_INIT → DS_PREPARE`).
    Prepare,
    /// All checkpoints made: ship them (`DS_PREPARE → DS_APP`).
    Apply,
    /// Start shipping the log (`DS_APP → DS_LOG`, or `DS_INIT → DS_LOG` for an incremental dup).
    Log,
    /// Operator pause (`DS_LOG → DS_PAUSE`).
    Pause,
    /// Operator start after a pause (`DS_PAUSE → DS_LOG`).
    Start,
    /// Operator remove (any → `DS_REMOVED`).
    Remove,
}

/// An event that the current status does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a dup in {from} cannot take event {event:?}; {}", event.requirement())]
pub struct IllegalTransition {
    /// The status the dup was in.
    pub from: DupStatus,
    /// The refused event.
    pub event: DupEvent,
}

/// The status machine. Returns the new status, the same status for a repeated transition, or
/// the reason the event is refused.
pub fn transition(from: DupStatus, event: DupEvent) -> Result<DupStatus, IllegalTransition> {
    use DupEvent as E;
    use DupStatus as S;
    let to = event.target();
    let allowed = match (from, event) {
        // A repeated transition is a no-op; a removed dup stays removed.
        (s, _) if s == to => true,
        (_, E::Remove) => true,
        (S::Init, E::Prepare) | (S::Prepare, E::Apply) | (S::App, E::Log) | (S::Init, E::Log) => {
            true
        }
        (S::Log, E::Pause) | (S::Pause, E::Start) => true,
        _ => false,
    };
    if allowed {
        Ok(to)
    } else {
        Err(IllegalTransition { from, event })
    }
}

impl DupEvent {
    /// Every event, for tests and tables.
    pub const ALL: [DupEvent; 6] = [
        DupEvent::Prepare,
        DupEvent::Apply,
        DupEvent::Log,
        DupEvent::Pause,
        DupEvent::Start,
        DupEvent::Remove,
    ];

    /// The status this event leads to.
    pub fn target(self) -> DupStatus {
        match self {
            DupEvent::Prepare => DupStatus::Prepare,
            DupEvent::Apply => DupStatus::App,
            DupEvent::Log | DupEvent::Start => DupStatus::Log,
            DupEvent::Pause => DupStatus::Pause,
            DupEvent::Remove => DupStatus::Removed,
        }
    }

    /// The end of the user-facing sentence: which status the event needs.
    pub fn requirement(self) -> &'static str {
        match self {
            DupEvent::Prepare => "only a dup in DS_INIT can be prepared",
            DupEvent::Apply => "only a dup in DS_PREPARE can move to DS_APP",
            DupEvent::Log => "only a dup in DS_INIT or DS_APP can move to DS_LOG",
            DupEvent::Pause => "only a dup in DS_LOG can be paused",
            DupEvent::Start => "only a dup in DS_PAUSE can be started",
            DupEvent::Remove => "any dup can be removed",
        }
    }
}

impl DupStatus {
    /// Every status, for tests and metrics.
    pub const ALL: [DupStatus; 6] = [
        DupStatus::Init,
        DupStatus::Prepare,
        DupStatus::App,
        DupStatus::Log,
        DupStatus::Pause,
        DupStatus::Removed,
    ];

    /// The stored name, as in Pegasus.
    pub fn as_str(self) -> &'static str {
        match self {
            DupStatus::Init => "DS_INIT",
            DupStatus::Prepare => "DS_PREPARE",
            DupStatus::App => "DS_APP",
            DupStatus::Log => "DS_LOG",
            DupStatus::Pause => "DS_PAUSE",
            DupStatus::Removed => "DS_REMOVED",
        }
    }

    /// Decodes a stored name; anything unknown is `DS_REMOVED` (see [`DupStatus::Removed`]).
    pub fn from_stored(s: &str) -> DupStatus {
        DupStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(DupStatus::Removed)
    }
}

impl fmt::Display for DupStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for DupStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DupStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(DupStatus::from_stored(&s))
    }
}

impl FailMode {
    /// The stored name, as in Pegasus.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Slow => "FAIL_SLOW",
            FailMode::Skip => "FAIL_SKIP",
            FailMode::Fast => "FAIL_FAST",
        }
    }
}

impl fmt::Display for FailMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `slow|skip|fast` (the CLI words) and the stored names `FAIL_SLOW|FAIL_SKIP|FAIL_FAST`.
impl FromStr for FailMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().trim_start_matches("fail_") {
            "slow" => Ok(FailMode::Slow),
            "skip" => Ok(FailMode::Skip),
            "fast" => Ok(FailMode::Fast),
            _ => Err(format!(
                "unknown fail mode `{s}`; use one of slow, skip, fast"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The allowed (from, event) pairs that change the status, written out by hand from the
    /// design, independently of `transition`'s match.
    fn allowed_change(from: DupStatus, event: DupEvent) -> Option<DupStatus> {
        use DupEvent as E;
        use DupStatus as S;
        match (from, event) {
            (S::Init, E::Prepare) => Some(S::Prepare),
            (S::Prepare, E::Apply) => Some(S::App),
            (S::App, E::Log) => Some(S::Log),
            (S::Init, E::Log) => Some(S::Log),
            (S::Log, E::Pause) => Some(S::Pause),
            (S::Pause, E::Start) => Some(S::Log),
            (s, E::Remove) if s != S::Removed => Some(S::Removed),
            _ => None,
        }
    }

    fn status() -> impl Strategy<Value = DupStatus> {
        prop::sample::select(DupStatus::ALL.to_vec())
    }

    fn event() -> impl Strategy<Value = DupEvent> {
        prop::sample::select(DupEvent::ALL.to_vec())
    }

    proptest! {
        /// Every step either follows an allowed edge, stays put because the transition is a
        /// repeat, or is refused and leaves the status unchanged.
        #[test]
        fn only_allowed_transitions_happen(start in status(), events in prop::collection::vec(event(), 0..64)) {
            let mut s = start;
            for e in events {
                match transition(s, e) {
                    Ok(next) if next == s => prop_assert_eq!(e.target(), s, "no-op only for a repeat"),
                    Ok(next) => prop_assert_eq!(Some(next), allowed_change(s, e)),
                    Err(err) => {
                        prop_assert!(allowed_change(s, e).is_none());
                        prop_assert_ne!(e.target(), s);
                        prop_assert_eq!(err, IllegalTransition { from: s, event: e });
                    }
                }
                s = transition(s, e).unwrap_or(s);
            }
        }

        /// Applying the same event twice is the same as applying it once.
        #[test]
        fn repeated_transition_is_noop(s in status(), e in event()) {
            if let Ok(once) = transition(s, e) {
                prop_assert_eq!(transition(once, e), Ok(once));
            }
        }

        /// Nothing leaves DS_REMOVED, and everything can reach it.
        #[test]
        fn removed_is_terminal(e in event(), s in status()) {
            prop_assert_eq!(transition(s, DupEvent::Remove), Ok(DupStatus::Removed));
            let r = transition(DupStatus::Removed, e);
            prop_assert!(r == Ok(DupStatus::Removed) || r.is_err());
        }

        /// Any stored string decodes to some status; unknown ones to DS_REMOVED.
        #[test]
        fn unknown_status_decodes_to_removed(s in "[A-Z_]{0,12}") {
            let st = DupStatus::from_stored(&s);
            if DupStatus::ALL.iter().all(|k| k.as_str() != s) {
                prop_assert_eq!(st, DupStatus::Removed);
            } else {
                prop_assert_eq!(st.as_str(), s.as_str());
            }
        }
    }

    #[test]
    fn full_and_incremental_paths() {
        let full = [
            DupEvent::Prepare,
            DupEvent::Apply,
            DupEvent::Log,
            DupEvent::Pause,
            DupEvent::Start,
        ];
        let mut s = DupStatus::Init;
        for e in full {
            s = transition(s, e).expect("full path is allowed");
        }
        assert_eq!(s, DupStatus::Log);
        assert_eq!(
            transition(DupStatus::Init, DupEvent::Log),
            Ok(DupStatus::Log)
        );
    }

    #[test]
    fn refusal_names_the_requirement() {
        let err = transition(DupStatus::Prepare, DupEvent::Pause).expect_err("pause needs DS_LOG");
        assert_eq!(
            err.event.requirement(),
            "only a dup in DS_LOG can be paused"
        );
        assert_eq!(err.from, DupStatus::Prepare);
    }

    #[test]
    fn serde_names() {
        assert_eq!(
            serde_json::to_string(&DupStatus::Log).ok().as_deref(),
            Some("\"DS_LOG\"")
        );
        let st: DupStatus = serde_json::from_str("\"DS_FUTURE\"").expect("a string decodes");
        assert_eq!(st, DupStatus::Removed);
        assert_eq!(
            serde_json::to_string(&FailMode::Skip).ok().as_deref(),
            Some("\"FAIL_SKIP\"")
        );
        assert_eq!("fast".parse::<FailMode>(), Ok(FailMode::Fast));
        assert_eq!("FAIL_SLOW".parse::<FailMode>(), Ok(FailMode::Slow));
        assert!("quick".parse::<FailMode>().is_err());
    }
}
