//! The executor each queue thread runs: one task per ublk tag, no allocation after start.
//!
//! libublk drives its io_uring and wakes futures when completions arrive; it leaves polling
//! them to an executor of the caller's choice. General-purpose executors (smol's, which the
//! libublk examples use) push every wake onto an unbounded queue that allocates a block every
//! few dozen wakes: heap allocation on the IO path, exactly what a swap device must not do.
//! This one is a fixed table: task i is the future serving tag i, its waker is an
//! `Arc<ReadyFlag>` made once (cloning it only bumps a counter), and `run_ready` polls the
//! tasks whose flag is set until none is.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

struct ReadyFlag {
    ready: AtomicBool,
}

impl Wake for ReadyFlag {
    fn wake(self: Arc<Self>) {
        self.ready.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
    }
}

pub struct TagExecutor<F: Future<Output = ()>> {
    tasks: RefCell<Vec<Option<Pin<Box<F>>>>>,
    flags: Vec<Arc<ReadyFlag>>,
    wakers: Vec<Waker>,
}

impl<F: Future<Output = ()>> TagExecutor<F> {
    /// All tasks start ready, so the first `run_ready` polls each once.
    pub fn new(tasks: impl IntoIterator<Item = F>) -> Self {
        let tasks: Vec<_> = tasks.into_iter().map(|f| Some(Box::pin(f))).collect();
        let flags: Vec<_> = (0..tasks.len())
            .map(|_| {
                Arc::new(ReadyFlag {
                    ready: AtomicBool::new(true),
                })
            })
            .collect();
        let wakers = flags.iter().map(|f| Waker::from(f.clone())).collect();
        TagExecutor {
            tasks: RefCell::new(tasks),
            flags,
            wakers,
        }
    }

    /// Polls every task whose waker fired, again and again until a full pass finds none.
    pub fn run_ready(&self) {
        let mut tasks = self.tasks.borrow_mut();
        loop {
            let mut progressed = false;
            for (i, slot) in tasks.iter_mut().enumerate() {
                if !self.flags[i].ready.swap(false, Ordering::Acquire) {
                    continue;
                }
                if let Some(task) = slot {
                    progressed = true;
                    let mut cx = Context::from_waker(&self.wakers[i]);
                    if let Poll::Ready(()) = task.as_mut().poll(&mut cx) {
                        *slot = None;
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
}
