//! `ringtrain bench allreduce`: N real processes on loopback running the production ring.
//!
//! The driver starts N copies of this binary as hidden `bench-peer` ranks, collects the
//! address each one listens on, hands every rank the full peer list, and reads back each
//! rank's per-iteration times. An iteration's time is the slowest rank's (the collective
//! is done when the last rank is); the reported figure is the median over iterations.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde_json::json;

/// Parses "1MiB,16MiB,64MiB" (also KiB, GiB, KB, MB, GB and plain bytes).
pub fn parse_sizes(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|part| {
            let p = part.trim();
            let (num, mult) = [
                ("GiB", 1usize << 30),
                ("MiB", 1 << 20),
                ("KiB", 1 << 10),
                ("GB", 1_000_000_000),
                ("MB", 1_000_000),
                ("KB", 1_000),
                ("B", 1),
            ]
            .iter()
            .find_map(|(suf, m)| p.strip_suffix(suf).map(|n| (n, *m)))
            .unwrap_or((p, 1));
            let v: f64 = num
                .trim()
                .parse()
                .with_context(|| format!("--bytes: {part:?} is not a size like 16MiB"))?;
            if v <= 0.0 {
                bail!("--bytes: {part:?} must be positive");
            }
            Ok((v * mult as f64) as usize)
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the benchmark and prints the table (or JSON).
pub fn allreduce(
    workers: usize,
    sizes: &[usize],
    iters: usize,
    data_plane: ringtrain_coordinator::DataPlane,
    tcp_only: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let plane = match data_plane {
        ringtrain_coordinator::DataPlane::Tcp => "tcp",
        ringtrain_coordinator::DataPlane::Grpc => "grpc",
    };
    let label = match (data_plane, tcp_only) {
        (ringtrain_coordinator::DataPlane::Tcp, false) => {
            "socket data plane, unix sockets on one host"
        }
        (ringtrain_coordinator::DataPlane::Tcp, true) => "socket data plane, tcp only",
        (ringtrain_coordinator::DataPlane::Grpc, _) => "grpc streams",
    };
    if workers < 2 {
        bail!("--workers must be at least 2 (an all-reduce over one rank moves nothing)");
    }
    let exe = std::env::current_exe()?;
    let size_arg = sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    let mut locals = Vec::new();
    for rank in 0..workers {
        let mut child = Command::new(&exe)
            .args([
                "bench-peer",
                "--rank",
                &rank.to_string(),
                "--data-plane",
                plane,
                "--bytes",
                &size_arg,
                "--iters",
                &iters.to_string(),
            ])
            .args(tcp_only.then_some("--tcp-only"))
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a bench rank")?;
        let mut out = BufReader::new(child.stdout.take().context("rank stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        // "listening on ADDR local=NAME" (NAME empty: no same-host socket)
        let (addr, local) = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_once(" local="))
            .with_context(|| format!("rank {rank} said {line:?}"))?;
        addrs.push(addr.to_string());
        locals.push(local.to_string());
        children.push((child, out));
    }
    let peers = addrs.join(",");
    let locals = locals.join(",");
    for (child, _) in &mut children {
        let mut stdin = child.stdin.take().context("rank stdin")?;
        writeln!(stdin, "{peers}")?;
        writeln!(stdin, "{locals}")?;
    }
    // per rank: per size: times
    let mut all: Vec<Vec<Vec<f64>>> = Vec::new();
    for (rank, (mut child, mut out)) in children.into_iter().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let status = child.wait()?;
        if !status.success() || line.trim().is_empty() {
            bail!("bench rank {rank} failed ({status})");
        }
        all.push(
            serde_json::from_str(line.trim())
                .with_context(|| format!("rank {rank} output {line:?}"))?,
        );
    }
    let mut results = Vec::new();
    for (si, &bytes) in sizes.iter().enumerate() {
        let mut per_iter: Vec<f64> = (0..iters)
            .map(|it| all.iter().map(|r| r[si][it]).fold(0.0, f64::max))
            .collect();
        let secs = median(&mut per_iter);
        let bytes = (bytes / 4).max(1) * 4;
        let algbw = bytes as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (workers - 1) as f64 / workers as f64;
        results.push(
            json!({ "bytes": bytes, "seconds": secs, "algbw_gbps": algbw, "busbw_gbps": busbw }),
        );
    }
    if json_out {
        println!(
            "{}",
            json!({
                "workers": workers,
                "iters": iters,
                "data_plane": plane,
                "transport": match (plane, tcp_only) {
                    ("grpc", _) => "grpc",
                    (_, true) => "tcp",
                    _ => "unix",
                },
                "results": results,
            })
        );
    } else {
        println!(
            "all-reduce ({label}), {workers} processes on one host, median of {iters} iterations"
        );
        println!(
            "{:>14} {:>12} {:>12} {:>12}",
            "bytes", "seconds", "algbw GB/s", "busbw GB/s"
        );
        for r in &results {
            println!(
                "{:>14} {:>12.6} {:>12.3} {:>12.3}",
                r["bytes"],
                r["seconds"].as_f64().unwrap_or(0.0),
                r["algbw_gbps"].as_f64().unwrap_or(0.0),
                r["busbw_gbps"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// The hidden `bench-peer` rank.
pub async fn peer(
    rank: usize,
    sizes: &[usize],
    iters: usize,
    data_plane: ringtrain_coordinator::DataPlane,
    tcp_only: bool,
) -> anyhow::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    let (hubs, addr, local) = ringtrain_worker::bench::listen(
        data_plane == ringtrain_coordinator::DataPlane::Tcp,
        !tcp_only,
        stop.clone(),
    )
    .await?;
    println!("listening on {addr} local={local}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let peers: Vec<String> = line.trim().split(',').map(String::from).collect();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let locals: Vec<String> = line
        .trim_end_matches('\n')
        .split(',')
        .map(String::from)
        .collect();
    let times = ringtrain_worker::bench::run(hubs, rank, &peers, &locals, sizes, iters).await?;
    println!("{}", serde_json::to_string(&times)?);
    stop.cancel();
    Ok(())
}

/// Prints the result of `bench train`.
pub fn print_train(s: &ringtrain_proto::v1::JobStatus, json_out: bool) -> anyhow::Result<()> {
    if s.state != "completed" {
        bail!("the benchmark job ended {}: {}", s.state, s.error);
    }
    let t = |k: &str| s.timing.get(k).copied().unwrap_or(0.0);
    let total = t("total").max(1e-12);
    let sps = t("samples") / total;
    let steps = t("steps");
    if json_out {
        let mut v = json!({
            "workers": s.workers,
            "steps": steps as u64,
            "samples_per_sec": sps,
            "step_seconds": {
                "compute": t("compute") / steps.max(1.0),
                "allreduce": t("allreduce") / steps.max(1.0),
                "optimizer": t("optimizer") / steps.max(1.0),
                "other": t("other") / steps.max(1.0),
            },
        });
        if let Some(p) = &s.privacy {
            v["privacy"] = crate::progress::privacy_json(p);
        }
        println!("{v}");
    } else {
        println!(
            "{} workers, {} steps: {:.0} samples/s{}",
            s.workers,
            steps as u64,
            sps,
            match &s.privacy {
                Some(p) => format!(
                    " (DP-SGD: noise multiplier {}, clip {}, epsilon {:.4} at delta {:e})",
                    p.noise_multiplier, p.max_grad_norm, p.epsilon, p.delta
                ),
                None => String::new(),
            }
        );
        for k in ["compute", "allreduce", "optimizer", "other"] {
            println!(
                "  {k:<10} {:>9.1} us/step  {:>5.1}%",
                t(k) / steps.max(1.0) * 1e6,
                100.0 * t(k) / total
            );
        }
    }
    Ok(())
}
