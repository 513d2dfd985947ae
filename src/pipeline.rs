//! The one pipeline every job runs: claim → calls in flight → record, streaming. Pure logic, no
//! pgrx: what touches Postgres (claiming rows, writing results) is the `Source`'s business, and
//! the HTTP calls run on the `Pool`'s threads.
//!
//! Up to the pool's concurrency calls are in flight at all times: as one finishes, its result is
//! kept for the next group and a replacement is claimed. No call waits for another. 0.1.0 ran
//! batches, and a batch waits for its slowest call: with one call in ten taking 2.5 s, a run
//! used half of what its concurrency allowed.
//!
//! Results are recorded in groups, by count (`Grouping::size`) or by age (`Grouping::age`), so a
//! row's outcome is written soon after its call and the background worker, which commits after
//! every group, shows progress as it happens. The SQL functions drive the same pipeline inside
//! their one transaction (`run_to_end`).

use crate::pool::{Pool, WAIT_SLICE};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Whether the pipeline may go on claiming after a group was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Claim nothing more (the circuit opened, ...); calls in flight are still recorded.
    Stop(&'static str),
}

/// What a job claims, calls and records.
pub trait Source {
    /// What the main thread keeps of a claimed row while its call is in flight.
    type Row;
    /// What a pool thread needs for the call (never a Postgres datum).
    type Call: Send + 'static;
    type Answer: Send + 'static;

    /// Claims up to `room` due rows, each with its call. Fewer than `room` means that nothing
    /// more is due now. `busy` are the rows in flight or waiting to be recorded, which a claim
    /// inside the same transaction would otherwise see as still due.
    fn claim(&mut self, room: usize, busy: &[&Self::Row]) -> Vec<(Self::Row, Self::Call)>;

    /// Writes a group of finished rows. None: no answer (the call panicked, or was abandoned at
    /// the deadline or at shutdown).
    fn record(&mut self, done: Vec<(Self::Row, Option<Self::Answer>)>) -> Flow;
}

/// When a group of results is recorded: once it has `size` results, or its oldest waited
/// `age`, or nothing else is in flight.
#[derive(Debug, Clone, Copy)]
pub struct Grouping {
    pub size: usize,
    pub age: Duration,
}

/// The rows of one source in flight and their results waiting for a group.
pub struct Pipeline<S: Source> {
    pool: Pool<S::Call, S::Answer>,
    rows: HashMap<u64, S::Row>,
    next_key: u64,
    done: Vec<(S::Row, Option<S::Answer>)>,
    oldest_done: Option<Instant>,
    grouping: Grouping,
    /// The last claim found nothing more due.
    drained: bool,
    /// A group said stop: nothing more is claimed.
    stopped: Option<&'static str>,
    /// Rows the last claim took.
    last_claim: usize,
    /// Rows claimed so far.
    pub claimed: u64,
    /// Groups recorded so far.
    pub groups: u64,
}

impl<S: Source> Pipeline<S> {
    pub fn new(pool: Pool<S::Call, S::Answer>, grouping: Grouping) -> Pipeline<S> {
        Pipeline {
            pool,
            rows: HashMap::new(),
            next_key: 0,
            done: Vec::new(),
            oldest_done: None,
            grouping: Grouping {
                size: grouping.size.max(1),
                age: grouping.age,
            },
            drained: false,
            stopped: None,
            last_claim: 0,
            claimed: 0,
            groups: 0,
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.rows.len()
    }

    /// Nothing in flight and nothing waiting to be recorded.
    pub fn idle(&self) -> bool {
        self.rows.is_empty() && self.done.is_empty()
    }

    /// Why a group stopped the claims, if one did.
    pub fn stopped(&self) -> Option<&'static str> {
        self.stopped
    }

    /// Claims again from now on: new rows were announced since the last claim found nothing.
    /// (A stop stays a stop.)
    pub fn rearm(&mut self) {
        self.drained = false;
    }

