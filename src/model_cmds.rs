//! `predict`, `evaluate` and `plot`: the commands that use a saved model or a run
//! directory without a cluster.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ringtrain_coordinator::model_input::{read_input, Input};
use ringtrain_proto::v1::JobStatus;
use ringtrain_worker::saved_model::SavedModel;
use serde_json::json;

/// Builds the input from the mutually exclusive CLI options.
pub fn input(
    csv: Option<PathBuf>,
    label: Option<String>,
    idx: Option<Vec<PathBuf>>,
    npy: Option<Vec<PathBuf>>,
) -> anyhow::Result<Input> {
    Ok(match (csv, idx, npy) {
        (Some(path), None, None) => Input::Csv { path, label },
        (None, Some(mut f), None) => {
            let images = f.remove(0);
            Input::Idx {
                images,
                labels: f.pop(),
            }
        }
        (None, None, Some(mut f)) => {
            let features = f.remove(0);
            Input::Npy {
                features,
                labels: f.pop(),
            }
        }
        _ => anyhow::bail!("give exactly one of --csv, --idx or --npy"),
    })
}

/// `ringtrain predict`.
pub fn predict(
    model: &Path,
    input: Input,
    output: Option<PathBuf>,
    json_out: bool,
) -> anyhow::Result<()> {
    let m = SavedModel::load(model)?;
    let rows = read_input(&m.card, &input, false)?;
    let preds = m.predict(rows.x, rows.features, &rows.source)?;
    let classification = m.card.loss.is_classification();
    let predicted = |p: &[f64]| {
        p.iter()
            .enumerate()
            .fold((0usize, f64::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0
    };
    let mut text = String::new();
    if classification {
        let c = preds.first().map(|p| p.len()).unwrap_or(0);
        let head: Vec<String> = (0..c).map(|k| format!("p_{k}")).collect();
        text.push_str(&format!("row,class,{}\n", head.join(",")));
        for (i, p) in preds.iter().enumerate() {
            let probs: Vec<String> = p.iter().map(|v| format!("{v:.6}")).collect();
            text.push_str(&format!("{i},{},{}\n", predicted(p), probs.join(",")));
        }
    } else {
        text.push_str("row,prediction\n");
        for (i, p) in preds.iter().enumerate() {
            text.push_str(&format!("{i},{}\n", p[0]));
        }
    }
    if let Some(out) = &output {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    if json_out {
        let items: Vec<serde_json::Value> = preds
            .iter()
            .map(|p| {
                if classification {
                    json!({ "class": predicted(p), "probabilities": p })
                } else {
                    json!({ "value": p[0] })
                }
            })
            .collect();
        let mut v = json!({ "rows": preds.len(), "predictions": items });
        if let Some(out) = &output {
            v["output"] = json!(out.display().to_string());
        }
        emit(&format!("{v}\n"))?;
    } else if output.is_none() {
        emit(&text)?;
    } else {
        println!("{} predictions written", preds.len());
    }
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// `ringtrain evaluate`.
pub fn evaluate(model: &Path, input: Input, json_out: bool) -> anyhow::Result<()> {
    let m = SavedModel::load(model)?;
    let rows = read_input(&m.card, &input, true)?;
    let y = rows.y.context("labels are required")?;
    let e = m.evaluate(rows.x, &y, rows.features, &rows.source)?;
    if json_out {
        let mut metrics = serde_json::Map::new();
        for (k, v) in &e.metrics {
            metrics.insert(k.clone(), json!(v));
        }
        let mut v = json!({ "samples": e.samples, "loss": e.loss, "metrics": metrics });
        if !e.confusion.is_empty() {
            v["confusion_matrix"] = json!(e.confusion);
            v["per_class"] = json!(e
                .per_class
                .iter()
                .enumerate()
                .map(|(k, (p, r, f, s))| json!({"class": k, "precision": p, "recall": r, "f1": f, "support": s}))
                .collect::<Vec<_>>());
        }
        println!("{v}");
        return Ok(());
    }
    println!("{} samples  loss {:.4}", e.samples, e.loss);
    for (k, v) in &e.metrics {
        println!("  {k:<16} {v:.4}");
    }
    if !e.confusion.is_empty() {
        println!("\n  class  precision  recall  f1      support");
        for (k, (p, r, f, s)) in e.per_class.iter().enumerate() {
            println!("  {k:<5}  {p:<9.4}  {r:<6.4}  {f:<6.4}  {s}");
        }
        println!("\nconfusion matrix (rows: true class, columns: predicted)");
        for row in &e.confusion {
            let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
            println!("{}", cells.join(""));
        }
    }
    Ok(())
}

/// `ringtrain plot`.
pub fn plot(run_dir: &Path, output: Option<PathBuf>, json_out: bool) -> anyhow::Result<()> {
    let out = output.unwrap_or_else(|| run_dir.join("curves.png"));
    let s = crate::plot::plot_metrics_file(&run_dir.join("metrics.jsonl"), &out)?;
    if json_out {
        println!(
            "{}",
            json!({ "output": out.display().to_string(), "panels": s.panels, "epochs": s.epochs, "width": s.width, "height": s.height })
        );
    } else {
        println!(
            "{} ({} epochs: {})",
            out.display(),
            s.epochs,
            s.panels.join(", ")
        );
    }
    Ok(())
}

/// Draws `curves.png` beside a finished local run's `metrics.jsonl` (a run that never
/// finished an epoch has none; a drawing failure is a warning, not a failed job).
pub fn draw_curves(status: &JobStatus) {
    let out_dir = PathBuf::from(&status.out_dir);
    let metrics = out_dir.join("metrics.jsonl");
    if metrics.is_file() {
        if let Err(e) = crate::plot::plot_metrics_file(&metrics, &out_dir.join("curves.png")) {
            tracing::warn!(error = %e, "cannot draw curves.png");
        }
    }
}
