//! Sending a partition checkpoint (full duplication), without I/O.
//!
//! [`SendCheckpoint`] pushes the files of one checkpoint manifest over `lanes` parallel streams,
//! one file per lane at a time, in chunks of at most [`MAX_CHUNK`] bytes. It starts from what the
//! receiver's `Welcome` says it holds (`present_files`):
//!
//! - a file present with the manifest's size and CRC-32C is not sent again (only announced with
//!   its `FileDone`, so the receiver checks its copy);
//! - a shorter one is checked against the CRC-32C of the same prefix here ([`SendEvent::CheckPrefix`]):
//!   equal, the file resumes at that size; different, it is sent again from offset 0;
//! - anything else is sent from offset 0.
//!
//! ```text
//! new(manifest, present, config, now)
//! poll: CheckPrefix{file, len}      → handle_prefix(file, crc)
//! poll: Read{lane, file, offset, len} → read, pack_chunk, send on the lane → handle_sent(lane, wire bytes, now)
//! poll: Send{lane, FileDone}        (after a file's last chunk, in order on its lane)
//! poll: Done(CheckpointDone)        (every file announced; send it on lane 0)
//! poll_timeout()                    (the rate limit: when the next read may start)
//! ```
//!
//! The rate limit counts wire bytes (compressed chunk frames), in a token bucket that holds at
//! most [`BURST`] of sending; [`SendCheckpoint::set_rate`] changes it while the copy runs.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ferry_proto::wire::{self, Frame, MAX_CHUNK};
use ferry_proto::{CheckpointFile, CheckpointManifest};

/// How much sending the rate limit lets through at once after an idle spell.
pub const BURST: Duration = Duration::from_millis(100);

/// Tuning of one transfer.
#[derive(Debug, Clone)]
pub struct TransferConfig {
    /// Bytes of a file per chunk (at most [`MAX_CHUNK`]).
    pub chunk_bytes: u32,
    /// Parallel streams (at least 1).
    pub lanes: usize,
    /// Wire bytes per second at most; `None`: no limit.
    pub rate: Option<u64>,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            chunk_bytes: 1 << 20,
            lanes: 4,
            rate: None,
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEvent {
    /// Compute the CRC-32C of the first `len` bytes of `file` and answer with
    /// [`SendCheckpoint::handle_prefix`].
    CheckPrefix { file: String, len: u64 },
    /// Read `len` bytes of `file` at `offset`, send them as a chunk ([`wire::pack_chunk`]) on
    /// stream `lane`, and answer with [`SendCheckpoint::handle_sent`].
    Read {
        lane: usize,
        file: String,
        offset: u64,
        len: u32,
    },
    /// Send this frame on stream `lane`, after what was sent there before.
    Send { lane: usize, frame: Frame },
    /// Every file is announced: send this on lane 0 and wait for the receiver's `Staged`.
    Done(wire::CheckpointDone),
}

/// Where a transfer stands, for etcd, `ferry status` and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransferProgress {
    pub files_total: u32,
    /// Files announced complete (sent, or present already).
    pub files_done: u32,
    pub bytes_total: u64,
    /// File bytes the receiver holds or has been sent: present prefixes count.
    pub bytes_done: u64,
    /// File bytes the receiver already held when the transfer started (not sent again).
    pub bytes_present: u64,
    /// Chunk bytes put on the wire (after compression).
    pub wire_bytes: u64,
    /// File bytes per second, smoothed over the last seconds; 0 before the first chunk.
    pub rate: f64,
}

impl TransferProgress {
    /// The time left at the current rate, if it can be told.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.bytes_total.saturating_sub(self.bytes_done);
        if left == 0 {
            return Some(Duration::ZERO);
        }
        (self.rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / self.rate))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// Waiting for the CRC of the receiver's prefix of this length.
    Checking(u64, u32),
    /// To send from this offset.
    Queued(u64),
    /// On a lane, the next chunk at this offset.
    Sending {
        lane: usize,
        offset: u64,
    },
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Idle,
    /// Sending this file (index into `files`); `busy`: a chunk is being read or sent.
    File {
        file: usize,
        busy: bool,
    },
}