    /// Stops claiming (the run's time is up, or the worker is shutting down).
    pub fn stop(&mut self, reason: &'static str) {
        self.stopped.get_or_insert(reason);
    }

    /// Whether the run is over: nothing in flight or waiting, and nothing more to claim. A claim
    /// that found nothing more while rows were in flight is asked once more when they are
    /// recorded: a row can have a second task that its first kept out of reach (an instance's
    /// webhook to repoint after its QR was asked), and recorded rows may make others due.
    pub fn finished(&mut self) -> bool {
        if !self.idle() {
            return false;
        }
        if self.stopped.is_some() {
            return true;
        }
        if self.drained && self.last_claim > 0 {
            self.drained = false;
            return false;
        }
        self.drained
    }

    /// Whether a claim would be asked for rows now.
    pub fn wants_rows(&self) -> bool {
        !self.drained && self.stopped.is_none() && self.pool.room() > 0
    }

    /// Claims as many rows as there are free slots and hands their calls to the pool. Returns
    /// how many it claimed.
    pub fn fill(&mut self, source: &mut S) -> usize {
        let claimed = self.claim(source);
        self.launch(claimed)
    }

    /// Claims as many rows as there are free slots, without calling yet: the background worker
    /// commits its claims first, so no call leaves for a claim that could still roll back.
    pub fn claim(&mut self, source: &mut S) -> Vec<(S::Row, S::Call)> {
        if !self.wants_rows() {
            return Vec::new();
        }
        // A claim takes at most a group's worth of rows (evoq.batch_size for the jobs).
        let room = self.pool.room().min(self.grouping.size);
        let busy: Vec<&S::Row> = self
            .rows
            .values()
            .chain(self.done.iter().map(|(r, _)| r))
            .collect();
        let claimed = source.claim(room, &busy);
        self.drained = claimed.len() < room;
        self.last_claim = claimed.len();
        claimed
    }

    /// Hands claimed rows' calls to the pool; returns how many.
    pub fn launch(&mut self, claimed: Vec<(S::Row, S::Call)>) -> usize {
        let n = claimed.len();
        for (row, call) in claimed {
            let key = self.next_key;
            self.next_key += 1;
            self.rows.insert(key, row);
            self.pool.submit(key, call);
        }
        self.claimed += n as u64;
        n
    }

    /// Takes the results that arrived, waiting up to `wait` for the first one. Returns how
    /// many arrived.
    pub fn gather(&mut self, wait: Duration) -> usize {
        let mut n = 0;
        let mut next = self.pool.recv_timeout(wait);
        while let Some((key, answer)) = next {
            if let Some(row) = self.rows.remove(&key) {
                self.done.push((row, answer));
                self.oldest_done.get_or_insert_with(Instant::now);
                n += 1;
            }
            next = self.pool.try_recv();
        }
        n
    }

    /// Whether the results waiting should be recorded now.
    pub fn group_due(&self) -> bool {
        !self.done.is_empty()
            && (self.done.len() >= self.grouping.size
                || self.rows.is_empty()
                || self
                    .oldest_done
                    .is_some_and(|t| t.elapsed() >= self.grouping.age))
    }

    /// How long until the waiting results are due for recording (None: nothing waits).
    pub fn group_due_in(&self) -> Option<Duration> {
        self.oldest_done
            .map(|t| self.grouping.age.saturating_sub(t.elapsed()))
    }

    /// Records the results waiting, a group's worth at most.
    pub fn flush(&mut self, source: &mut S) -> Flow {
        if self.done.is_empty() {
            return Flow::Continue;
        }
        let n = self.done.len().min(self.grouping.size);
        let group: Vec<_> = self.done.drain(..n).collect();
        // What is left over waited as long as the group: due at once.
        self.oldest_done = if self.done.is_empty() {
            None
        } else {
            self.oldest_done
        };
        self.groups += 1;
        let flow = source.record(group);
        if let Flow::Stop(reason) = flow {
            self.stop(reason);
        }
        flow
    }

