//! A bounded pool of plain std threads for the HTTP calls of one batch. Pure logic, no pgrx:
//! the worker threads must never touch Postgres, and this module cannot.
//!
//! The calling (backend) thread waits in short slices and runs `on_wait` between them; the
//! caller uses that to check for query cancel and statement_timeout. If `on_wait` unwinds (a
//! cancel), the pool is abandoned: workers finish the call in hand (bounded by the HTTP
//! timeout), take nothing new, and exit on their own; nobody waits for them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the calling thread blocks before it runs `on_wait` again.
pub const WAIT_SLICE: Duration = Duration::from_millis(20);

/// Sets the abandon flag when the waiting thread leaves, normally or by unwinding.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `work` over `items` on at most `concurrency` threads and returns the results in input
/// order. Items whose work has not finished by `deadline` come back as `None` (their threads are
/// left to finish alone); a panicking `work` also yields `None` for its item.
pub fn run<T, R, F, W>(
    items: Vec<T>,
    concurrency: usize,
    deadline: Option<Instant>,
    work: F,
    mut on_wait: W,
) -> Vec<Option<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
    W: FnMut(),
{
    let total = items.len();
    let mut results: Vec<Option<R>> = (0..total).map(|_| None).collect();
    if total == 0 {
        return results;
    }
    let queue = Arc::new(Mutex::new(
        items.into_iter().enumerate().collect::<VecDeque<_>>(),
    ));
    let abandoned = Arc::new(AtomicBool::new(false));
    let _guard = AbandonOnDrop(abandoned.clone());
    let work = Arc::new(work);
    let (tx, rx) = mpsc::channel::<(usize, Option<R>)>();

    for _ in 0..concurrency.clamp(1, total) {
        let (queue, abandoned, work, tx) =
            (queue.clone(), abandoned.clone(), work.clone(), tx.clone());
        std::thread::spawn(move || loop {
            if abandoned.load(Ordering::SeqCst) {
                return;
            }
            let next = match queue.lock() {
                Ok(mut q) => q.pop_front(),
                Err(_) => return,
            };
            let Some((index, item)) = next else { return };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(item))).ok();
            if tx.send((index, result)).is_err() {
                return;
            }
        });
    }
    drop(tx);

    let mut received = 0;
    while received < total {
        let slice = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                left.min(WAIT_SLICE)
            }
            None => WAIT_SLICE,
        };
        match rx.recv_timeout(slice) {
            Ok((index, result)) => {
                results[index] = result;
                received += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => on_wait(),
            // Every worker is gone: the rest panicked or were abandoned.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn results_come_back_in_input_order() {
        let out = run((0..100).collect(), 8, None, |i: u32| i * 2, || {});
        assert_eq!(out, (0..100).map(|i| Some(i * 2)).collect::<Vec<_>>());
    }

    #[test]
    fn never_more_than_concurrency_at_once() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        run(
            (0..40).collect(),
            4,
            None,
            move |_: u32| {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                l.fetch_sub(1, Ordering::SeqCst);
            },
            || {},
        );
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn calls_overlap() {
        let start = Instant::now();
        run(
            (0..16).collect(),
            16,
            None,
            |_: u32| std::thread::sleep(Duration::from_millis(100)),
            || {},
        );
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_panic_yields_none_for_that_item_only() {
        let out = run(
            (0..10).collect(),
            3,
            None,
            |i: u32| if i == 4 { panic!("boom") } else { i },
            || {},
        );
        assert_eq!(out[4], None);
        assert_eq!(out.iter().filter(|r| r.is_some()).count(), 9);
    }

    #[test]
    fn deadline_returns_unfinished_items_as_none() {
        let start = Instant::now();
        let out = run(
            vec![0u64, 2000],
            2,
            Some(Instant::now() + Duration::from_millis(200)),
            |ms| {
                std::thread::sleep(Duration::from_millis(ms));
                ms
            },
            || {},
        );
        assert!(start.elapsed() < Duration::from_millis(1000));
        assert_eq!(out, vec![Some(0), None]);
    }

    #[test]
    fn unwinding_out_of_on_wait_abandons_the_rest_promptly() {
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let begin = Instant::now();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut waits = 0;
            run(
                (0..100).collect(),
                2,
                None,
                move |_: u32| {
                    s.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                },
                || {
                    waits += 1;
                    if waits == 3 {
                        panic!("cancel");
                    }
                },
            )
        }));
        assert!(caught.is_err());
        assert!(
            begin.elapsed() < Duration::from_millis(250),
            "cancel took {:?}",
            begin.elapsed()
        );
        std::thread::sleep(Duration::from_millis(700));
        // Only the two calls in hand ran; nothing new was taken after the cancel.
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }
}
