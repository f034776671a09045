//! `ringtrain privacy`: the DP-SGD accountant from the command line.

use std::process::ExitCode;

use crate::PrivacyCommand;

/// Runs `ringtrain privacy epsilon|noise`.
pub fn run(cmd: PrivacyCommand, json: bool) -> anyhow::Result<ExitCode> {
    use ringtrain_core::privacy::{calibrate_noise, epsilon, AccountantKind, Ledger};
    match cmd {
        PrivacyCommand::Epsilon {
            noise_multiplier,
            sample_rate,
            steps,
            delta,
            accountant,
        } => {
            let kind: AccountantKind = accountant.parse()?;
            let ledger = Ledger::single(noise_multiplier, sample_rate, steps)?;
            let r = epsilon(&ledger, delta, kind)?;
            if r.optimal_order_at_boundary {
                eprintln!(
                    "warning: the optimal Renyi order {:?} is at the end of the order list; epsilon may be loose",
                    r.optimal_order
                );
            }
            if json {
                let mut v = serde_json::json!({
                    "epsilon": r.epsilon,
                    "accountant": r.accountant.as_str(),
                    "delta": r.delta,
                });
                if let Some(o) = r.optimal_order {
                    v["optimal_order"] = serde_json::json!(o);
                }
                if let Some(e) = r.error_bound {
                    v["error_bound"] = serde_json::json!(e);
                }
                println!("{v}");
            } else {
                let extra = match (r.optimal_order, r.error_bound) {
                    (Some(o), _) => format!(" (optimal order {o})"),
                    (None, Some(e)) => format!(" (true epsilon at most {e:.2e} lower)"),
                    _ => String::new(),
                };
                println!(
                    "epsilon = {:.6} at delta = {} [{}]{extra}",
                    r.epsilon,
                    r.delta,
                    r.accountant.as_str()
                );
            }
        }
        PrivacyCommand::Noise {
            target_epsilon,
            sample_rate,
            steps,
            delta,
            accountant,
        } => {
            let kind: AccountantKind = accountant.parse()?;
            let (sigma, eps) = calibrate_noise(target_epsilon, sample_rate, steps, delta, kind)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "noise_multiplier": sigma, "epsilon": eps })
                );
            } else {
                println!("noise multiplier = {sigma:.6} (epsilon {eps:.6} <= {target_epsilon} at delta = {delta})");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
