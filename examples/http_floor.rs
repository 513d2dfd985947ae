//! The HTTP part of a creation alone, outside PostgreSQL: evoq's own pool and client (the code
//! the backend's HTTP threads run) create `N` instances at the given Evolution API server, `C` in
//! flight, and print the CPU this process spent per call. bench/run.sh prints it beside the
//! backend's figures, so that what the calls cost and what the SQL costs are told apart.
//!
//!   http_floor BASE_URL API_KEY CONCURRENCY CALLS
//!   -> "calls_per_s cpu_ms_per_call main_thread_ms_per_call"
//!
//! CPU is user + sys from getrusage: the whole process (its HTTP threads, ended ones included)
//! and the calling thread alone, which here does only what the backend's main thread does for
//! the pool (submit, wait, take the result).

use evoq::evolution::{ApiVersion, Client, ClientConfig};
use evoq::pool::Pool;
use std::time::{Duration, Instant};

fn cpu_ms(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, key, concurrency, calls] = args.as_slice() else {
        eprintln!("usage: http_floor BASE_URL API_KEY CONCURRENCY CALLS");
        std::process::exit(2);
    };
    let concurrency: usize = concurrency.parse().expect("CONCURRENCY: a number");
    let calls: usize = calls.parse().expect("CALLS: a number");
    let client = Client::new(ClientConfig {
        base_url: url.clone(),
        api_key: key.clone(),
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        max_idle: concurrency,
        other_secrets: Vec::new(),
    });
    let mut pool = Pool::new(concurrency, move |name: String| {
        client.provision(ApiVersion::V2, &name, None).is_ok()
    });
    let run = std::process::id();
    let (process0, thread0, start) = (
        cpu_ms(libc::RUSAGE_SELF),
        cpu_ms(libc::RUSAGE_THREAD),
        Instant::now(),
    );
    let (mut submitted, mut done, mut failed) = (0, 0, 0);
    while done < calls {
        while submitted < calls && pool.room() > 0 {
            pool.submit(submitted as u64, format!("evoq_floor_{run}_{submitted}"));
            submitted += 1;
        }
        if let Some((_, result)) = pool.recv_timeout(Duration::from_secs(1)) {
            done += 1;
            if result != Some(true) {
                failed += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (process, thread) = (
        cpu_ms(libc::RUSAGE_SELF) - process0,
        cpu_ms(libc::RUSAGE_THREAD) - thread0,
    );
    if failed > 0 {
        eprintln!("http_floor: {failed} of {calls} creates failed");
        std::process::exit(1);
    }
    println!(
        "{:.1} {:.4} {:.4}",
        calls as f64 / elapsed,
        process / calls as f64,
        thread / calls as f64
    );
}
