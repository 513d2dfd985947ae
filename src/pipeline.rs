//! The one pipeline every job runs: claim → calls in flight → record, streaming. Pure logic, no
//! pgrx: what touches Postgres (claiming rows, writing results) is the `Source`'s business, and
//! the HTTP calls run on the `Pool`'s threads.
//!
//! Up to the pool's concurrency calls are in flight at all times: as one finishes, its result is
//! kept for the next group and a replacement is launched. No call waits for another. 0.1.0 ran
//! batches, and a batch waits for its slowest call: with one call in ten taking 2.5 s, a run
//! used half of what its concurrency allowed.
//!
//! Claims run ahead of the calls (`Pipeline::claiming_ahead`): up to `ahead` claimed rows wait
//! in the pipeline for the next free slot, and a claim is made when that reserve is half used.
//! With calls finishing one at a time (any latency above zero), 0.5.0 made a claim per finished
//! call, a statement (in the worker, a transaction) per row; that was most of a run's CPU at
//! 50 ms. A reserve of `ahead` rows makes one claim per `ahead / 2` calls. Rows in the reserve
//! were never called: at a stop they are given back untouched (`Source::release`).
//!
//! Results are recorded in groups, by count (`Grouping::size`) or by age (`Grouping::age`), so a
//! row's outcome is written soon after its call and the background worker, which commits after
//! every group, shows progress as it happens. The SQL functions drive the same pipeline inside
//! their one transaction (`run_to_end`).

use crate::pool::{Pool, WAIT_SLICE};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
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

    /// Claims up to `room` due rows, each with its call, and up to `ahead` more if the source
    /// claims ahead: those wait in the pipeline for a free slot, so a source takes them only if
    /// it can give them back untouched ([`Source::release`]) and its claim's lease outlasts the
    /// wait (about one call). `busy` are the rows claimed and not yet recorded (in flight, in
    /// the reserve, or waiting for their group), which a claim inside the same transaction
    /// would otherwise see as still due.
    fn claim(&mut self, room: usize, ahead: usize, busy: &[&Self::Row]) -> Claimed<Self>;

    /// Writes a group of finished rows. None: no answer (the call panicked, or was abandoned at
    /// the deadline or at shutdown).
    fn record(&mut self, done: Vec<(Self::Row, Option<Self::Answer>)>) -> Flow;

    /// Gives back rows that were claimed and never called (the reserve, at a stop), as they were
    /// before the claim: no attempt charged.
    fn release(&mut self, rows: Vec<Self::Row>);
}

/// What a claim took, and whether that was all that is due now.
pub struct Claimed<S: Source + ?Sized> {
    pub rows: Vec<(S::Row, S::Call)>,
    /// Fewer rows were due than asked for: claiming again finds nothing until rows are
    /// recorded or new ones announced.
    pub drained: bool,
    /// The source that fills the reserve had fewer than asked: topping the reserve up finds
    /// nothing until new rows are announced.
    pub ahead_drained: bool,
    /// No call may leave any more (the settings were replaced): the reserve goes back
    /// uncalled, and nothing more is claimed; calls in flight are still recorded.
    pub hold: bool,
}

impl<S: Source + ?Sized> Claimed<S> {
    /// `rows` of the `asked` a claim asked for (drained when fewer came).
    pub fn of(rows: Vec<(S::Row, S::Call)>, asked: usize) -> Claimed<S> {
        let drained = rows.len() < asked;
        Claimed {
            rows,
            drained,
            ahead_drained: drained,
            hold: false,
        }
    }

    /// Nothing, and no call may leave any more: see `hold`.
    pub fn hold() -> Claimed<S> {
        Claimed {
            rows: Vec::new(),
            drained: true,
            ahead_drained: true,
            hold: true,
        }
    }
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
    /// Rows in flight, by their pool key.
    rows: HashMap<u64, S::Row>,
    /// Rows claimed ahead, waiting for a free slot (oldest first), with when they were claimed.
    reserve: VecDeque<(S::Row, S::Call, Instant)>,
    /// How many claimed rows the reserve may hold (0: a claim takes free slots only).
    ahead: usize,
    /// A reserved row that waited this long is given back instead of called (None: it waits).
    max_wait: Option<Duration>,
    /// The last claim found fewer rows than asked for the reserve.
    reserve_dry: bool,
    /// A claim for free slots waits until at least this many are free.
    min_free: usize,
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
            reserve: VecDeque::new(),
            ahead: 0,
            max_wait: None,
            reserve_dry: false,
            min_free: 1,
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

