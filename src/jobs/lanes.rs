//! 0.7.0: a SQL function's run over several Evolution servers. Each server gets a run of its own
//! (its client, circuit, dialect and bound on calls) and a pipeline of its own (its own pool, so a
//! slow server fills only its own slots), and all of them are driven side by side in the one
//! transaction (`pipeline::run_lanes_to_end`). evoq_status keeps one summary per job: with one
//! server it is that server's, as before; with several, their counts added up, and each server's
//! own summary under "servers".

use super::run::record_run;
use crate::pipeline::{run_lanes_to_end, run_to_end, Pipeline, Source, Waker};
use crate::pool::Pool;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// A server's finished run: its name, summary and last error.
pub type Ended = (String, (Value, Option<String>));

/// A lane's pool, set to wake the driver when it has a result, when there are several lanes
/// (one lane is driven by `run_to_end`, which waits on its own pool).
pub fn woken_by<T: Send + 'static, R: Send + 'static>(
    pool: Pool<T, R>,
    waker: &Waker,
    several: bool,
) -> Pool<T, R> {
    if several {
        pool.with_notify(waker.notify())
    } else {
        pool
    }
}

/// Runs every lane to its end (or the earliest deadline of theirs) and sums each up.
pub fn run<S: Source>(
    lanes: Vec<(String, Pipeline<S>, S)>,
    waker: &Waker,
    deadline: impl Fn(&S) -> Instant,
    summarize: impl Fn(S, &'static str, u64) -> (Value, Option<String>),
) -> Vec<Ended> {
    let Some(deadline) = lanes.iter().map(|(_, _, job)| deadline(job)).min() else {
        return Vec::new();
    };
    let (names, mut pairs): (Vec<String>, Vec<(Pipeline<S>, S)>) = lanes
        .into_iter()
        .map(|(name, pipe, job)| (name, (pipe, job)))
        .unzip();
    let interrupts = || {
        pgrx::check_for_interrupts!();
    };
    // One server: the one pipeline as before 0.7.0, waiting on its own pool.
    let why = match pairs.as_mut_slice() {
        [(pipe, job)] => vec![run_to_end(pipe, job, deadline, interrupts)],
        lanes => run_lanes_to_end(lanes, deadline, waker, interrupts),
    };
    names
        .into_iter()
        .zip(pairs)
        .zip(why)
        .map(|((name, (pipe, job)), why)| {
            let groups = pipe.groups;
            drop(pipe);
            (name, summarize(job, why, groups))
        })
        .collect()
}

/// Records the job's run for evoq_status and returns its summary (see the module's comment).
pub fn record(job: &str, mut ended: Vec<Ended>) -> pgrx::JsonB {
    if ended.len() == 1 {
        let (_, (summary, last_error)) = ended.remove(0);
        return record_run(job, summary, last_error);
    }
    let (summary, last_error) = combine(ended);
    record_run(job, summary, last_error)
}

/// Several servers' summaries as one: counts added up (the calls at once too: each server has
/// its own bound), the longest elapsed time, why each stopped, the last error with its server's
/// name, and every server's own summary under "servers".
fn combine(ended: Vec<Ended>) -> (Value, Option<String>) {
    let mut total = Map::new();
    let mut servers = Map::new();
    let mut stopped: Vec<String> = Vec::new();
    let mut last_error = None;
    for (name, (summary, error)) in ended {
        if let Value::Object(fields) = &summary {
            for (key, value) in fields {
                let Some(n) = value.as_u64() else { continue };
                let sum = total.get(key).and_then(Value::as_u64).unwrap_or(0);
                let combined = if key == "elapsed_ms" {
                    sum.max(n)
                } else {
                    sum + n
                };
                total.insert(key.clone(), json!(combined));
            }
            if let Some(why) = fields.get("stopped").and_then(Value::as_str) {
                stopped.push(format!("{name}: {why}"));
            }
        }
        if let Some(e) = error {
            last_error = Some(format!("server {name}: {e}"));
        }
        servers.insert(name, summary);
    }
    let same = stopped
        .iter()
        .map(|s| s.split_once(": ").map_or("", |(_, why)| why))
        .collect::<std::collections::BTreeSet<_>>();
    total.insert(
        "stopped".into(),
        match same.len() {
            1 => json!(same.into_iter().next()),
            _ => json!(stopped.join(", ")),
        },
    );
    total.insert("last_error".into(), json!(last_error));
    total.insert("servers".into(), Value::Object(servers));
    (Value::Object(total), last_error)
}