    /// Gives up on every call in flight (their answers are dropped when they come) and records
    /// them without an answer, together with the results waiting.
    pub fn abandon(&mut self, source: &mut S) {
        self.pool.abandon();
        let rows: Vec<(S::Row, Option<S::Answer>)> =
            self.rows.drain().map(|(_, row)| (row, None)).collect();
        self.done.extend(rows);
        while !self.done.is_empty() {
            self.flush(source);
        }
    }
}

/// Runs a pipeline until nothing more is due and every call is recorded, or `deadline` (calls
/// still in flight then are recorded without an answer). `on_wait` runs between waits (the SQL
/// functions check for cancel there). Returns why it stopped: `drained`, `time_budget`, or the
/// reason a group gave.
pub fn run_to_end<S: Source>(
    pipe: &mut Pipeline<S>,
    source: &mut S,
    deadline: Instant,
    mut on_wait: impl FnMut(),
) -> &'static str {
    loop {
        if Instant::now() >= deadline {
            pipe.stop("time_budget");
            pipe.abandon(source);
            return pipe.stopped().unwrap_or("time_budget");
        }
        pipe.fill(source);
        if pipe.finished() {
            return pipe.stopped().unwrap_or("drained");
        }
        if pipe.idle() {
            continue;
        }
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(WAIT_SLICE);
        if pipe.gather(slice) == 0 {
            on_wait();
        }
        if pipe.group_due() {
            pipe.flush(source);
        }
    }
}

/// One of two sources' values.
pub enum Either<A, B> {
    First(A),
    Second(B),
}

/// Two sources sharing one pipeline, and so one bound on calls in flight: the first is claimed
/// from before the second (the background worker puts sign-ups before QR refreshes, so a
/// sign-up never waits behind a sweep of refreshes for a free slot longer than one call).
pub struct Both<A, B> {
    pub first: A,
    pub second: B,
}

impl<A: Source, B: Source> Both<A, B> {
    /// What the pool runs: each call by its own source's work.
    #[allow(clippy::type_complexity)]
    pub fn work(
        first: impl Fn(A::Call) -> A::Answer + Send + Sync + 'static,
        second: impl Fn(B::Call) -> B::Answer + Send + Sync + 'static,
    ) -> impl Fn(Either<A::Call, B::Call>) -> Either<A::Answer, B::Answer> + Send + Sync + 'static
    {
        move |call| match call {
            Either::First(c) => Either::First(first(c)),
            Either::Second(c) => Either::Second(second(c)),
        }
    }
}

type Done<S> = (<S as Source>::Row, Option<<S as Source>::Answer>);

impl<A: Source, B: Source> Source for Both<A, B> {
    type Row = Either<A::Row, B::Row>;
    type Call = Either<A::Call, B::Call>;
    type Answer = Either<A::Answer, B::Answer>;

    fn claim(&mut self, room: usize, busy: &[&Self::Row]) -> Vec<(Self::Row, Self::Call)> {
        let (mut busy_a, mut busy_b) = (Vec::new(), Vec::new());
        for row in busy {
            match row {
                Either::First(r) => busy_a.push(r),
                Either::Second(r) => busy_b.push(r),
            }
        }
        let mut claimed: Vec<(Self::Row, Self::Call)> = self
            .first
            .claim(room, &busy_a)
            .into_iter()
            .map(|(r, c)| (Either::First(r), Either::First(c)))
            .collect();
        let left = room - claimed.len().min(room);
        if left > 0 {
            claimed.extend(
                self.second
                    .claim(left, &busy_b)
                    .into_iter()
                    .map(|(r, c)| (Either::Second(r), Either::Second(c))),
            );
        }
        claimed
    }