    /// Lets claims take up to `ahead` rows beyond the free slots (capped by the group size),
    /// to wait in the pipeline's reserve; for sources whose claims hold their rows under a lease
    /// and can give them back (see the module's comment).
    pub fn claiming_ahead(mut self, ahead: usize) -> Pipeline<S> {
        self.ahead = ahead.min(self.grouping.size);
        self
    }

    /// Gives reserved rows back uncalled once they have waited `max_wait`, instead of calling
    /// them: for a source whose claims are leases that others may take once they run out (the
    /// background worker commits its claims). Without it a row's wait is bounded only by the
    /// calls ahead of it, and slow calls could make it outwait its lease; with it, the reserve
    /// may be larger than one call's worth of waiting.
    pub fn reserving_for_at_most(mut self, max_wait: Duration) -> Pipeline<S> {
        self.max_wait = Some(max_wait);
        self
    }

    /// A reserved row taken at `since` has waited its longest: the next claim gives it back.
    fn waited_longest(&self, since: Instant) -> bool {
        self.max_wait.is_some_and(|max| since.elapsed() >= max)
    }

    /// How many reserved rows have waited their longest: the front ones, as the reserve is in
    /// claim order (the count stops at the first row still fresh).
    fn stale_reserved(&self) -> usize {
        self.reserve
            .iter()
            .take_while(|(_, _, since)| self.waited_longest(*since))
            .count()
    }

    /// The oldest reserved row has waited its longest (only the front needs looking at).
    fn reserve_stale(&self) -> bool {
        self.reserve
            .front()
            .is_some_and(|(_, _, since)| self.waited_longest(*since))
    }

    /// Claims for free slots wait until `n` are free (at most the concurrency), instead of
    /// one claim per finished call: for a source whose claim costs the same for one row as for
    /// many (the QR refresh sorts every due instance to pick its rows).
    pub fn claiming_at_least(mut self, n: usize) -> Pipeline<S> {
        self.min_free = n.clamp(1, self.pool.concurrency());
        self
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.rows.len()
    }

    /// Claimed rows waiting in the reserve for a free slot.
    pub fn reserved(&self) -> usize {
        self.reserve.len()
    }

    /// Nothing in flight, in the reserve or waiting to be recorded.
    pub fn idle(&self) -> bool {
        self.rows.is_empty() && self.reserve.is_empty() && self.done.is_empty()
    }