/// The sending side of one checkpoint transfer.
#[derive(Debug)]
pub struct SendCheckpoint {
    manifest: CheckpointManifest,
    chunk: u32,
    state: Vec<FileState>,
    lanes: Vec<Lane>,
    /// Files ready for a lane, in manifest order.
    queue: VecDeque<usize>,
    out: VecDeque<SendEvent>,
    bucket: Bucket,
    progress: TransferProgress,
    /// Smoothing of `progress.rate`.
    rate_since: Instant,
    rate_bytes: u64,
    done_sent: bool,
}

impl SendCheckpoint {
    /// A transfer of `manifest`'s files to a receiver that holds `present`.
    pub fn new(
        manifest: CheckpointManifest,
        present: &[CheckpointFile],
        config: &TransferConfig,
        now: Instant,
    ) -> SendCheckpoint {
        let held: BTreeMap<&str, &CheckpointFile> =
            present.iter().map(|f| (f.name.as_str(), f)).collect();
        let mut progress = TransferProgress {
            files_total: u32::try_from(manifest.files.len()).unwrap_or(u32::MAX),
            bytes_total: manifest.total_bytes(),
            ..TransferProgress::default()
        };
        let mut out = VecDeque::new();
        let mut queue = VecDeque::new();
        let mut state = Vec::with_capacity(manifest.files.len());
        for (i, f) in manifest.files.iter().enumerate() {
            let s = match held.get(f.name.as_str()) {
                Some(h) if h.size == f.size && h.crc32c == f.crc32c => {
                    progress.bytes_present += f.size;
                    progress.bytes_done += f.size;
                    progress.files_done += 1;
                    out.push_back(SendEvent::Send {
                        lane: 0,
                        frame: file_done(f),
                    });
                    FileState::Done
                }
                Some(h) if h.size > 0 && h.size < f.size => {
                    out.push_back(SendEvent::CheckPrefix {
                        file: f.name.clone(),
                        len: h.size,
                    });
                    FileState::Checking(h.size, h.crc32c)
                }
                _ => {
                    queue.push_back(i);
                    FileState::Queued(0)
                }
            };
            state.push(s);
        }
        SendCheckpoint {
            manifest,
            chunk: config.chunk_bytes.clamp(1, MAX_CHUNK as u32),
            state,
            lanes: vec![Lane::Idle; config.lanes.max(1)],
            queue,
            out,
            bucket: Bucket::new(config.rate, now),
            progress,
            rate_since: now,
            rate_bytes: 0,
            done_sent: false,
        }
    }

    /// The checkpoint being sent.
    pub fn manifest(&self) -> &CheckpointManifest {
        &self.manifest
    }

    pub fn progress(&self) -> &TransferProgress {
        &self.progress
    }

    /// Whether every file is announced and `CheckpointDone` was handed out.
    pub fn is_done(&self) -> bool {
        self.done_sent
    }

    /// Changes the rate limit from now on.
    pub fn set_rate(&mut self, rate: Option<u64>, now: Instant) {
        self.bucket.set_rate(rate, now);
    }

    /// The CRC-32C of this side's first `len` bytes of `file` (asked by `CheckPrefix`).
    pub fn handle_prefix(&mut self, file: &str, crc: u32) {
        let Some(i) = self.index(file) else { return };
        if let FileState::Checking(len, theirs) = self.state[i] {
            let from = if crc == theirs { len } else { 0 };
            if from > 0 {
                self.progress.bytes_present += from;
                self.progress.bytes_done += from;
            }
            self.state[i] = FileState::Queued(from);
            self.queue.push_back(i);
        }
    }