    fn record(&mut self, done: Vec<(Self::Row, Option<Self::Answer>)>) -> Flow {
        let (mut a, mut b): (Vec<Done<A>>, Vec<Done<B>>) = (Vec::new(), Vec::new());
        for (row, answer) in done {
            match (row, answer) {
                (Either::First(r), Some(Either::First(x))) => a.push((r, Some(x))),
                (Either::First(r), _) => a.push((r, None)),
                (Either::Second(r), Some(Either::Second(x))) => b.push((r, Some(x))),
                (Either::Second(r), _) => b.push((r, None)),
            }
        }
        let mut flow = Flow::Continue;
        if !a.is_empty() {
            flow = self.first.record(a);
        }
        if !b.is_empty() {
            if let Flow::Stop(why) = self.second.record(b) {
                flow = Flow::Stop(why);
            }
        }
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A queue of rows `0..n`; the call of row i sleeps `ms(i)` and returns i.
    struct Rows {
        due: VecDeque<u64>,
        recorded: Vec<(u64, Option<u64>)>,
        groups: Vec<usize>,
        stop_after_groups: Option<usize>,
        claims: Vec<usize>,
    }

    impl Rows {
        fn new(n: u64) -> Rows {
            Rows {
                due: (0..n).collect(),
                recorded: Vec::new(),
                groups: Vec::new(),
                stop_after_groups: None,
                claims: Vec::new(),
            }
        }
    }

    impl Source for Rows {
        type Row = u64;
        type Call = u64;
        type Answer = u64;

        fn claim(&mut self, room: usize, busy: &[&u64]) -> Vec<(u64, u64)> {
            self.claims.push(room);
            assert!(busy.len() + room <= 64, "busy rows are reported");
            (0..room)
                .map_while(|_| self.due.pop_front())
                .map(|i| (i, i))
                .collect()
        }

        fn record(&mut self, done: Vec<(u64, Option<u64>)>) -> Flow {
            self.groups.push(done.len());
            self.recorded.extend(done);
            match self.stop_after_groups {
                Some(n) if self.groups.len() >= n => Flow::Stop("enough"),
                _ => Flow::Continue,
            }
        }
    }

    fn pipeline(
        concurrency: usize,
        grouping: Grouping,
        ms: impl Fn(u64) -> u64 + Send + Sync + 'static,
    ) -> Pipeline<Rows> {
        let pool = Pool::new(concurrency, move |i: u64| {
            std::thread::sleep(Duration::from_millis(ms(i)));
            i
        });
        Pipeline::new(pool, grouping)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn every_row_is_recorded_once_with_its_answer() {
        let mut rows = Rows::new(100);
        let grouping = Grouping {
            size: 7,
            age: Duration::from_millis(5),
        };
        let mut pipe = pipeline(8, grouping, |i| i % 3);
        assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "drained");
        let mut seen: Vec<u64> = rows.recorded.iter().map(|(r, _)| *r).collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(rows.recorded.iter().all(|(r, a)| Some(*r) == *a));
        assert!(rows.groups.iter().all(|&g| g <= 7));
        assert_eq!(pipe.claimed, 100);
    }

    /// The batch barrier is gone: with one call in ten slow, the slow ones overlap the fast
    /// ones instead of holding up a whole batch. 40 rows at concurrency 4, every 10th taking
    /// 300 ms and the rest 10 ms: ideal ≈ (4×300 + 36×10) / 4 = 390 ms; batches of 4 would take
    /// 4 × 300 + 6 × 10 = 1260 ms.
    #[test]
    fn a_slow_call_does_not_hold_up_the_others() {
        let mut rows = Rows::new(40);
        let grouping = Grouping {
            size: 4,
            age: Duration::from_millis(1),
        };
        let mut pipe = pipeline(4, grouping, |i| if i % 10 == 0 { 300 } else { 10 });
        let started = Instant::now();
        run_to_end(&mut pipe, &mut rows, far(), || {});
        let took = started.elapsed();
        assert_eq!(rows.recorded.len(), 40);
        assert!(
            took < Duration::from_millis(1000),
            "took {took:?}: calls waited for each other"
        );
    }

    #[test]
    fn never_more_in_flight_than_the_concurrency() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        let pool = Pool::new(5, move |i: u64| {
            let now = l.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            l.fetch_sub(1, Ordering::SeqCst);
            i
        });
        let grouping = Grouping {
            size: 3,
            age: Duration::from_millis(1),
        };
        let mut pipe = Pipeline::new(pool, grouping);
        let mut rows = Rows::new(60);
        run_to_end(&mut pipe, &mut rows, far(), || {});
        assert_eq!(rows.recorded.len(), 60);
        assert!(peak.load(Ordering::SeqCst) <= 5);
        assert!(rows.claims.iter().all(|&room| room <= 5));
    }