    /// Why a group stopped the claims, if one did.
    pub fn stopped(&self) -> Option<&'static str> {
        self.stopped
    }

    /// Claims again from now on: new rows were announced since the last claim found nothing.
    /// (A stop stays a stop.)
    pub fn rearm(&mut self) {
        self.drained = false;
        self.reserve_dry = false;
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

    /// What a claim now would ask for: (rows for the slots the reserve cannot fill, rows to
    /// keep in the reserve), both zero when no claim is due. A claim is due when `min_free`
    /// slots would stay empty, or when the reserve is down to half (and its source was not
    /// found dry since the last rearm).
    fn wanted(&self) -> (usize, usize) {
        if self.drained || self.stopped.is_some() {
            return (0, 0);
        }
        let room = self.pool.room();
        let launchable = room.min(self.reserve.len());
        let (free, left) = (room - launchable, self.reserve.len() - launchable);
        let fill = free > 0 && free >= self.min_free;
        let top_up = self.ahead > 0 && !self.reserve_dry && left <= self.ahead / 2;
        if !fill && !top_up {
            return (0, 0);
        }
        // A claim takes at most a group's worth of rows (evoq.batch_size for the jobs).
        let now = if fill {
            free.min(self.grouping.size)
        } else {
            0
        };
        let ahead = self
            .ahead
            .saturating_sub(left)
            .min(self.grouping.size - now);
        (now, ahead)
    }

    /// Whether [`Pipeline::claim`] has work now: rows to claim, or reserved rows to give back
    /// after a stop.
    pub fn wants_rows(&self) -> bool {
        let (now, ahead) = self.wanted();
        now + ahead > 0
            || (self.stopped.is_some() && !self.reserve.is_empty())
            || self.reserve_stale()
    }

    /// Claims what is due ([`Pipeline::claim`]) and launches what fits ([`Pipeline::launch`]).
    /// Returns how many calls it launched.
    pub fn fill(&mut self, source: &mut S) -> usize {
        self.claim(source);
        self.launch()
    }

    /// Claims rows for the free slots and the reserve, without calling yet: the background
    /// worker commits its claims first, so no call leaves for a claim that could still roll
    /// back. After a stop, gives the reserve back instead. Reserved rows that waited their
    /// longest (`reserving_for_at_most`) are given back first, and are due again for this claim
    /// like any others. Returns how many rows it claimed.
    pub fn claim(&mut self, source: &mut S) -> usize {
        if self.stopped.is_some() {
            self.release_reserve(source);
            return 0;
        }
        let stale = self.stale_reserved();
        if stale > 0 {
            let rows = self.reserve.drain(..stale).map(|(row, _, _)| row).collect();
            source.release(rows);
            self.drained = false;
            self.reserve_dry = false;
        }
        let (now, ahead) = self.wanted();
        if now + ahead == 0 {
            return 0;
        }
        let busy: Vec<&S::Row> = self
            .rows
            .values()
            .chain(self.reserve.iter().map(|(r, _, _)| r))
            .chain(self.done.iter().map(|(r, _)| r))
            .collect();
        let claimed = source.claim(now, ahead, &busy);
        if claimed.hold {
            self.drained = true;
            self.reserve_dry = true;
            self.last_claim = 0;
            self.release_reserve(source);
            return 0;
        }
        let n = claimed.rows.len();
        self.drained = claimed.drained;
        self.reserve_dry = claimed.ahead_drained;
        self.last_claim = n;
        self.claimed += n as u64;
        let at = Instant::now();
        self.reserve
            .extend(claimed.rows.into_iter().map(|(row, call)| (row, call, at)));
        n
    }

    /// Hands reserved rows' calls to the pool, as many as there are free slots; returns how
    /// many. After a stop nothing leaves: the reserve is the source's to take back. Nor does a
    /// row that waited its longest: the next claim gives it back (`wants_rows` says so).
    pub fn launch(&mut self) -> usize {
        if self.stopped.is_some() || self.reserve_stale() {
            return 0;
        }
        let n = self.pool.room().min(self.reserve.len());
        for (row, call, _) in self.reserve.drain(..n) {
            let key = self.next_key;
            self.next_key += 1;
            self.rows.insert(key, row);
            self.pool.submit(key, call);
        }
        n
    }

    /// Gives the reserve back to the source (its rows were never called).
    fn release_reserve(&mut self, source: &mut S) {
        if !self.reserve.is_empty() {
            let rows = self.reserve.drain(..).map(|(row, _, _)| row).collect();
            source.release(rows);
        }
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
            self.release_reserve(source);
        }
        flow
    }

    /// Gives up on every call in flight (their answers are dropped when they come) and records
    /// them without an answer, together with the results waiting; gives the reserve back.
    pub fn abandon(&mut self, source: &mut S) {
        self.release_reserve(source);
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

/// 0.7.0: wakes a thread that drives several pipelines (`run_lanes_to_end`) when any of their
/// pools has a result: each pool is built `with_notify(waker.notify())`.
#[derive(Clone, Default)]
pub struct Waker(Arc<(Mutex<bool>, Condvar)>);

impl Waker {
    /// What a pool calls when a result is there.
    pub fn notify(&self) -> Arc<dyn Fn() + Send + Sync> {
        let inner = self.0.clone();
        Arc::new(move || {
            let (flag, cv) = &*inner;
            *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_one();
        })
    }

    /// Waits up to `limit` for a result signalled since the last wait.
    fn wait(&self, limit: Duration) {
        let (flag, cv) = &*self.0;
        let guard = flag.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = cv
            .wait_timeout_while(guard, limit, |signalled| !*signalled)
            .unwrap_or_else(|e| e.into_inner());
        *guard = false;
    }
}

/// Runs several pipelines side by side (0.7.0: one per Evolution server, each with its own
/// pool, so a slow server fills only its own slots) until each is finished, or `deadline`: what
/// `run_to_end` does for one, without any of them waiting on another's calls. A lane that found
/// nothing to claim is asked again whenever a lane records a group: one server's results may
/// make work for another (its room filled, an unplaced row is now another's to place, rows it
/// claimed ahead are given back when its circuit opens). Returns why each stopped, in order.
pub fn run_lanes_to_end<S: Source>(
    lanes: &mut [(Pipeline<S>, S)],
    deadline: Instant,
    waker: &Waker,
    mut on_wait: impl FnMut(),
) -> Vec<&'static str> {
    let mut why: Vec<Option<&'static str>> = vec![None; lanes.len()];
    // drained for now, asked again after another lane's next group
    let mut parked = vec![false; lanes.len()];
    loop {
        let mut moved = false;
        let mut recorded = false;
        for (((pipe, source), why), parked) in
            lanes.iter_mut().zip(why.iter_mut()).zip(parked.iter_mut())
        {
            if why.is_some() || *parked {
                continue;
            }
            if Instant::now() >= deadline {
                pipe.stop("time_budget");
                pipe.abandon(source);
                *why = Some(pipe.stopped().unwrap_or("time_budget"));
                continue;
            }
            if pipe.fill(source) > 0 {
                moved = true;
            }
            if pipe.finished() {
                match pipe.stopped() {
                    Some(reason) => *why = Some(reason),
                    None => *parked = true,
                }
                continue;
            }
            if pipe.idle() {
                moved = true; // (as run_to_end: claim again at once)
                continue;
            }
            if pipe.gather(Duration::ZERO) > 0 {
                moved = true;
            }
            if pipe.group_due() {
                pipe.flush(source);
                moved = true;
                recorded = true;
            }
        }
        let working = |why: &[Option<&'static str>], parked: &[bool]| {
            why.iter().zip(parked).any(|(w, p)| w.is_none() && !p)
        };
        // A group may have given rows back (a circuit that opened releases the rows its lane
        // had claimed ahead, unplaced) or made others due: every lane whose last claim found
        // nothing claims again, those still waiting on their own calls included (their next
        // claim would otherwise never come), and even when the lane that recorded was the last
        // at work. A rearmed lane that finds nothing parks again; without a new group the run
        // ends.
        if recorded {
            for (((pipe, _), parked), why) in lanes.iter_mut().zip(parked.iter_mut()).zip(&why) {
                if why.is_none() && (*parked || pipe.drained) {
                    *parked = false;
                    pipe.rearm();
                }
            }
        }
        if !working(&why, &parked) {
            return why.into_iter().map(|w| w.unwrap_or("drained")).collect();
        }
        if !moved {
            // Each lane's oldest waiting result is recorded within its group's age.
            let slice = lanes
                .iter()
                .zip(&why)
                .filter(|(_, w)| w.is_none())
                .filter_map(|((pipe, _), _)| pipe.group_due_in())
                .fold(WAIT_SLICE, Duration::min)
                .min(deadline.saturating_duration_since(Instant::now()));
            waker.wait(slice);
        }
        // (every turn: a busy run still honours a cancel at once)
        on_wait();
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

    /// The first source is asked for the free slots and the reserve; the second only for the
    /// slots the first left free, so the reserve only ever holds the first source's rows (a
    /// source that cannot give rows back, like the QR refresh, is the second).
    fn claim(&mut self, room: usize, ahead: usize, busy: &[&Self::Row]) -> Claimed<Self> {
        let (mut busy_a, mut busy_b) = (Vec::new(), Vec::new());
        for row in busy {
            match row {
                Either::First(r) => busy_a.push(r),
                Either::Second(r) => busy_b.push(r),
            }
        }
        let first = self.first.claim(room, ahead, &busy_a);
        let mut rows: Vec<(Self::Row, Self::Call)> = first
            .rows
            .into_iter()
            .map(|(r, c)| (Either::First(r), Either::First(c)))
            .collect();
        let left = room - rows.len().min(room);
        // Unasked, the second may have more due: not drained.
        let (mut second_drained, mut second_hold) = (false, false);
        if left > 0 && !first.hold {
            let second = self.second.claim(left, 0, &busy_b);
            second_drained = second.drained;
            second_hold = second.hold;
            rows.extend(
                second
                    .rows
                    .into_iter()
                    .map(|(r, c)| (Either::Second(r), Either::Second(c))),
            );
        }
        Claimed {
            rows,
            drained: first.drained && second_drained,
            ahead_drained: first.drained,
            hold: first.hold || second_hold,
        }
    }

    fn release(&mut self, rows: Vec<Self::Row>) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for row in rows {
            match row {
                Either::First(r) => a.push(r),
                Either::Second(r) => b.push(r),
            }
        }
        if !a.is_empty() {
            self.first.release(a);
        }
        if !b.is_empty() {
            self.second.release(b);
        }
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
        /// The `room` of each claim.
        claims: Vec<usize>,
        /// The `ahead` of each claim.
        aheads: Vec<usize>,
        /// Whether it takes rows ahead.
        takes_ahead: bool,
        released: Vec<u64>,
        /// From this claim on (counted from 1), it holds: nothing may be called any more.
        hold_from: Option<usize>,
    }

    impl Rows {
        fn new(n: u64) -> Rows {
            Rows {
                due: (0..n).collect(),
                recorded: Vec::new(),
                groups: Vec::new(),
                stop_after_groups: None,
                claims: Vec::new(),
                aheads: Vec::new(),
                takes_ahead: true,
                released: Vec::new(),
                hold_from: None,
            }
        }
    }

    impl Source for Rows {
        type Row = u64;
        type Call = u64;
        type Answer = u64;

        fn claim(&mut self, room: usize, ahead: usize, busy: &[&u64]) -> Claimed<Self> {
            self.claims.push(room);
            self.aheads.push(ahead);
            if self.hold_from.is_some_and(|n| self.claims.len() >= n) {
                return Claimed::hold();
            }
            assert!(busy.len() + room <= 64, "busy rows are reported");
            let asked = room + if self.takes_ahead { ahead } else { 0 };
            let rows = (0..asked)
                .map_while(|_| self.due.pop_front())
                .map(|i| (i, i))
                .collect();
            Claimed::of(rows, asked)
        }

        fn release(&mut self, rows: Vec<u64>) {
            for &row in rows.iter().rev() {
                self.due.push_front(row);
            }
            self.released.extend(rows);
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

    /// 0.7.0: two servers' pipelines side by side. The fast one (2 ms a call) is done long
    /// before the slow one (each call 400 ms) and is never held up by it: run one after the
    /// other, or waiting on the slow pool, its 40 rows would come after the slow one's 800 ms.
    #[test]
    fn a_slow_lane_does_not_hold_up_a_fast_one() {
        let waker = Waker::default();
        let grouping = Grouping {
            size: 4,
            age: Duration::from_millis(5),
        };
        let lane = |ms: u64| {
            let pool = Pool::new(2, move |i: u64| {
                std::thread::sleep(Duration::from_millis(ms));
                i
            })
            .with_notify(waker.notify());
            Pipeline::new(pool, grouping)
        };
        let started = Instant::now();
        let fast_done = Arc::new(Mutex::new(None));
        struct Timed(Rows, Arc<Mutex<Option<Duration>>>, Instant);
        impl Source for Timed {
            type Row = u64;
            type Call = u64;
            type Answer = u64;
            fn claim(&mut self, room: usize, ahead: usize, busy: &[&u64]) -> Claimed<Self> {
                let c = self.0.claim(room, ahead, busy);
                Claimed {
                    rows: c.rows,
                    drained: c.drained,
                    ahead_drained: c.ahead_drained,
                    hold: c.hold,
                }
            }
            fn record(&mut self, done: Vec<(u64, Option<u64>)>) -> Flow {
                let flow = self.0.record(done);
                if self.0.due.is_empty() {
                    *self.1.lock().unwrap() = Some(self.2.elapsed());
                }
                flow
            }
            fn release(&mut self, rows: Vec<u64>) {
                self.0.release(rows)
            }
        }
        let mut lanes = vec![
            (
                lane(400),
                Timed(Rows::new(4), Arc::new(Mutex::new(None)), started),
            ),
            (lane(2), Timed(Rows::new(40), fast_done.clone(), started)),
        ];
        let why = run_lanes_to_end(&mut lanes, far(), &waker, || {});
        assert_eq!(why, vec!["drained", "drained"]);
        assert_eq!(lanes[0].1 .0.recorded.len(), 4);
        assert_eq!(lanes[1].1 .0.recorded.len(), 40);
        let fast = fast_done
            .lock()
            .unwrap()
            .expect("the fast lane recorded its rows");
        assert!(
            fast < Duration::from_millis(400),
            "the fast lane finished after {fast:?}: it waited on the slow one"
        );
        assert!(started.elapsed() >= Duration::from_millis(800));
    }

    /// Rows one lane gives back (its circuit opened and it releases what it claimed ahead)
    /// while another lane's last claim found nothing but its own calls are still out: that
    /// lane claims them in the same run. Lane B takes rows 0-3 (0 and 1 answer in 20 ms, 2 and
    /// 3 in 300 ms) and claims again at 20 ms: nothing, lane A holds the rest. A's one call
    /// (row 4, 100 ms) stops it, and it gives rows 5-11 back while B still waits on 2 and 3.
    /// (Only parked lanes were asked again: B parked at 300 ms without another claim, and
    /// rows 5-11 were left for the next run.)
    #[test]
    fn rows_given_back_by_one_lane_are_taken_by_another_still_at_work() {
        struct Shared {
            queue: Arc<Mutex<VecDeque<u64>>>,
            recorded: Vec<u64>,
            stop_at_first_group: bool,
        }
        impl Source for Shared {
            type Row = u64;
            type Call = u64;
            type Answer = u64;
            fn claim(&mut self, room: usize, ahead: usize, _busy: &[&u64]) -> Claimed<Self> {
                let mut queue = self.queue.lock().unwrap();
                let rows = (0..room + ahead)
                    .map_while(|_| queue.pop_front())
                    .map(|i| (i, i))
                    .collect();
                Claimed::of(rows, room + ahead)
            }
            fn release(&mut self, rows: Vec<u64>) {
                let mut queue = self.queue.lock().unwrap();
                for &row in rows.iter().rev() {
                    queue.push_front(row);
                }
            }
            fn record(&mut self, done: Vec<(u64, Option<u64>)>) -> Flow {
                self.recorded.extend(done.iter().map(|(r, _)| *r));
                if self.stop_at_first_group {
                    Flow::Stop("circuit_open")
                } else {
                    Flow::Continue
                }
            }
        }
        let waker = Waker::default();
        let queue = Arc::new(Mutex::new((0..12).collect::<VecDeque<u64>>()));
        let ms = |i: u64| match i {
            0 | 1 => 20,
            2 | 3 => 300,
            4 => 100,
            _ => 1,
        };
        let lane = |concurrency: usize, ahead: usize| {
            let pool = Pool::new(concurrency, move |i: u64| {
                std::thread::sleep(Duration::from_millis(ms(i)));
                i
            })
            .with_notify(waker.notify());
            let grouping = Grouping {
                size: 8,
                age: Duration::from_millis(1),
            };
            Pipeline::new(pool, grouping).claiming_ahead(ahead)
        };
        let source = |stop_at_first_group| Shared {
            queue: queue.clone(),
            recorded: Vec::new(),
            stop_at_first_group,
        };
        let mut lanes = vec![(lane(2, 2), source(false)), (lane(1, 8), source(true))];
        let why = run_lanes_to_end(&mut lanes, far(), &waker, || {});
        assert_eq!(why, vec!["drained", "circuit_open"]);
        assert_eq!(lanes[1].1.recorded, vec![4]);
        let mut b = lanes[0].1.recorded.clone();
        b.sort();
        assert_eq!(
            b,
            vec![0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11],
            "every row given back is taken"
        );
        assert!(queue.lock().unwrap().is_empty());
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
    fn a_result_is_due_at_once_when_nothing_else_is_in_flight_however_long_the_age() {
        // The worker's groups are committed every evoq.worker_commit_ms under load; a lone
        // sign-up must not wait for that.
        let mut rows = Rows::new(2);
        let grouping = Grouping {
            size: 100,
            age: Duration::from_secs(3600),
        };
        let mut pipe = pipeline(2, grouping, |i| if i == 0 { 1 } else { 150 });
        pipe.fill(&mut rows);
        let started = Instant::now();
        while pipe.in_flight() == 2 {
            pipe.gather(Duration::from_millis(5));
        }
        // The first answered, the second is in flight: the first waits for its group.
        assert!(!pipe.group_due());
        while pipe.in_flight() > 0 {
            pipe.gather(Duration::from_millis(5));
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        assert!(pipe.group_due(), "nothing in flight: due at once");
        pipe.flush(&mut rows);
        assert_eq!(rows.recorded.len(), 2);
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

    /// Calls finishing one at a time (staggered latencies), as at any latency above zero: with
    /// no reserve, nearly every finished call makes a claim of one row; a reserve of 8 makes a
    /// claim per 4 calls at most, and every row is still called and recorded once, with or
    /// without one.
    #[test]
    fn a_reserve_makes_one_claim_per_several_calls() {
        let claims_with = |ahead: usize| {
            let mut rows = Rows::new(200);
            let grouping = Grouping {
                size: 50,
                age: Duration::from_millis(5),
            };
            let mut pipe = pipeline(8, grouping, |i| 1 + i % 7).claiming_ahead(ahead);
            assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "drained");
            let mut seen: Vec<u64> = rows.recorded.iter().map(|(r, _)| *r).collect();
            seen.sort();
            assert_eq!(seen, (0..200).collect::<Vec<_>>());
            assert!(rows.released.is_empty());
            assert_eq!(pipe.claimed, 200);
            rows.claims.len()
        };
        // Without a reserve the count depends on how the finishes bunch (about one claim per
        // call here, fewer on a loaded machine); with one, every claim but the last two takes
        // at least half the reserve.
        claims_with(0);
        let with = claims_with(8);
        assert!(with <= 200 / 4 + 2, "{with} claims with a reserve of 8");
    }

    #[test]
    fn with_a_reserve_never_more_in_flight_than_the_concurrency() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        let pool = Pool::new(3, move |i: u64| {
            let now = l.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1 + i % 3));
            l.fetch_sub(1, Ordering::SeqCst);
            i
        });
        let grouping = Grouping {
            size: 10,
            age: Duration::from_millis(1),
        };
        let mut pipe = Pipeline::new(pool, grouping).claiming_ahead(6);
        let mut rows = Rows::new(60);
        run_to_end(&mut pipe, &mut rows, far(), || {});
        assert_eq!(rows.recorded.len(), 60);
        assert!(peak.load(Ordering::SeqCst) <= 3);
        // The reserve is bounded too: a claim never asks beyond the slots plus the reserve.
        assert!(rows
            .claims
            .iter()
            .zip(&rows.aheads)
            .all(|(room, ahead)| room + ahead <= 3 + 6));
    }

    /// A reserved row never waits past `reserving_for_at_most`: it is given back and
    /// claimed again, and called once. Two slots, 40 ms a call, a reserve of 8 that may wait
    /// 30 ms: without the bound the last reserved rows wait 4 calls (160 ms).
    #[test]
    fn a_reserved_row_that_waited_its_longest_is_given_back_not_called() {
        struct Stamped(Rows);
        impl Source for Stamped {
            type Row = u64;
            /// The row, and when it was claimed.
            type Call = (u64, Instant);
            /// The row, and how long it waited between its claim and its call.
            type Answer = (u64, Duration);
            fn claim(&mut self, room: usize, ahead: usize, busy: &[&u64]) -> Claimed<Self> {
                let c = self.0.claim(room, ahead, busy);
                let at = Instant::now();
                Claimed {
                    rows: c.rows.into_iter().map(|(r, i)| (r, (i, at))).collect(),
                    drained: c.drained,
                    ahead_drained: c.ahead_drained,
                    hold: c.hold,
                }
            }
            fn record(&mut self, done: Vec<(u64, Option<(u64, Duration)>)>) -> Flow {
                let waits: Vec<Duration> =
                    done.iter().filter_map(|(_, a)| a.map(|a| a.1)).collect();
                let max = waits.into_iter().max().unwrap_or_default();
                assert!(
                    max < Duration::from_millis(30 + 25),
                    "a row waited {max:?} in the reserve"
                );
                self.0
                    .record(done.into_iter().map(|(r, a)| (r, a.map(|a| a.0))).collect())
            }
            fn release(&mut self, rows: Vec<u64>) {
                self.0.release(rows)
            }
        }
        let pool = Pool::new(2, |(i, claimed): (u64, Instant)| {
            let waited = claimed.elapsed();
            std::thread::sleep(Duration::from_millis(40));
            (i, waited)
        });
        let grouping = Grouping {
            size: 10,
            age: Duration::from_millis(1),
        };
        let mut pipe = Pipeline::new(pool, grouping)
            .claiming_ahead(8)
            .reserving_for_at_most(Duration::from_millis(30));
        let mut rows = Stamped(Rows::new(20));
        assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "drained");
        let mut seen: Vec<u64> = rows.0.recorded.iter().map(|(r, _)| *r).collect();
        seen.sort();
        assert_eq!(
            seen,
            (0..20).collect::<Vec<_>>(),
            "each row called and recorded once"
        );
        assert!(
            !rows.0.released.is_empty(),
            "rows that waited were given back"
        );
    }

    /// A stop (the circuit opened) gives the reserve back untouched: those rows are never
    /// called and never recorded, and every row called is recorded.
    #[test]
    fn a_stop_gives_the_reserve_back_uncalled() {
        let mut rows = Rows::new(100);
        rows.stop_after_groups = Some(1);
        // Each fill tops the reserve up to 2 (a claim takes at most a group, 4), so it holds
        // rows when the first group says stop.
        let grouping = Grouping {
            size: 4,
            age: Duration::from_millis(1),
        };
        let mut pipe = pipeline(2, grouping, |_| 5).claiming_ahead(2);
        assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "enough");
        assert!(!rows.released.is_empty(), "the reserve was given back");
        assert_eq!(pipe.reserved(), 0);
        let called = rows.recorded.len() + rows.released.len();
        assert_eq!(called as u64, pipe.claimed);
        // Released rows are due again, in their order, and none of them was recorded.
        assert_eq!(rows.due.front(), rows.released.first());
        assert!(rows
            .released
            .iter()
            .all(|r| rows.recorded.iter().all(|(d, _)| d != r)));
    }

    /// At the deadline, calls in flight are recorded without an answer, but reserved rows
    /// (never called) are given back, not recorded.
    #[test]
    fn at_the_deadline_the_reserve_is_given_back_not_recorded() {
        let mut rows = Rows::new(10);
        let grouping = Grouping {
            size: 10,
            age: Duration::from_secs(10),
        };
        let mut pipe = pipeline(1, grouping, |_| 5_000).claiming_ahead(4);
        let why = run_to_end(
            &mut pipe,
            &mut rows,
            Instant::now() + Duration::from_millis(100),
            || {},
        );
        assert_eq!(why, "time_budget");
        assert_eq!(rows.recorded, vec![(0, None)]);
        assert_eq!(rows.released, vec![1, 2, 3, 4]);
        assert_eq!(rows.due.len(), 9);
    }

    /// In `Both`, only the first source is asked for the reserve; the second gets the free
    /// slots the first left, so it never has rows waiting.
    #[test]
    fn two_sources_with_a_reserve_only_the_first_claims_ahead() {
        let mut both = Both {
            first: Rows::new(3),
            second: Rows::new(50),
        };
        both.second.takes_ahead = false;
        let work = Both::<Rows, Rows>::work(|i| i, |i| i + 1000);
        let mut pipe = Pipeline::new(
            Pool::new(4, work),
            Grouping {
                size: 8,
                age: Duration::from_millis(1),
            },
        )
        .claiming_ahead(4);
        assert_eq!(pipe.fill(&mut both), 4);
        assert_eq!((both.first.claims[0], both.first.aheads[0]), (4, 4));
        assert_eq!((both.second.claims[0], both.second.aheads[0]), (1, 0));
        assert_eq!(pipe.reserved(), 0);
        run_to_end(&mut pipe, &mut both, far(), || {});
        assert_eq!(both.first.recorded.len(), 3);
        assert_eq!(both.second.recorded.len(), 50);
        assert!(both.second.aheads.iter().all(|&a| a == 0));
    }

    /// With `claiming_at_least(4)`, a claim waits for 4 free slots instead of one per finished
    /// call, and every row is still called and recorded once.
    #[test]
    fn claims_for_free_slots_wait_for_the_minimum() {
        let mut rows = Rows::new(100);
        rows.takes_ahead = false;
        let grouping = Grouping {
            size: 50,
            age: Duration::from_millis(5),
        };
        let mut pipe = pipeline(8, grouping, |i| 1 + i % 5).claiming_at_least(4);
        assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "drained");
        let mut seen: Vec<u64> = rows.recorded.iter().map(|(r, _)| *r).collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(
            rows.claims.iter().all(|&room| room >= 4),
            "{:?}",
            rows.claims
        );
        assert!(rows.claims.len() <= 100 / 4 + 2, "{:?}", rows.claims);
    }

    /// A reserve whose source ran dry is not topped up again until a rearm (new rows were
    /// announced): no claim per finished call for a source with nothing due.
    #[test]
    fn a_dry_reserve_is_asked_again_only_after_a_rearm() {
        let mut rows = Rows::new(3);
        let grouping = Grouping {
            size: 50,
            age: Duration::from_millis(1),
        };
        let mut pipe = pipeline(4, grouping, |_| 1).claiming_ahead(4);
        pipe.fill(&mut rows);
        assert_eq!(rows.claims.len(), 1);
        // Drained: nothing more is asked while the three finish.
        while !pipe.idle() {
            pipe.gather(Duration::from_millis(5));
            pipe.claim(&mut rows);
            if pipe.group_due() {
                pipe.flush(&mut rows);
            }
        }
        assert_eq!(rows.claims.len(), 1);
        rows.due.extend([10, 11]);
        pipe.rearm();
        assert_eq!(pipe.fill(&mut rows), 2);
        assert_eq!(rows.claims.len(), 2);
    }

    /// The settings were replaced mid-run: the claim says hold, the reserve goes back uncalled
    /// at once (not called on the old server while the calls in flight finish), and every
    /// called row is still recorded.
    #[test]
    fn a_hold_gives_the_reserve_back_and_calls_nothing_more() {
        let mut rows = Rows::new(100);
        rows.hold_from = Some(3);
        let grouping = Grouping {
            size: 50,
            age: Duration::from_millis(1),
        };
        let mut pipe = pipeline(2, grouping, |_| 5).claiming_ahead(4);
        assert_eq!(run_to_end(&mut pipe, &mut rows, far(), || {}), "drained");
        assert!(!rows.released.is_empty(), "the reserve was given back");
        assert_eq!(pipe.reserved(), 0);
        let called = rows.recorded.len() + rows.released.len();
        assert_eq!(called as u64, pipe.claimed);
        assert_eq!(rows.claims.len(), 3, "nothing asked after the hold");
    }
}