    /// The chunk of the last `Read` on `lane` was sent, taking `wire_bytes` on the wire.
    pub fn handle_sent(&mut self, lane: usize, wire_bytes: u64, now: Instant) {
        let Some(Lane::File { file, busy: true }) = self.lanes.get(lane).copied() else {
            return;
        };
        self.bucket.take(wire_bytes, now);
        self.progress.wire_bytes += wire_bytes;
        let size = self.manifest.files[file].size;
        let FileState::Sending { offset, .. } = self.state[file] else {
            return;
        };
        let len = u64::from(self.chunk).min(size - offset);
        self.progress.bytes_done += len;
        self.rate_bytes += len;
        self.smooth_rate(now);
        let next = offset + len;
        if next >= size {
            self.finish_file(lane, file);
        } else {
            self.state[file] = FileState::Sending { lane, offset: next };
            self.lanes[lane] = Lane::File { file, busy: false };
        }
    }

    /// The next thing to do, if any. Call until `None` after every input and timeout.
    pub fn poll(&mut self, now: Instant) -> Option<SendEvent> {
        if let Some(e) = self.out.pop_front() {
            return Some(e);
        }
        self.bucket.refill(now);
        for lane in 0..self.lanes.len() {
            if self.lanes[lane] == Lane::Idle {
                let Some(file) = self.queue.pop_front() else {
                    continue;
                };
                let FileState::Queued(offset) = self.state[file] else {
                    continue;
                };
                if offset >= self.manifest.files[file].size {
                    // Empty, or the whole file was present as a matching prefix.
                    self.finish_file(lane, file);
                    return self.out.pop_front();
                }
                self.state[file] = FileState::Sending { lane, offset };
                self.lanes[lane] = Lane::File { file, busy: false };
            }
            let Lane::File { file, busy: false } = self.lanes[lane] else {
                continue;
            };
            if !self.bucket.ready() {
                return None;
            }
            let FileState::Sending { offset, .. } = self.state[file] else {
                continue;
            };
            let f = &self.manifest.files[file];
            let len = u64::from(self.chunk).min(f.size - offset);
            self.lanes[lane] = Lane::File { file, busy: true };
            return Some(SendEvent::Read {
                lane,
                file: f.name.clone(),
                offset,
                len: len as u32,
            });
        }
        let all_done = self.state.iter().all(|s| *s == FileState::Done);
        if all_done && !self.done_sent {
            self.done_sent = true;
            return Some(SendEvent::Done(wire::CheckpointDone {
                decree: self.manifest.decree,
                file_count: self.progress.files_total,
                total_bytes: self.progress.bytes_total,
            }));
        }
        None
    }

    /// When to call [`SendCheckpoint::poll`] again without any input: the moment the rate limit
    /// lets the next chunk go, if a lane waits for it.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let waiting = self
            .lanes
            .iter()
            .any(|l| matches!(l, Lane::File { busy: false, .. }))
            || (!self.queue.is_empty() && self.lanes.contains(&Lane::Idle));
        if waiting {
            self.bucket.ready_at()
        } else {
            None
        }
    }

    fn finish_file(&mut self, lane: usize, file: usize) {
        self.state[file] = FileState::Done;
        self.lanes[lane] = Lane::Idle;
        self.progress.files_done += 1;
        self.out.push_back(SendEvent::Send {
            lane,
            frame: file_done(&self.manifest.files[file]),
        });
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.manifest.files.iter().position(|f| f.name == name)
    }

    /// Bytes per second over windows of about a second, smoothed.
    fn smooth_rate(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.rate_since).as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let r = self.rate_bytes as f64 / dt;
        self.progress.rate = if self.progress.rate == 0.0 {
            r
        } else {
            0.5 * self.progress.rate + 0.5 * r
        };
        self.rate_since = now;
        self.rate_bytes = 0;
    }
}

fn file_done(f: &CheckpointFile) -> Frame {
    Frame::FileDone(wire::FileDone {
        file: f.name.clone(),
        size: f.size,
        crc32c: f.crc32c,
    })
}

