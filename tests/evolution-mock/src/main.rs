//! `evolution-mock [--port 8080] [--api-version 2.3.6|1.8.2] [--api-key KEY] [--latency-ms N]
//! [--slow-every N --slow-ms M] [--qr-on-create] [--qr-ttl-ms N] [--qr-limit N]
//! [--webhook-retry-ms N] [--qr-never]`: runs the mock until killed. Prints one line with the
//! URL so scripts can wait for it.
//!
//! `--slow-every N --slow-ms M` is the latency mix: every N-th Evolution API request sleeps M
//! ms instead of `--latency-ms` (N = 10 gives "90 % fast, 10 % slow").

use std::io::Write;
use std::process::ExitCode;

use evolution_mock::{Flavor, MockConfig, MockServer};

const USAGE: &str = "usage: evolution-mock [--port 8080] [--api-version 2.3.6|1.8.2] \
[--api-key KEY] [--latency-ms N] [--slow-every N --slow-ms M] [--qr-on-create] [--qr-ttl-ms N] [--qr-limit N] \
[--webhook-retry-ms N] [--qr-never]";

fn parse_args(args: &[String]) -> Result<(u16, MockConfig), String> {
    let mut port = 8080u16;
    let mut config = MockConfig::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag {
            "--port" => {
                let v = value()?;
                port = v.parse().map_err(|_| format!("--port: not a port: {v}"))?;
            }
            "--api-version" => {
                let v = value()?;
                config.flavor = Flavor::from_version(&v)
                    .ok_or_else(|| format!("--api-version: expected 2.3.6 or 1.8.2, got {v}"))?;
            }
            "--api-key" => config.api_key = value()?,
            "--latency-ms" => config.latency_ms = number(value()?)?,
            "--slow-every" => config.slow_every = number(value()?)?,
            "--slow-ms" => config.slow_ms = number(value()?)?,
            "--qr-ttl-ms" => config.qr_ttl_ms = number(value()?)?,
            "--qr-limit" => {
                let v = value()?;
                config.qr_limit = v
                    .parse()
                    .map_err(|_| format!("--qr-limit: not a number: {v}"))?;
            }
            "--webhook-retry-ms" => config.webhook_retry_ms = number(value()?)?,
            "--qr-on-create" => config.qr_on_create = true,
            "--qr-never" => config.qr_never = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok((port, config))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, config) = match parse_args(&args) {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let server = match MockServer::start(port, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("evolution-mock: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "evolution-mock listening on {}", server.url());
    let _ = out.flush();
    drop(out);
    // Serve until the process is killed; the server runs on its own threads.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn latency_mix_flags() {
        let (_, c) = parse_args(&args(&["--slow-every", "10", "--slow-ms=2500"])).unwrap();
        assert_eq!((c.slow_every, c.slow_ms, c.latency_ms), (10, 2500, 0));
        let (_, c) = parse_args(&args(&[])).unwrap();
        assert_eq!(c.slow_every, 0, "off by default");
        assert!(parse_args(&args(&["--slow-every", "x"])).is_err());
        assert!(parse_args(&args(&["--slow-ms"])).is_err());
    }
}