    #[test]
    fn a_stop_ends_the_claims_but_every_claimed_row_is_recorded() {
        let mut rows = Rows::new(100);
        rows.stop_after_groups = Some(1);
        let grouping = Grouping {
            size: 2,
            age: Duration::from_millis(1),
        };
        let mut pipe = pipeline(4, grouping, |_| 5);
        assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "enough");
        assert!(rows.recorded.len() < 100);
        assert_eq!(rows.recorded.len() as u64, pipe.claimed);
    }

    #[test]
    fn at_the_deadline_calls_in_flight_are_recorded_without_an_answer() {
        let mut rows = Rows::new(3);
        let grouping = Grouping {
            size: 10,
            age: Duration::from_secs(10),
        };
        let mut pipe = pipeline(3, grouping, |i| if i == 1 { 5_000 } else { 1 });
        let started = Instant::now();
        let why = run_to_end(
            &mut pipe,
            &mut rows,
            Instant::now() + Duration::from_millis(200),
            || {},
        );
        assert_eq!(why, "time_budget");
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut recorded = rows.recorded.clone();
        recorded.sort();
        assert_eq!(recorded, vec![(0, Some(0)), (1, None), (2, Some(2))]);
    }

    #[test]
    fn a_group_is_recorded_by_age_while_other_calls_are_still_in_flight() {
        let mut rows = Rows::new(2);
        let grouping = Grouping {
            size: 100,
            age: Duration::from_millis(20),
        };
        let mut pipe = pipeline(2, grouping, |i| if i == 0 { 1 } else { 400 });
        pipe.fill(&mut rows);
        let started = Instant::now();
        while !pipe.group_due() {
            pipe.gather(Duration::from_millis(5));
            assert!(
                started.elapsed() < Duration::from_millis(300),
                "not due by age"
            );
        }
        pipe.flush(&mut rows);
        assert_eq!(rows.recorded, vec![(0, Some(0))]);
        assert_eq!(pipe.in_flight(), 1);
    }

    #[test]
    fn two_sources_share_the_slots_and_the_first_is_claimed_first() {
        let mut both = Both {
            first: Rows::new(3),
            second: Rows::new(50),
        };
        let work = Both::<Rows, Rows>::work(|i| i, |i| i + 1000);
        let mut pipe = Pipeline::new(
            Pool::new(4, work),
            Grouping {
                size: 4,
                age: Duration::from_millis(1),
            },
        );
        assert_eq!(pipe.fill(&mut both), 4);
        // The first source's 3 rows took 3 of the 4 slots.
        assert_eq!(both.first.claims, vec![4]);
        assert_eq!(both.second.claims, vec![1]);
        run_to_end(&mut pipe, &mut both, far(), || {});
        assert_eq!(both.first.recorded.len(), 3);
        assert_eq!(both.second.recorded.len(), 50);
        assert!(both
            .second
            .recorded
            .iter()
            .all(|(r, a)| *a == Some(r + 1000)));
    }
}
