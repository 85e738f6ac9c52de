//! How long a queue thread polls its ring before it sleeps in it (`--poll-usec`).
//!
//! Why: a swap-in is one faulting task and one 4 KiB read at a time, and through ublk each read
//! wakes the queue thread twice (the request's dispatch, the backing read's completion) where
//! dm-crypt wakes one kcryptd worker. A thread that sleeps in `io_uring_enter` pays for each
//! wake-up the scheduler's switch and, on an idle CPU, its exit from the idle state; the
//! faulting task waits for all of it. In the test VM that was most of the distance to dm-crypt
//! on scattered swap-in (issue 19: 89.0 s against 66.5 s; polling every wait up to 300 us:
//! 62.9 s). So after its work a queue thread polls its ring for a while before it sleeps.
//!
//! How long: a window that adapts as the kernel's cpuidle-haltpoll governor adapts its poll
//! (`Documentation/virt/guest-halt-polling.rst`). Each wait, from the end of the thread's work
//! to the next completion, polled or slept, is recorded: a wait the window covered keeps it; a
//! longer one still within the limit doubles it (from 10 us); one beyond the limit halves it.
//! So a device busy with a chain of dependent IOs (swap-in, a QD1 reader) is polled for about
//! as long as its waits last, and an idle or slow one (waits beyond the limit) soon is not
//! polled at all: the CPU a poll costs is bounded by the waits it catches.

use std::cell::Cell;
use std::time::Duration;

/// First window after a wait the window missed but the limit covers (haltpoll's
/// `guest_halt_poll_grow_start`).
const GROW_START_NS: u64 = 10_000;

/// One queue thread's poll window.
pub struct PollWindow {
    limit_ns: u64,
    window_ns: Cell<u64>,
}

impl PollWindow {
    /// `limit`: the longest wait worth polling through (`--poll-usec`; zero: never poll).
    pub fn new(limit: Duration) -> PollWindow {
        PollWindow {
            limit_ns: limit.as_nanos().min(u128::from(u64::MAX)) as u64,
            window_ns: Cell::new(0),
        }
    }

    /// How long to poll before sleeping, now.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.get())
    }

    /// Adapts the window to one wait: `waited` from the end of the thread's work to the next
    /// completion, whether the poll caught it or the thread slept.
    pub fn record(&self, waited: Duration) {
        let waited = waited.as_nanos().min(u128::from(u64::MAX)) as u64;
        let window = self.window_ns.get();
        if waited <= window {
            return;
        }
        self.window_ns.set(if waited <= self.limit_ns {
            window
                .saturating_mul(2)
                .max(GROW_START_NS)
                .min(self.limit_ns)
        } else {
            window / 2
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_waits_open_the_window_up_to_the_limit() {
        let w = PollWindow::new(200 * US);
        assert_eq!(w.window(), Duration::ZERO, "starts closed");
        w.record(50 * US);
        assert_eq!(w.window(), 10 * US, "first growth: 10 us");
        for expect in [20, 40, 80] {
            w.record(50 * US);
            assert_eq!(w.window(), expect * US);
        }
        w.record(50 * US);
        assert_eq!(w.window(), 80 * US, "a wait the window covered keeps it");
        w.record(190 * US);
        w.record(190 * US);
        assert_eq!(w.window(), 200 * US, "never beyond the limit");
    }

    #[test]
    fn long_waits_close_it() {
        let w = PollWindow::new(200 * US);
        for _ in 0..10 {
            w.record(190 * US);
        }
        assert_eq!(w.window(), 200 * US);
        w.record(Duration::from_millis(5));
        assert_eq!(w.window(), 100 * US, "a wait beyond the limit halves it");
        for _ in 0..20 {
            w.record(Duration::from_secs(20));
        }
        assert_eq!(w.window(), Duration::ZERO, "an idle device is not polled");
    }

    #[test]
    fn zero_limit_never_polls() {
        let w = PollWindow::new(Duration::ZERO);
        for waited in [0, 1, 10, 1000] {
            w.record(waited * US);
            assert_eq!(w.window(), Duration::ZERO);
        }
    }
}
