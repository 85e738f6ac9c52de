//! The `ublk-crypt` daemon as a library, so integration tests can drive the IO path (for
//! example under a counting allocator) without a kernel. See `main.rs` for the file map.

pub mod backing;
pub mod batch;
pub mod benchmark;
pub mod cli;
pub mod client;
pub mod config;
pub mod context;
pub mod control;
pub mod control_request;
pub mod device;
pub mod docs;
pub mod executor;
pub mod hardening;
pub mod io;
pub mod keeper;
pub mod kernel_log;
pub mod key_source;
pub mod keyring;
pub mod mkswap;
pub mod offload;
pub mod poll_window;
pub mod queue;
pub mod queue_crypto;
pub mod queue_threads;
pub mod readiness;
pub mod records;
pub mod standby;
pub mod stats;
pub mod ublk;
pub mod ublk_batch;
pub mod ublk_features;
