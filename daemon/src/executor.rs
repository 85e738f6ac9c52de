//! The executor each queue thread runs: one task per ublk tag, no allocation after start.
//!
//! libublk drives its io_uring and wakes futures when completions arrive; it leaves polling
//! them to an executor of the caller's choice. General-purpose executors (smol's, which the
//! libublk examples use) push every wake onto an unbounded queue that allocates a block every
//! few dozen wakes: heap allocation on the IO path, exactly what a swap device must not do.
//! This one is a fixed table: task i is the future serving tag i, its waker is an
//! `Arc<ReadyFlag>` made once (cloning it only bumps a counter) that sets the task's bit in a
//! shared bitmap, and `run_ready` polls the tasks whose bit is set until none is.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// One bit per task, set by its waker: `run_ready` finds the woken tasks of 64 at once with one
/// atomic swap, instead of testing every task's flag (twice per call) on every completion.
struct ReadyBits(Box<[AtomicU64]>);

/// Task `index`'s waker.
struct ReadyFlag {
    bits: Arc<ReadyBits>,
    index: usize,
}

impl ReadyFlag {
    fn set(&self) {
        self.bits.0[self.index / 64].fetch_or(1 << (self.index % 64), Ordering::Release);
    }
}

impl Wake for ReadyFlag {
    fn wake(self: Arc<Self>) {
        self.set();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.set();
    }
}

pub struct TagExecutor<F: Future<Output = ()>> {
    tasks: RefCell<Vec<Option<Pin<Box<F>>>>>,
    ready: Arc<ReadyBits>,
    wakers: Vec<Waker>,
}

impl<F: Future<Output = ()>> TagExecutor<F> {
    /// All tasks start ready, so the first `run_ready` polls each once.
    pub fn new(tasks: impl IntoIterator<Item = F>) -> Self {
        let tasks: Vec<_> = tasks.into_iter().map(|f| Some(Box::pin(f))).collect();
        let n = tasks.len();
        let ready = Arc::new(ReadyBits(
            // One bit set per task (the last word's unused high bits stay clear).
            (0..n.div_ceil(64))
                .map(|w| AtomicU64::new(u64::MAX >> (64 - (n - w * 64).min(64))))
                .collect(),
        ));
        let wakers = (0..n)
            .map(|index| {
                Waker::from(Arc::new(ReadyFlag {
                    bits: ready.clone(),
                    index,
                }))
            })
            .collect();
        TagExecutor {
            tasks: RefCell::new(tasks),
            ready,
            wakers,
        }
    }

    /// Polls every task whose waker has fired, again and again until no task is ready (a task
    /// may wake another, or itself, while being polled).
    pub fn run_ready(&self) {
        let mut tasks = self.tasks.borrow_mut();
        loop {
            let mut progressed = false;
            for (w, word) in self.ready.0.iter().enumerate() {
                let mut woken = word.swap(0, Ordering::Acquire);
                while woken != 0 {
                    let i = w * 64 + woken.trailing_zeros() as usize;
                    woken &= woken - 1;
                    if let Some(task) = &mut tasks[i] {
                        progressed = true;
                        let mut cx = Context::from_waker(&self.wakers[i]);
                        if let Poll::Ready(()) = task.as_mut().poll(&mut cx) {
                            tasks[i] = None;
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    pub fn all_done(&self) -> bool {
        self.tasks.borrow().iter().all(Option::is_none)
    }
}

/// Runs a future that never really waits on this thread (libublk's event loop blocks inside
/// io_uring, not in `poll`) to completion, without any runtime.
pub fn block_on<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A future that is pending until its shared flag is set, then wakes through the waker it
    /// stored (like libublk's completion futures).
    struct Gate {
        open: Rc<Cell<bool>>,
        waker: Rc<RefCell<Option<Waker>>>,
    }
    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.open.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    #[test]
    fn polls_only_woken_tasks_and_finishes() {
        let open = Rc::new(Cell::new(false));
        let waker: Rc<RefCell<Option<Waker>>> = Rc::default();
        let polls = Rc::new(Cell::new(0));
        let make = |i: usize| {
            let (open, waker, polls) = (open.clone(), waker.clone(), polls.clone());
            async move {
                polls.set(polls.get() + 1);
                if i == 0 {
                    Gate { open, waker }.await;
                }
            }
        };
        let exe = TagExecutor::new((0..4).map(make));
        exe.run_ready();
        assert_eq!(polls.get(), 4);
        assert!(!exe.all_done());
        exe.run_ready(); // nothing woken: nothing polled
        assert!(!exe.all_done());
        open.set(true);
        waker.borrow_mut().take().unwrap().wake();
        exe.run_ready();
        assert!(exe.all_done());
    }

    /// Tasks past the first 64 (the bitmap's second and third words) start ready, are polled
    /// only when woken, and each wake polls exactly its own task.
    #[test]
    fn wakes_reach_the_right_task_beyond_64() {
        const N: usize = 130;
        let polls: Rc<Vec<Cell<u32>>> = Rc::new((0..N).map(|_| Cell::new(0)).collect());
        let wakers: Rc<RefCell<Vec<Option<Waker>>>> = Rc::new(RefCell::new(vec![None; N]));
        let make = |i: usize| {
            let (polls, wakers) = (polls.clone(), wakers.clone());
            std::future::poll_fn(move |cx| {
                polls[i].set(polls[i].get() + 1);
                if polls[i].get() < 3 {
                    wakers.borrow_mut()[i] = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        };
        let exe = TagExecutor::new((0..N).map(make));
        exe.run_ready();
        assert!(
            polls.iter().all(|p| p.get() == 1),
            "every task polled once at start"
        );
        let woken = [0, 63, 64, 127, 128, 129];
        for (n, &i) in woken.iter().enumerate() {
            wakers.borrow_mut()[i].take().unwrap().wake();
            exe.run_ready();
            for (j, p) in polls.iter().enumerate() {
                let expect = if woken[..=n].contains(&j) { 2 } else { 1 };
                assert_eq!(p.get(), expect, "task {j} after waking task {i}");
            }
        }
        // Two more rounds of wakes finish everyone (the six above need one, the rest two).
        for round in 0..2 {
            assert!(!exe.all_done(), "round {round}");
            for w in wakers.borrow_mut().iter_mut() {
                if let Some(w) = w.take() {
                    w.wake();
                }
            }
            exe.run_ready();
        }
        exe.run_ready();
        assert!(exe.all_done());
    }
}
