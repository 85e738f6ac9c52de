//! What the queue threads, the control thread and the device's main thread share while a
//! device is served, and how they tell the main thread to stop ([`Event`]).
//!
//! Made once, before the device goes live, and leaked: every thread holds a `&'static` to it
//! for the rest of the process, so nothing on the IO path counts references or locks.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64};
use std::sync::mpsc;

use ublk_crypt_crypto::SectorCipher;
use ublk_crypt_pool::ReservePool;

use crate::backing::{Backing, Geometry};
use crate::hardening::Protections;
use crate::io::RateLimit;
use crate::offload::CryptoWorkers;
use crate::records::DeviceRecord;
use crate::stats::QueueCounters;

/// What the device's main thread is told by the control plane and the queue threads.
pub enum Event {
    /// `close`, SIGTERM or SIGINT: stop the device. It carries the device opened exclusively
    /// (see [`crate::control::hold_unless_in_use`]): held until the device is stopped, so
    /// nobody can swapon or mount it between the in-use check and the stop.
    Stop(Option<std::fs::File>),
    /// A queue thread ended on its own: the device was deleted or stopped under us, or the
    /// queue failed (then the daemon exits and leaves the device for recovery).
    QueueExited(u16),
}

/// Everything the queue threads and the control plane share, alive for the process lifetime.
pub struct DeviceContext {
    /// Written before the context exists, read-only after.
    pub record: DeviceRecord,
    pub cipher: &'static SectorCipher,
    /// Crypto workers for large pieces; `None` with `--crypto-threads 0`.
    pub workers: Option<&'static CryptoWorkers>,
    pub pool: &'static ReservePool,
    pub backing: Backing,
    pub geometry: Geometry,
    pub counters: Vec<QueueCounters>,
    pub error_log: RateLimit,
    pub protections: Protections,
    pub events: mpsc::Sender<Event>,
    /// Each queue thread's tid, stored when it starts (0 before).
    pub queue_tids: Vec<AtomicI32>,
    /// This device's standby process, and how this process came to serve the device.
    pub standby: StandbyState,
    /// The ublk features the kernel offers and the device uses, set when it goes live.
    pub ublk_features: std::sync::OnceLock<crate::ublk_features::UblkFeatures>,
}

/// The standby of a served device (`standby.rs`, `keeper.rs`), shared by the keeper thread that
/// starts it and the control plane that hears from it.
#[derive(Default)]
pub struct StandbyState {
    /// Whether this device has standbys at all (`--no-standby` turns them off).
    pub enabled: bool,
    /// The pool's memfd, as the descriptor number a standby inherits (`-1`: none).
    pub pool_fd: i32,
    /// The standby process started last (0: none now).
    pub pid: AtomicU32,
    /// The standby an upgrade started, from the new binary (0: none).
    pub upgrade_pid: AtomicU32,
    /// The last standby that told the control socket it is ready to take over.
    pub ready_pid: AtomicU32,
    /// Its share of locked memory then, KiB (`hardening::locked_share_of`).
    pub ready_share_kib: AtomicU64,
    /// Set when the device is stopping or being handed over: the keeper starts no standby.
    pub quiet: AtomicBool,
    /// How this process took the device over from a previous daemon, if it did.
    pub takeover: std::sync::OnceLock<Takeover>,
}

/// One takeover: a standby becoming the daemon of the device.
#[derive(Debug, Clone, Copy)]
pub struct Takeover {
    /// When the device was served again, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// From the moment the previous daemon was seen gone to the device live again: how long
    /// the device had no server (its IO waited in the kernel meanwhile).
    pub gap_us: u64,
    /// Whether the previous daemon handed over (`upgrade`) rather than died.
    pub upgrade: bool,
    /// The previous daemon's pid.
    pub previous_pid: u32,
    /// Whether the takeover ran at real-time priority (`hardening::SchedPolicy::TAKEOVER`).
    pub realtime: bool,
}

impl DeviceContext {
    /// Tells the main thread; nothing to do if it no longer listens (it is stopping anyway).
    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }
}
