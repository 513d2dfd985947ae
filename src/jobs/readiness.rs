//! Getting several servers' runs ready without one holding up another (0.7.0). Before a lane
//! starts, its run may have to ask its server something: the health probe when its circuit is
//! due for one, `GET /` when its dialect is unknown (up to 10 s on a busy 2.3.6). Asked one server after the other, before any
//! lane starts, a slow or dead server's probes would hold up every other server's calls.
//!
//! So every run's probes leave at once, each on a thread of its own (`ask_all`, which does not
//! wait), the servers that need none run their lanes meanwhile, and only then are the answers
//! waited for (`Asked::wait`: cancels honoured, up to the run's deadline) and the probed
//! servers' lanes run, in what is left of the time budget. A probed server is one whose circuit
//! was open or whose dialect nobody knows yet, so it is the one that waits.
//!
//! With one server nothing is asked ahead: its run asks as it did before 0.7.0.

use super::lanes::Ended;
use super::run::Run;
use crate::evolution::{ApiError, ApiVersion, Client};
use crate::pool::Pool;
use std::time::{Duration, Instant};

/// What one run's readiness was told, ahead of it.
#[derive(Debug, Default, Clone)]
pub struct Answers {
    pub health: Option<Result<(), ApiError>>,
    pub version: Option<Result<ApiVersion, ApiError>>,
}

enum Ask {
    Health,
    Version,
}

enum Told {
    Health(Result<(), ApiError>),
    Version(Result<ApiVersion, ApiError>),
}

/// The probes in flight, one pool for all of them.
pub struct Asked {
    pool: Option<Pool<(Ask, Client), Told>>,
    /// per probe (its pool key): the run it is for, and whether it is the health probe
    probes: Vec<(usize, bool)>,
    answered: Vec<bool>,
    answers: Vec<Answers>,
    /// per run: some probe is asked for it
    asked: Vec<bool>,
}

/// Starts what each run needs (`Run::probes_needed(with_version)`), all at once, and returns at
/// once. With fewer than two runs it asks nothing.
pub fn ask_all(runs: &[&Run], with_version: bool) -> Asked {
    let mut asked = Asked {
        pool: None,
        probes: Vec::new(),
        answered: Vec::new(),
        answers: vec![Answers::default(); runs.len()],
        asked: vec![false; runs.len()],
    };
    if runs.len() < 2 {
        return asked;
    }
    let mut items: Vec<(Ask, Client)> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let (health, version) = run.probes_needed(with_version);
        if health {
            asked.probes.push((i, true));
            items.push((Ask::Health, run.client.clone()));
        }
        if version {
            asked.probes.push((i, false));
            items.push((Ask::Version, run.version_client()));
        }
        asked.asked[i] = health || version;
    }
    if items.is_empty() {
        return asked;
    }
    let mut pool = Pool::new(items.len(), |(ask, client): (Ask, Client)| match ask {
        Ask::Health => Told::Health(client.probe_health()),
        Ask::Version => Told::Version(client.probe_version()),
    });
    for (key, item) in items.into_iter().enumerate() {
        pool.submit(key as u64, item);
    }
    asked.answered = vec![false; asked.probes.len()];
    asked.pool = Some(pool);
    asked
}

impl Asked {
    /// Whether run `i` waits for probes (and so runs after the others).
    pub fn waits(&self, i: usize) -> bool {
        self.asked[i]
    }

    /// Every run's answers, waiting for the probes still out until `deadline` (cancels are
    /// honoured). A probe unanswered by then gets `budget_error` (`Run::budget_error`).
    pub fn wait(
        mut self,
        deadline: Instant,
        budget_error: impl Fn(&str) -> ApiError,
    ) -> Vec<Answers> {
        if let Some(mut pool) = self.pool.take() {
            while self.answered.iter().any(|a| !a) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pgrx::check_for_interrupts!();
                let Some((key, told)) = pool.recv_timeout(left.min(Duration::from_millis(100)))
                else {
                    continue;
                };
                let key = key as usize;
                let (i, health) = self.probes[key];
                self.answered[key] = true;
                let lost = || ApiError::transient("the probe's thread ended without an answer");
                match told {
                    Some(Told::Health(r)) => self.answers[i].health = Some(r),
                    Some(Told::Version(r)) => self.answers[i].version = Some(r),
                    None if health => self.answers[i].health = Some(Err(lost())),
                    None => self.answers[i].version = Some(Err(lost())),
                }
            }
            pool.abandon();
        }
        for (key, &(i, health)) in self.probes.iter().enumerate() {
            if self.answered.get(key).copied().unwrap_or(true) {
                continue;
            }
            if health {
                self.answers[i].health = Some(Err(budget_error("GET /instance/fetchInstances")));
            } else {
                self.answers[i].version = Some(Err(budget_error("GET /")));
            }
        }
        self.answers
    }
}

/// Runs each server's job in two rounds: those that need no probe at once, while every other's
/// probes are in flight (`ask_all`), then the probed ones with their answers, in what is left
/// of the earliest of their time budgets. `lanes` gets one round's jobs, in the order given,
/// with what each was told (nothing, in the first round), and runs them side by side.
pub fn run_in_two_rounds<J>(
    jobs: Vec<(String, J)>,
    with_version: bool,
    run_of: impl Fn(&J) -> &Run,
    mut lanes: impl FnMut(Vec<(String, J)>, Vec<Answers>) -> Vec<Ended>,
) -> Vec<Ended> {
    let runs: Vec<&Run> = jobs.iter().map(|(_, job)| run_of(job)).collect();
    let asked = ask_all(&runs, with_version);
    let (first, probed): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .enumerate()
        .partition(|(i, _)| !asked.waits(*i));
    let told_nothing = vec![Answers::default(); first.len()];
    let mut ended = lanes(first.into_iter().map(|(_, j)| j).collect(), told_nothing);
    let Some(soonest) = probed
        .iter()
        .map(|(_, (_, job))| run_of(job))
        .min_by_key(|run| run.deadline)
    else {
        return ended;
    };
    let mut told = asked.wait(soonest.deadline, |what| soonest.budget_error(what));
    let answers = probed
        .iter()
        .map(|(i, _)| std::mem::take(&mut told[*i]))
        .collect();
    ended.extend(lanes(probed.into_iter().map(|(_, j)| j).collect(), answers));
    ended
}
