//! The worker's reconcile, every `evoq.reconcile_interval_ms`: the same steps as
//! `jobs::reconcile::reconcile_now`, but the main loop never waits on the server. The listing
//! and the calls after it run on a thread of their own (no Postgres there), and each step's SQL
//! is a transaction of the main loop's, between which deliveries keep being applied.

use crate::evolution::{ApiError, Client, ListedInstance};
use crate::jobs::reconcile::{apply, begin, due_in_ms, finish, settings_replaced};
use crate::jobs::run::{CircuitState, Run};
use crate::reconcile::{follow_up, FollowUps, Plan, Tally, FOLLOW_UP_THREADS};
use crate::settings::Connection;
use pgrx::datum::TimestampWithTimeZone;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After a reconcile that could not start (another holds the lease, the circuit is open, a step
/// failed), the next try waits this long.
pub const RETRY_PAUSE: Duration = Duration::from_secs(60);
/// With the reconciler turned off, how often the worker looks at the setting again (a reload
/// looks at once).
const OFF_RECHECK: Duration = Duration::from_secs(600);

enum Stage {
    Listing(Receiver<Result<Vec<ListedInstance>, ApiError>>),
    Calling(Receiver<FollowUps>, Plan),
}

/// A reconcile in progress.
pub struct Reconciling {
    /// 0.7.0: the server being reconciled.
    server: String,
    stage: Stage,
    client: Client,
    connection: Connection,
    listed_at: TimestampWithTimeZone,
    tally: Tally,
    started: Instant,
    answer: Option<Answer>,
}

/// What a turn of the reconcile came to.
pub enum Step {
    /// Still waiting on the server.
    Waiting(Box<Reconciling>),
    /// Ended (done, failed, or not started); the next one in this long.
    Next(Duration),
}

fn on_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
    notify: Arc<dyn Fn() + Send + Sync>,
) -> Receiver<T> {
    let (tx, rx) = mpsc::channel();
    // A thread that cannot start drops the sender: the receiver then reports it.
    let _ = crate::pool::spawn_with_signals_blocked("evoq-reconcile", move || {
        let _ = tx.send(work());
        notify();
    });
    rx
}

fn interval() -> Duration {
    Duration::from_millis(crate::settings::RECONCILE_INTERVAL_MS.get().max(0) as u64)
}

/// Starts a reconcile of the server if it is due (in the caller's transaction): the listing
/// goes out on a thread. Otherwise how long until it is.
pub fn start(server: &str, notify: Arc<dyn Fn() + Send + Sync>) -> Result<Reconciling, Duration> {
    let Some(due) = due_in_ms(server) else {
        return Err(OFF_RECHECK); // turned off; a reload looks again at once
    };
    if due > 0 {
        return Err(Duration::from_millis(due as u64));
    }
    let run = Run::start("refresh_qr", server);
    if run.circuit_state() != CircuitState::Closed {
        return Err(RETRY_PAUSE); // the server failed every call: the cycles' probe decides
    }
    let Some(listed_at) = begin(server, &run.tunables) else {
        return Err(RETRY_PAUSE);
    };
    let client = run.client.clone();
    let lister = client.clone();
    Ok(Reconciling {
        server: server.to_string(),
        stage: Stage::Listing(on_thread(move || lister.list_instances(), notify)),
        client,
        connection: run.connection.clone(),
        listed_at,
        tally: Tally::default(),
        started: Instant::now(),
        answer: None,
    })
}

/// A thread's answer, taken off its channel by `poll` (outside a transaction) and used by `step`.
enum Answer {
    Listing(Result<Vec<ListedInstance>, ApiError>),
    Calls(FollowUps),
}

impl Reconciling {
    /// Takes the thread's answer if it is there: true when a step is due (`step`, in a
    /// transaction). Never blocks.
    pub fn poll(&mut self) -> bool {
        if self.answer.is_some() {
            return true;
        }
        let gone = || ApiError::transient("the reconcile's thread ended without an answer");
        self.answer = match &self.stage {
            Stage::Listing(rx) => match rx.try_recv() {
                Ok(r) => Some(Answer::Listing(r)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(Answer::Listing(Err(gone()))),
            },
            Stage::Calling(rx, _) => match rx.try_recv() {
                Ok(r) => Some(Answer::Calls(r)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(Answer::Calls(FollowUps::default())),
            },
        };
        self.answer.is_some()
    }

    /// The next step, once `poll` said so (in the caller's transaction).
    pub fn step(mut self, notify: Arc<dyn Fn() + Send + Sync>) -> Step {
        let answer = self.answer.take();
        let stage = std::mem::replace(&mut self.stage, Stage::Listing(mpsc::channel().1));
        match (stage, answer) {
            (Stage::Listing(_), Some(Answer::Listing(listing))) => {
                let listed = match listing {
                    Ok(listed) => listed,
                    Err(e) => return self.end(None, &FollowUps::default(), Some(&e)),
                };
                if crate::settings::changed_since(&self.server, &self.connection.stamp) {
                    let e = settings_replaced();
                    return self.end(None, &FollowUps::default(), Some(&e));
                }
                let plan = apply(
                    &self.server,
                    listed,
                    self.listed_at,
                    &self.connection,
                    &mut self.tally,
                );
                if plan.checks.is_empty() && plan.remove.is_empty() {
                    return self.end(Some(&plan), &FollowUps::default(), None);
                }
                let (client, checks, remove) = (
                    self.client.clone(),
                    plan.checks.clone(),
                    plan.remove.clone(),
                );
                let rx = on_thread(
                    move || follow_up(&client, checks, remove, FOLLOW_UP_THREADS),
                    notify,
                );
                self.stage = Stage::Calling(rx, plan);
                Step::Waiting(Box::new(self))
            }
            (Stage::Calling(_, plan), Some(Answer::Calls(answers))) => {
                // Settings replaced meanwhile: the answers are still the server's truth about
                // those instances, but the rows may now point elsewhere; let the next one judge.
                if crate::settings::changed_since(&self.server, &self.connection.stamp) {
                    let e = settings_replaced();
                    return self.end(None, &FollowUps::default(), Some(&e));
                }
                self.end(Some(&plan), &answers, None)
            }
            (stage, _) => {
                // Asked to step with no answer: nothing to do yet.
                self.stage = stage;
                Step::Waiting(Box::new(self))
            }
        }
    }

    fn end(self, plan: Option<&Plan>, answers: &FollowUps, failure: Option<&ApiError>) -> Step {
        finish(
            &self.server,
            self.listed_at,
            plan,
            answers,
            self.tally,
            failure,
            self.started,
        );
        Step::Next(if failure.is_some() {
            RETRY_PAUSE.min(interval())
        } else {
            interval()
        })
    }
}
