//! A bounded pool of plain std threads for the HTTP calls of one batch. Pure logic, no pgrx:
//! the worker threads must never touch Postgres, and this module cannot.
//!
//! The calling (backend) thread waits in short slices and runs `on_wait` between them; the
//! caller uses that to check for query cancel and statement_timeout. If `on_wait` unwinds (a
//! cancel), the pool is abandoned: workers finish the call in hand (bounded by the HTTP
//! timeout), take nothing new, and exit on their own; nobody waits for them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the calling thread blocks before it runs `on_wait` again.
pub const WAIT_SLICE: Duration = Duration::from_millis(20);

/// Worker threads that live for one run and take the HTTP calls of batch after batch, so a
/// long drain does not start thousands of threads (nor churn their stacks and malloc arenas).
pub struct Pool<T, R> {
    concurrency: usize,
    work: Arc<dyn Fn(T) -> R + Send + Sync>,
    jobs: Option<mpsc::Sender<(u64, usize, T)>>,
    shared_jobs: Arc<Mutex<mpsc::Receiver<(u64, usize, T)>>>,
    results_tx: mpsc::Sender<(u64, usize, Option<R>)>,
    results: mpsc::Receiver<(u64, usize, Option<R>)>,
    abandoned: Arc<AtomicBool>,
    spawned: usize,
    batch: u64,
}

impl<T: Send + 'static, R: Send + 'static> Pool<T, R> {
    pub fn new<F: Fn(T) -> R + Send + Sync + 'static>(concurrency: usize, work: F) -> Pool<T, R> {
        let (jobs, shared_jobs) = mpsc::channel();
        let (results_tx, results) = mpsc::channel();
        Pool {
            concurrency: concurrency.max(1),
            work: Arc::new(work),
            jobs: Some(jobs),
            shared_jobs: Arc::new(Mutex::new(shared_jobs)),
            results_tx,
            results,
            abandoned: Arc::new(AtomicBool::new(false)),
            spawned: 0,
            batch: 0,
        }
    }

    fn spawn_worker(&mut self) {
        let (jobs, results, abandoned, work) = (
            self.shared_jobs.clone(),
            self.results_tx.clone(),
            self.abandoned.clone(),
            self.work.clone(),
        );
        std::thread::spawn(move || loop {
            let next = match jobs.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok((batch, index, item)) = next else {
                return;
            };
            if abandoned.load(Ordering::SeqCst) {
                return;
            }
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(item))).ok();
            if results.send((batch, index, result)).is_err() {
                return;
            }
        });
        self.spawned += 1;
    }

    /// Runs the work over `items` and returns the results in input order. Items not finished by
    /// `deadline` come back as None (their calls finish alone); a panicking item yields None.
    /// If `on_wait` unwinds (a cancel), dropping the pool abandons the rest.
    pub fn run<W: FnMut()>(
        &mut self,
        items: Vec<T>,
        deadline: Option<Instant>,
        mut on_wait: W,
    ) -> Vec<Option<R>> {
        let total = items.len();
        let mut results: Vec<Option<R>> = (0..total).map(|_| None).collect();
        if total == 0 {
            return results;
        }
        while self.spawned < self.concurrency.min(total) {
            self.spawn_worker();
        }
        self.batch += 1;
        let Some(jobs) = self.jobs.as_ref() else {
            return results;
        };
        for (index, item) in items.into_iter().enumerate() {
            if jobs.send((self.batch, index, item)).is_err() {
                return results;
            }
        }
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
            match self.results.recv_timeout(slice) {
                // A late answer from an earlier batch that ran out of time is dropped.
                Ok((batch, index, result)) if batch == self.batch => {
                    results[index] = result;
                    received += 1;
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => on_wait(),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        results
    }
}

impl<T, R> Drop for Pool<T, R> {
    /// Workers finish the call in hand, take nothing new, and exit; nobody waits for them.
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.jobs.take();
    }
}

/// One batch on a pool of its own (see `Pool::run`); the tests' shorthand.
#[cfg(test)]
fn run<T, R, F, W>(
    items: Vec<T>,
    concurrency: usize,
    deadline: Option<Instant>,
    work: F,
    on_wait: W,
) -> Vec<Option<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
    W: FnMut(),
{
    Pool::new(concurrency, work).run(items, deadline, on_wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn one_pool_serves_many_batches_with_the_same_threads() {
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let t = threads.clone();
        let mut pool = Pool::new(4, move |i: u32| {
            t.lock().unwrap().insert(std::thread::current().id());
            i + 1
        });
        for batch in 0..50u32 {
            let out = pool.run((0..20).map(|i| batch * 100 + i).collect(), None, || {});
            assert_eq!(
                out,
                (0..20)
                    .map(|i| Some(batch * 100 + i + 1))
                    .collect::<Vec<_>>()
            );
        }
        assert!(threads.lock().unwrap().len() <= 4);
    }

    #[test]
    fn a_late_answer_does_not_leak_into_the_next_batch() {
        let mut pool = Pool::new(2, |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms));
            ms
        });
        let first = pool.run(
            vec![400, 1],
            Some(Instant::now() + Duration::from_millis(100)),
            || {},
        );
        assert_eq!(first, vec![None, Some(1)]);
        let second = pool.run(vec![2, 3], None, || {});
        assert_eq!(second, vec![Some(2), Some(3)]);
    }

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
