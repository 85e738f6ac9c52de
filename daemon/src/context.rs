//! What the queue threads, the control thread and the device's main thread share while a
//! device is served, and how they tell the main thread to stop ([`Event`]).
//!
//! Made once, before the device goes live, and leaked: every thread holds a `&'static` to it
//! for the rest of the process, so nothing on the IO path counts references or locks.

use std::sync::atomic::AtomicI32;
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
    /// A queue thread ended on its own (the device was deleted under us).
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
}

impl DeviceContext {
    /// Tells the main thread; nothing to do if it no longer listens (it is stopping anyway).
    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }
}