/// A token bucket over wire bytes: sending may start while it holds any; a send may take it
/// below zero (a chunk is sent whole), and the debt is paid back at the rate.
#[derive(Debug, Clone)]
struct Bucket {
    rate: Option<u64>,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: Option<u64>, now: Instant) -> Bucket {
        let mut b = Bucket {
            rate,
            tokens: 0.0,
            at: now,
        };
        b.tokens = b.capacity();
        b
    }

    fn capacity(&self) -> f64 {
        self.rate
            .map_or(f64::INFINITY, |r| r as f64 * BURST.as_secs_f64())
    }

    fn set_rate(&mut self, rate: Option<u64>, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.tokens = self.tokens.min(self.capacity());
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        if let Some(r) = self.rate {
            self.tokens = (self.tokens + dt * r as f64).min(self.capacity());
        }
    }

    fn take(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        if self.rate.is_some() {
            self.tokens -= bytes as f64;
        }
    }

    fn ready(&self) -> bool {
        self.rate.is_none() || self.tokens > 0.0
    }

    fn ready_at(&self) -> Option<Instant> {
        let r = self.rate?;
        if self.tokens > 0.0 {
            return Some(self.at);
        }
        let wait = (-self.tokens + 1.0) / r.max(1) as f64;
        Some(self.at + Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Decree, PartitionId};
    use proptest::prelude::*;

    use super::*;

    fn manifest(sizes: &[u64]) -> CheckpointManifest {
        CheckpointManifest {
            partition: PartitionId(0),
            decree: Decree(42),
            files: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| CheckpointFile {
                    name: format!("{i:06}.sst"),
                    size,
                    crc32c: 1000 + i as u32,
                })
                .collect(),
        }
    }

    fn config(chunk: u32, lanes: usize, rate: Option<u64>) -> TransferConfig {
        TransferConfig {
            chunk_bytes: chunk,
            lanes,
            rate,
        }
    }

    /// Runs a transfer to the end in virtual time: every chunk takes `wire(len)` wire bytes,
    /// prefix checks answer `prefix_crc(file, len)`. Returns the chunks read (file, offset,
    /// len) in order, the frames sent per lane, and the virtual time it took.
    struct Run {
        reads: Vec<(String, u64, u32)>,
        frames: Vec<(usize, Frame)>,
        done: Option<wire::CheckpointDone>,
        took: Duration,
        progress: TransferProgress,
    }

    fn run(
        s: &mut SendCheckpoint,
        start: Instant,
        prefix_crc: impl Fn(&str, u64) -> u32,
        wire: impl Fn(u32) -> u64,
    ) -> Run {
        let mut now = start;
        let mut reads = Vec::new();
        let mut frames = Vec::new();
        let mut done = None;
        // Reads in flight: answered in the next round, like a driver whose sends take a while.
        let mut in_flight: Vec<(usize, u32)> = Vec::new();
        for _ in 0..1_000_000 {
            while let Some(e) = s.poll(now) {
                match e {
                    SendEvent::CheckPrefix { file, len } => {
                        let crc = prefix_crc(&file, len);
                        s.handle_prefix(&file, crc);
                    }
                    SendEvent::Read {
                        lane,
                        file,
                        offset,
                        len,
                    } => {
                        assert!(len as usize <= MAX_CHUNK);
                        assert!(
                            !in_flight.iter().any(|(l, _)| *l == lane),
                            "one read per lane"
                        );
                        reads.push((file, offset, len));
                        in_flight.push((lane, len));
                    }
                    SendEvent::Send { lane, frame } => frames.push((lane, frame)),
                    SendEvent::Done(d) => done = Some(d),
                }
            }
            if done.is_some() {
                break;
            }
            if in_flight.is_empty() {
                match s.poll_timeout() {
                    Some(t) => now = now.max(t),
                    None => panic!("stalled: nothing in flight and no timeout"),
                }
                continue;
            }
            now += Duration::from_millis(1);
            for (lane, len) in in_flight.drain(..) {
                s.handle_sent(lane, wire(len), now);
            }
        }
        Run {
            reads,
            frames,
            done,
            took: now - start,
            progress: s.progress().clone(),
        }
    }

    fn covered(reads: &[(String, u64, u32)], name: &str) -> Vec<(u64, u64)> {
        let mut spans: Vec<(u64, u64)> = reads
            .iter()
            .filter(|(f, _, _)| f == name)
            .map(|(_, o, l)| (*o, *o + u64::from(*l)))
            .collect();
        spans.sort();
        spans
    }

    proptest! {
        /// With nothing on the target, every byte of every file is read exactly once, in
        /// order within its file, and every file is announced once, after its last chunk.
        #[test]
        fn every_byte_goes_once(
            sizes in prop::collection::vec(0u64..50_000, 0..12),
            chunk in 1u32..20_000,
            lanes in 1usize..5,
        ) {
            let m = manifest(&sizes);
            let start = Instant::now();
            let mut s = SendCheckpoint::new(m.clone(), &[], &config(chunk, lanes, None), start);
            let r = run(&mut s, start, |_, _| 0, u64::from);
            for f in &m.files {
                let spans = covered(&r.reads, &f.name);
                let mut at = 0;
                for (from, to) in spans {
                    prop_assert_eq!(from, at, "{} contiguous", f.name);
                    at = to;
                }
                prop_assert_eq!(at, f.size, "{} whole", f.name);
                let announced = r.frames.iter().filter(|(_, fr)| matches!(fr, Frame::FileDone(d) if d.file == f.name && d.size == f.size && d.crc32c == f.crc32c)).count();
                prop_assert_eq!(announced, 1);
            }
            let d = r.done.expect("done");
            prop_assert_eq!(d.decree, Decree(42));
            prop_assert_eq!(d.file_count as usize, sizes.len());
            prop_assert_eq!(d.total_bytes, sizes.iter().sum::<u64>());
            prop_assert_eq!(r.progress.bytes_done, r.progress.bytes_total);
            prop_assert_eq!(r.progress.files_done as usize, sizes.len());
        }
    }

    #[test]
    fn what_the_target_holds_is_not_sent_again() {
        let m = manifest(&[10_000, 10_000, 10_000, 10_000]);
        let f = &m.files;
        let present = vec![
            // Whole and equal: skipped.
            f[0].clone(),
            // A prefix whose CRC matches ours: resumes at 4000.
            CheckpointFile {
                name: f[1].name.clone(),
                size: 4_000,
                crc32c: 7,
            },
            // A prefix that differs (another lineage): sent again from 0.
            CheckpointFile {
                name: f[2].name.clone(),
                size: 4_000,
                crc32c: 8,
            },
            // Same size, other content: sent again.
            CheckpointFile {
                name: f[3].name.clone(),
                size: 10_000,
                crc32c: 9,
            },
            // Not in the manifest: ignored (the receiver drops it at CheckpointDone).
            CheckpointFile {
                name: "old.sst".into(),
                size: 5,
                crc32c: 1,
            },
        ];
        let start = Instant::now();
        let mut s = SendCheckpoint::new(m.clone(), &present, &config(3_000, 2, None), start);
        let r = run(
            &mut s,
            start,
            |file, len| {
                assert_eq!(len, 4_000);
                if file == f[1].name {
                    7
                } else {
                    99
                }
            },
            u64::from,
        );
        assert!(covered(&r.reads, &f[0].name).is_empty());
        assert_eq!(covered(&r.reads, &f[1].name).first(), Some(&(4_000, 7_000)));
        assert_eq!(covered(&r.reads, &f[2].name).first(), Some(&(0, 3_000)));
        assert_eq!(covered(&r.reads, &f[3].name).first(), Some(&(0, 3_000)));
        let read: u64 = r.reads.iter().map(|(_, _, l)| u64::from(*l)).sum();
        assert_eq!(read, 6_000 + 10_000 + 10_000);
        assert_eq!(r.progress.bytes_present, 10_000 + 4_000);
        assert_eq!(r.progress.bytes_done, 40_000);
        assert_eq!(
            r.frames
                .iter()
                .filter(|(_, f)| matches!(f, Frame::FileDone(_)))
                .count(),
            4,
            "every manifest file is announced, the skipped one too"
        );
        assert!(r.done.is_some());
    }

    #[test]
    fn the_rate_limit_holds_on_wire_bytes_and_can_change_while_it_runs() {
        // 10 MB at 10 MB/s with chunks that compress to half: about 0.5 s of wire time.
        let m = manifest(&[5_000_000, 5_000_000]);
        let start = Instant::now();
        let rate = 10_000_000;
        let mut s = SendCheckpoint::new(m, &[], &config(100_000, 4, Some(rate)), start);
        let r = run(&mut s, start, |_, _| 0, |len| u64::from(len) / 2);
        assert_eq!(r.progress.wire_bytes, 5_000_000);
        // What the bucket may let through without waiting: its burst, plus a chunk per lane
        // started just before it ran dry (50 kB on the wire each).
        let free = rate as f64 * BURST.as_secs_f64() + 4.0 * 50_000.0;
        let floor = Duration::from_secs_f64((5_000_000.0 - free) / rate as f64);
        assert!(r.took >= floor, "took {:?}, at least {floor:?}", r.took);
        assert!(
            r.took < floor * 2,
            "took {:?}: the limit does not slow it further",
            r.took
        );

        // Halved halfway: the second half takes twice as long as the first.
        let m = manifest(&[4_000_000]);
        let mut s = SendCheckpoint::new(m, &[], &config(100_000, 1, Some(rate)), start);
        let mut now = start;
        let mut sent = 0u64;
        let mut halfway = None;
        for _ in 0..100_000 {
            match s.poll(now) {
                Some(SendEvent::Read { lane, len, .. }) => {
                    now += Duration::from_micros(10);
                    s.handle_sent(lane, u64::from(len), now);
                    sent += u64::from(len);
                    if sent >= 2_000_000 && halfway.is_none() {
                        halfway = Some(now);
                        s.set_rate(Some(rate / 2), now);
                    }
                }
                Some(SendEvent::Done(_)) => break,
                Some(_) => {}
                None => now = s.poll_timeout().expect("waits for the rate limit"),
            }
        }
        let halfway = halfway.expect("halfway");
        let (first, second) = (halfway - start, now - halfway);
        assert!(
            second > first + first / 2,
            "first half {first:?}, second {second:?}"
        );
    }

    #[test]
    fn progress_tells_the_rate_and_the_time_left() {
        let m = manifest(&[10_000_000]);
        let start = Instant::now();
        let mut s = SendCheckpoint::new(m, &[], &config(100_000, 1, Some(1_000_000)), start);
        let mut now = start;
        while s.progress().bytes_done < 3_000_000 {
            match s.poll(now) {
                Some(SendEvent::Read { lane, len, .. }) => s.handle_sent(lane, u64::from(len), now),
                Some(_) => {}
                None => now = s.poll_timeout().expect("rate limited"),
            }
        }
        let p = s.progress();
        assert!(
            (800_000.0..1_300_000.0).contains(&p.rate),
            "rate {} near the 1 MB/s limit",
            p.rate
        );
        let eta = p.eta().expect("eta").as_secs_f64();
        assert!((5.0..9.0).contains(&eta), "eta {eta} s for 7 MB at ~1 MB/s");
    }

    #[test]
    fn an_empty_checkpoint_is_done_at_once() {
        let start = Instant::now();
        let mut s = SendCheckpoint::new(manifest(&[]), &[], &TransferConfig::default(), start);
        assert_eq!(
            s.poll(start),
            Some(SendEvent::Done(wire::CheckpointDone {
                decree: Decree(42),
                file_count: 0,
                total_bytes: 0
            }))
        );
        assert!(s.is_done());
        assert_eq!(s.poll(start), None);
    }
}
