//! Training curves as a PNG, drawn without any plotting or font crate.
//!
//! A run's `metrics.jsonl` holds one JSON object per epoch. Every numeric key except
//! `epoch`, `samples_per_sec`, `seconds` and the `val_*` keys gets a panel (`loss` first,
//! then the rest alphabetically) that draws the train series and, where the run has it,
//! the `val_<key>` series in a second colour. Panels sit in a grid of up to two columns,
//! each about 500×300 px, on a white background.
//!
//! Everything is rasterised here: 2 px polylines, a light grid, and text from a small
//! embedded 5×7 bitmap font (with descenders) drawn at twice its size. Null, missing and
//! non-finite values are skipped; a series with a single point still shows as a marker.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// What a rendered plot contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlotSummary {
    /// The panel titles (metric names) in drawing order: `loss` first, then alphabetical.
    pub panels: Vec<String>,
    /// How many distinct epochs the rows covered.
    pub epochs: usize,
    /// Width of the PNG in pixels.
    pub width: u32,
    /// Height of the PNG in pixels.
    pub height: u32,
}

/// Why a plot could not be drawn. Each message names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The metrics file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The metrics file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not valid JSON.
    #[error("{}: line {line}: invalid JSON: {message}", path.display())]
    Json {
        /// The metrics file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What the JSON parser reported.
        message: String,
    },
    /// A line is valid JSON but not an object.
    #[error("{}: line {line}: not a JSON object", path.display())]
    NotObject {
        /// The metrics file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
    /// There are no rows at all.
    #[error("{input}: empty: no epochs to plot")]
    Empty {
        /// The metrics file, or `rows` when the rows were passed in.
        input: String,
    },
    /// The rows have no key that gets a panel.
    #[error(
        "{input}: nothing to plot: no numeric key other than epoch, samples_per_sec, seconds and val_*"
    )]
    NoMetrics {
        /// The metrics file, or `rows` when the rows were passed in.
        input: String,
    },
    /// The PNG could not be written.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The output PNG.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PNG encoder refused the image.
    #[error("{}: cannot encode PNG: {message}", path.display())]
    Encode {
        /// The output PNG.
        path: PathBuf,
        /// What the encoder reported.
        message: String,
    },
}

/// Reads a run's `metrics.jsonl` and writes a PNG of loss and every metric per epoch,
/// train vs validation.
///
/// Blank lines are skipped (line numbers in errors still count them). Bare `NaN` and
/// `Infinity` tokens, which some writers emit, are read as missing values.
pub fn plot_metrics_file(
    metrics_jsonl: &Path,
    output_png: &Path,
) -> Result<PlotSummary, PlotError> {
    let rows = read_rows(metrics_jsonl)?;
    render(&rows, output_png, &metrics_jsonl.display().to_string())
}

/// Same, from already-parsed rows (each row is one epoch's JSON object).
#[cfg(test)]
fn plot_rows(rows: &[Map<String, Value>], output_png: &Path) -> Result<PlotSummary, PlotError> {
    render(rows, output_png, "rows")
}

/// Keys that describe the epoch or throughput rather than model quality.
const NOT_METRICS: [&str; 3] = ["epoch", "samples_per_sec", "seconds"];
/// Prefix of the validation counterpart of a metric.
const VAL_PREFIX: &str = "val_";

/// Size of one panel in pixels.
const PANEL_W: u32 = 500;
const PANEL_H: u32 = 300;
/// Panels per row of the grid.
const MAX_COLUMNS: usize = 2;
/// Font magnification: 5×7 glyphs become 10×14.
const SCALE: i64 = 2;
/// Gap between the plot frame and the outermost data point, so curves never sit on it.
const INNER_PAD: f64 = 10.0;
/// Above this many points a series is drawn without per-point markers.
const MAX_MARKED_POINTS: usize = 60;

/// An RGB colour.
type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const TEXT: Rgb = [34, 34, 34];
const FRAME: Rgb = [110, 110, 110];
const GRID: Rgb = [228, 228, 228];
const LEGEND_BORDER: Rgb = [200, 200, 200];
/// The train series (a saturated blue).
const TRAIN: Rgb = [31, 119, 180];
/// The validation series (an orange that stays distinct from blue for colour-blind readers).
const VALIDATION: Rgb = [255, 127, 14];

/// Parses the JSONL file into rows, reporting the 1-based line of any bad line.
fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value = match serde_json::from_str::<Value>(line) {
            Ok(value) => value,
            Err(err) => {
                // Retry once with NaN/Infinity read as null; report the original error if
                // that does not help either.
                match non_finite_as_null(line).and_then(|l| serde_json::from_str(&l).ok()) {
                    Some(value) => value,
                    None => {
                        return Err(PlotError::Json {
                            path: path.to_path_buf(),
                            line: line_no,
                            message: json_message(&err),
                        })
                    }
                }
            }
        };
        match value {
            Value::Object(map) => rows.push(map),
            _ => {
                return Err(PlotError::NotObject {
                    path: path.to_path_buf(),
                    line: line_no,
                })
            }
        }
    }
    Ok(rows)
}

/// serde_json's message without its "at line 1 column N" suffix (the line is ours to
/// report), keeping the column.
fn json_message(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let message = match full.rfind(" at line ") {
        Some(at) => &full[..at],
        None => full.as_str(),
    };
    format!("{message} (column {})", err.column())
}

/// Replaces bare `NaN`, `Infinity` and `-Infinity` tokens outside strings with `null`.
/// Returns `None` when the line has none, so the caller keeps its original error.
fn non_finite_as_null(line: &str) -> Option<String> {
    const TOKENS: [&str; 4] = ["-Infinity", "+Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(line.len());
    let mut replaced = false;
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            replaced = true;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    replaced.then_some(out)
}

/// A finite number under `key`, or `None` for missing, null, non-numeric or non-finite.
fn number(row: &Map<String, Value>, key: &str) -> Option<f64> {
    row.get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
}

/// The panel keys under the module's rule: every key holding a finite number in some row,
/// except the non-metrics and `val_*`; `loss` first, then alphabetical.
fn panel_keys(rows: &[Map<String, Value>]) -> Vec<String> {
    let mut keys: Vec<String> = rows
        .iter()
        .flat_map(|row| row.keys())
        .filter(|k| !NOT_METRICS.contains(&k.as_str()) && !k.starts_with(VAL_PREFIX))
        .filter(|k| rows.iter().any(|row| number(row, k).is_some()))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    if let Some(at) = keys.iter().position(|k| k == "loss") {
        let loss = keys.remove(at);
        keys.insert(0, loss);
    }
    keys
}

/// The epoch of each row: its `epoch` value, or its 1-based position when that is absent.
fn row_epochs(rows: &[Map<String, Value>]) -> Vec<f64> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| number(row, "epoch").unwrap_or((i + 1) as f64))
        .collect()
}

/// The (epoch, value) points of `key`, sorted by epoch. When an epoch repeats (a resumed
/// run), the later row wins.
fn series(rows: &[Map<String, Value>], epochs: &[f64], key: &str) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = rows
        .iter()
        .zip(epochs)
        .filter_map(|(row, &epoch)| number(row, key).map(|v| (epoch, v)))
        .collect();
    // A stable sort keeps row order among equal epochs, so the last one is the latest.
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut deduped: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for point in points {
        match deduped.last_mut() {
            Some(last) if last.0 == point.0 => *last = point,
            _ => deduped.push(point),
        }
    }
    deduped
}

/// One panel's data.
struct Panel {
    title: String,
    train: Vec<(f64, f64)>,
    validation: Vec<(f64, f64)>,
    y: Axis,
}

/// Where the pixels of one panel's plot area go.
#[derive(Clone, Copy)]
struct Frame {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Frame {
    fn width(&self) -> i64 {
        self.right - self.left
    }
}

/// The mapping from data to pixels within a frame.
struct Mapping<'a> {
    frame: Frame,
    x: &'a Axis,
    y: &'a Axis,
}

impl Mapping<'_> {
    fn px(&self, x: f64) -> f64 {
        let f = &self.frame;
        let usable = (f.right - f.left) as f64 - 2.0 * INNER_PAD;
        f.left as f64 + INNER_PAD + (x - self.x.lo) / (self.x.hi - self.x.lo) * usable
    }

    fn py(&self, y: f64) -> f64 {
        let f = &self.frame;
        let usable = (f.bottom - f.top) as f64 - 2.0 * INNER_PAD;
        f.bottom as f64 - INNER_PAD - (y - self.y.lo) / (self.y.hi - self.y.lo) * usable
    }

    fn point(&self, (x, y): (f64, f64)) -> (i64, i64) {
        (self.px(x).round() as i64, self.py(y).round() as i64)
    }
}

/// Draws the rows into a PNG at `output`; `input` names the source in errors.
fn render(
    rows: &[Map<String, Value>],
    output: &Path,
    input: &str,
) -> Result<PlotSummary, PlotError> {
    if rows.is_empty() {
        return Err(PlotError::Empty {
            input: input.to_string(),
        });
    }
    let keys = panel_keys(rows);
    if keys.is_empty() {
        return Err(PlotError::NoMetrics {
            input: input.to_string(),
        });
    }
    let epochs = row_epochs(rows);
    let mut distinct = epochs.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    let (first, last) = match (distinct.first(), distinct.last()) {
        (Some(&first), Some(&last)) => (first, last),
        _ => {
            return Err(PlotError::Empty {
                input: input.to_string(),
            })
        }
    };

    let panels: Vec<Panel> = keys
        .iter()
        .map(|key| {
            let train = series(rows, &epochs, key);
            let validation = series(rows, &epochs, &format!("{VAL_PREFIX}{key}"));
            let (lo, hi) = train
                .iter()
                .chain(&validation)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
                    (lo.min(v), hi.max(v))
                });
            Panel {
                title: key.clone(),
                train,
                validation,
                y: value_axis(lo, hi),
            }
        })
        .collect();

    let columns = panels.len().min(MAX_COLUMNS);
    let grid_rows = panels.len().div_ceil(columns);
    let width = PANEL_W * columns as u32;
    let height = PANEL_H * grid_rows as u32;
    let mut canvas = Canvas::new(width, height);

    // One left margin for all panels, so plot areas line up down each column.
    let label_width = panels
        .iter()
        .flat_map(|p| p.y.labels.iter())
        .map(|l| text_width(l))
        .max()
        .unwrap_or(0);
    let left_margin = 14 + label_width + 10;
    let plot_width = PANEL_W as i64 - left_margin - 18;
    let x = epoch_axis(first, last, plot_width);

    for (index, panel) in panels.iter().enumerate() {
        let origin_x = (index % columns) as i64 * PANEL_W as i64;
        let origin_y = (index / columns) as i64 * PANEL_H as i64;
        let frame = Frame {
            left: origin_x + left_margin,
            top: origin_y + 36,
            right: origin_x + left_margin + plot_width,
            bottom: origin_y + PANEL_H as i64 - 54,
        };
        draw_panel(&mut canvas, panel, frame, &x);
    }

    canvas.write_png(output)?;
    Ok(PlotSummary {
        panels: keys,
        epochs: distinct.len(),
        width,
        height,
    })
}

/// Draws one panel: grid, frame, ticks, title, both series and the legend.
fn draw_panel(canvas: &mut Canvas, panel: &Panel, frame: Frame, x: &Axis) {
    let map = Mapping {
        frame,
        x,
        y: &panel.y,
    };
    let glyph_h = 7 * SCALE;

    // Grid first, so the frame and the data draw over it.
    for &tick in &x.ticks {
        let px = map.px(tick).round() as i64;
        canvas.fill_rect(px, frame.top, 1, frame.bottom - frame.top, GRID);
    }
    for &tick in &panel.y.ticks {
        let py = map.py(tick).round() as i64;
        canvas.fill_rect(frame.left, py, frame.width(), 1, GRID);
    }
    canvas.stroke_rect(frame, FRAME);

    // Tick marks and labels: x below the frame, y to its left, right-aligned.
    for (&tick, label) in x.ticks.iter().zip(&x.labels) {
        let px = map.px(tick).round() as i64;
        canvas.fill_rect(px, frame.bottom, 1, 5, FRAME);
        canvas.text(px - text_width(label) / 2, frame.bottom + 9, label, TEXT);
    }
    for (&tick, label) in panel.y.ticks.iter().zip(&panel.y.labels) {
        let py = map.py(tick).round() as i64;
        canvas.fill_rect(frame.left - 5, py, 5, 1, FRAME);
        let lx = frame.left - 9 - text_width(label);
        canvas.text(lx, py - glyph_h / 2, label, TEXT);
    }
    let axis_label = "epoch";
    let center = (frame.left + frame.right) / 2;
    canvas.text(
        center - text_width(axis_label) / 2,
        frame.bottom + 9 + glyph_h + 8,
        axis_label,
        TEXT,
    );
    let title = fit_text(&panel.title, frame.width());
    canvas.text(
        center - text_width(&title) / 2,
        frame.top - 10 - glyph_h,
        &title,
        TEXT,
    );

    let mut legend = vec![("train", TRAIN)];
    draw_series(canvas, &map, &panel.train, TRAIN);
    if !panel.validation.is_empty() {
        draw_series(canvas, &map, &panel.validation, VALIDATION);
        legend.push(("validation", VALIDATION));
    }
    draw_legend(canvas, &map, panel, &legend);
}

/// A 2 px polyline through the points, with a marker on each point when there are few
/// enough to tell apart (always for a lone point, which would otherwise be invisible).
fn draw_series(canvas: &mut Canvas, map: &Mapping<'_>, points: &[(f64, f64)], colour: Rgb) {
    let pixels: Vec<(i64, i64)> = points.iter().map(|&p| map.point(p)).collect();
    for pair in pixels.windows(2) {
        canvas.thick_line(pair[0], pair[1], colour);
    }
    match pixels.len() {
        1 => pixels
            .iter()
            .for_each(|&(x, y)| canvas.disc(x, y, 5, colour)),
        n if n <= MAX_MARKED_POINTS => pixels
            .iter()
            .for_each(|&(x, y)| canvas.disc(x, y, 3, colour)),
        _ => {}
    }
}

/// The legend box in whichever corner of the plot area its curves cross least.
fn draw_legend(canvas: &mut Canvas, map: &Mapping<'_>, panel: &Panel, entries: &[(&str, Rgb)]) {
    const PAD: i64 = 8;
    const SAMPLE: i64 = 24;
    const ROW: i64 = 22;
    const INSET: i64 = 6;
    let text_w = entries
        .iter()
        .map(|(label, _)| text_width(label))
        .max()
        .unwrap_or(0);
    let w = PAD + SAMPLE + 8 + text_w + PAD;
    let h = PAD + ROW * entries.len() as i64 - (ROW - 7 * SCALE) + PAD;
    let f = map.frame;
    // Preference order on a tie: upper right, upper left, lower right, lower left.
    let corners = [
        (f.right - INSET - w, f.top + INSET),
        (f.left + INSET, f.top + INSET),
        (f.right - INSET - w, f.bottom - INSET - h),
        (f.left + INSET, f.bottom - INSET - h),
    ];
    let samples = curve_samples(map, &[&panel.train, &panel.validation]);
    let (x, y) = corners
        .iter()
        .copied()
        .min_by_key(|&(cx, cy)| {
            samples
                .iter()
                .filter(|&&(sx, sy)| {
                    sx >= cx - 4 && sx <= cx + w + 4 && sy >= cy - 4 && sy <= cy + h + 4
                })
                .count()
        })
        .unwrap_or(corners[0]);

    canvas.fill_rect(x, y, w, h, WHITE);
    canvas.stroke_rect(
        Frame {
            left: x,
            top: y,
            right: x + w - 1,
            bottom: y + h - 1,
        },
        LEGEND_BORDER,
    );
    for (row, (label, colour)) in entries.iter().enumerate() {
        let top = y + PAD + row as i64 * ROW;
        let mid = top + 7 * SCALE / 2;
        canvas.thick_line((x + PAD, mid), (x + PAD + SAMPLE, mid), *colour);
        canvas.disc(x + PAD + SAMPLE / 2, mid, 3, *colour);
        canvas.text(x + PAD + SAMPLE + 8, top, label, TEXT);
    }
}

/// Pixels along the drawn curves, about every 2 px, for placing the legend.
fn curve_samples(map: &Mapping<'_>, series: &[&Vec<(f64, f64)>]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for points in series {
        let pixels: Vec<(i64, i64)> = points.iter().map(|&p| map.point(p)).collect();
        out.extend(pixels.iter().copied());
        for pair in pixels.windows(2) {
            let (x0, y0) = pair[0];
            let (x1, y1) = pair[1];
            let steps = ((x1 - x0).abs().max((y1 - y0).abs()) / 2).max(1);
            for i in 0..=steps {
                let t = i as f64 / steps as f64;
                out.push((
                    (x0 as f64 + t * (x1 - x0) as f64).round() as i64,
                    (y0 as f64 + t * (y1 - y0) as f64).round() as i64,
                ));
            }
        }
    }
    out
}

/// An axis: its data range, tick positions and their labels.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

/// A value axis with 3–5 "nice" ticks (steps of 1, 2, 2.5 or 5 times a power of ten)
/// whose outermost ticks enclose the data.
fn value_axis(min: f64, max: f64) -> Axis {
    // A flat series (or a single point) still gets a range to spread ticks over.
    let (min, max) = if max > min {
        (min, max)
    } else if min == 0.0 {
        (-1.0, 1.0)
    } else {
        (min - min.abs() * 0.1, max + max.abs() * 0.1)
    };
    let span = max - min;
    if !span.is_finite() || span <= 0.0 {
        return Axis {
            lo: min,
            hi: max,
            ticks: vec![min, max],
            labels: vec![format!("{min:e}"), format!("{max:e}")],
        };
    }
    let base_exp = span.log10().floor() as i32 - 2;
    for exp in base_exp..=base_exp + 3 {
        for mantissa in [1.0, 2.0, 2.5, 5.0] {
            let step = mantissa * 10f64.powi(exp);
            let first = (min / step).floor();
            let last = (max / step).ceil();
            let intervals = (last - first).round() as i64;
            if intervals > 4 {
                continue;
            }
            // A range that fits in one step gets a middle tick at half the step.
            let (step, first, intervals, mantissa, exp) = if intervals < 2 {
                let half = step / 2.0;
                let (m, e) = if mantissa == 1.0 {
                    (5.0, exp - 1)
                } else {
                    (mantissa / 2.0, exp)
                };
                (half, first * 2.0, intervals * 2, m, e)
            } else {
                (step, first, intervals, mantissa, exp)
            };
            let ticks: Vec<f64> = (0..=intervals)
                .map(|i| {
                    let v = (first + i as f64) * step;
                    // Avoid "-0.00".
                    if v == 0.0 {
                        0.0
                    } else {
                        v
                    }
                })
                .collect();
            let labels = tick_labels(&ticks, mantissa, exp);
            let (lo, hi) = (first * step, (first + intervals as f64) * step);
            return Axis {
                lo,
                hi,
                ticks,
                labels,
            };
        }
    }
    Axis {
        lo: min,
        hi: max,
        ticks: vec![min, max],
        labels: vec![format!("{min:e}"), format!("{max:e}")],
    }
}

/// Labels with just enough decimals for the step `mantissa × 10^exp`; scientific
/// notation for very large or very small values.
fn tick_labels(ticks: &[f64], mantissa: f64, exp: i32) -> Vec<String> {
    let extra = i32::from(mantissa == 2.5);
    let largest = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    if largest >= 1e6 || exp < -4 {
        let top = largest.log10().floor() as i32;
        let precision = (top - exp + extra).clamp(0, 6) as usize;
        return ticks
            .iter()
            .map(|&t| {
                if t == 0.0 {
                    "0".to_string()
                } else {
                    format!("{t:.precision$e}")
                }
            })
            .collect();
    }
    let decimals = (extra - exp).max(0) as usize;
    ticks.iter().map(|t| format!("{t:.decimals$}")).collect()
}

/// The epoch axis: integer ticks at a step (1, 2, 5, 10, 20, 25, 50, ...) wide enough that
/// labels do not collide across `plot_width` pixels. A single epoch gets one epoch of room
/// on each side.
fn epoch_axis(first: f64, last: f64, plot_width: i64) -> Axis {
    let (lo, hi) = if last > first {
        (first, last)
    } else {
        (first - 1.0, last + 1.0)
    };
    let usable = plot_width as f64 - 2.0 * INNER_PAD;
    let widest = text_width(&format!("{}", hi.abs().max(lo.abs()).ceil() as i64 + 1)) + 4 * SCALE;
    let mut step = 1.0f64;
    'search: for exp in 0..16 {
        for mantissa in [1.0, 2.0, 2.5, 5.0] {
            step = mantissa * 10f64.powi(exp);
            // 2.5 only makes integer ticks from 25 on.
            if step.fract() != 0.0 {
                continue;
            }
            let spacing = step / (hi - lo) * usable;
            if spacing >= widest as f64 + 12.0 {
                break 'search;
            }
        }
    }
    let mut ticks = Vec::new();
    let mut tick = (lo / step).ceil() * step;
    while tick <= hi && ticks.len() < 64 {
        ticks.push(tick);
        tick += step;
    }
    let labels = ticks.iter().map(|t| format!("{}", *t as i64)).collect();
    Axis {
        lo,
        hi,
        ticks,
        labels,
    }
}

/// Shortens `text` with a trailing ".." until it fits in `max_width` pixels.
fn fit_text(text: &str, max_width: i64) -> String {
    if text_width(text) <= max_width {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().collect::<String>() + "..";
        if text_width(&candidate) <= max_width {
            return candidate;
        }
    }
    String::new()
}

/// Width in pixels of `text` drawn at [`SCALE`] (no trailing gap).
fn text_width(text: &str) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * font::ADVANCE - 1) * SCALE
    }
}

/// An RGB raster, white to begin with. All drawing clips to its bounds.
struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![255; width as usize * height as usize * 3],
        }
    }

    fn put(&mut self, x: i64, y: i64, colour: Rgb) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let at = (y as usize * self.width as usize + x as usize) * 3;
        if let Some(px) = self.pixels.get_mut(at..at + 3) {
            px.copy_from_slice(&colour);
        }
    }

    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, colour: Rgb) {
        for yy in y.max(0)..(y + h).min(i64::from(self.height)) {
            for xx in x.max(0)..(x + w).min(i64::from(self.width)) {
                self.put(xx, yy, colour);
            }
        }
    }

    /// A 1 px outline whose corners are the frame's corners (inclusive).
    fn stroke_rect(&mut self, f: Frame, colour: Rgb) {
        self.fill_rect(f.left, f.top, f.right - f.left + 1, 1, colour);
        self.fill_rect(f.left, f.bottom, f.right - f.left + 1, 1, colour);
        self.fill_rect(f.left, f.top, 1, f.bottom - f.top + 1, colour);
        self.fill_rect(f.right, f.top, 1, f.bottom - f.top + 1, colour);
    }

    /// A 2 px line: Bresenham's walk stamping a 2×2 brush at each step.
    fn thick_line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), colour: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        // The walk takes at most dx + |dy| + 1 steps; the bound also guards bad input.
        for _ in 0..=(dx - dy) {
            self.fill_rect(x, y, 2, 2, colour);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A filled disc of `radius` pixels centred on the pixel corner shared with the
    /// 2×2 line brush, so markers sit on the line.
    fn disc(&mut self, cx: i64, cy: i64, radius: i64, colour: Rgb) {
        let r2 = (radius as f64 + 0.25).powi(2);
        for dy in -radius..=radius + 1 {
            for dx in -radius..=radius + 1 {
                let (fx, fy) = (dx as f64 - 0.5, dy as f64 - 0.5);
                if fx * fx + fy * fy <= r2 {
                    self.put(cx + dx, cy + dy, colour);
                }
            }
        }
    }

    /// Draws `text` with its top-left at (x, y) at [`SCALE`]; characters the font lacks
    /// show as `?`.
    fn text(&mut self, x: i64, y: i64, text: &str, colour: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let gx = x + i as i64 * font::ADVANCE * SCALE;
            for (row, bits) in font::glyph(c).iter().enumerate() {
                for col in 0..font::WIDTH {
                    if bits & (1 << (font::WIDTH - 1 - col)) != 0 {
                        self.fill_rect(
                            gx + col * SCALE,
                            y + row as i64 * SCALE,
                            SCALE,
                            SCALE,
                            colour,
                        );
                    }
                }
            }
        }
    }

    /// Encodes the raster as an 8-bit RGB PNG at `path`.
    fn write_png(&self, path: &Path) -> Result<(), PlotError> {
        let write_err = |source| PlotError::Write {
            path: path.to_path_buf(),
            source,
        };
        let encode_err = |err: png::EncodingError| match err {
            png::EncodingError::IoError(source) => PlotError::Write {
                path: path.to_path_buf(),
                source,
            },
            other => PlotError::Encode {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        };
        let file = File::create(path).map_err(write_err)?;
        let mut out = BufWriter::new(file);
        let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer.write_image_data(&self.pixels).map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
        out.flush().map_err(write_err)
    }
}

/// A 5×7 bitmap font for printable ASCII, with two extra rows for descenders.
mod font {
    /// Glyph width in pixels (before scaling).
    pub(super) const WIDTH: i64 = 5;
    /// Horizontal advance per character: the glyph plus one column of spacing.
    pub(super) const ADVANCE: i64 = 6;

    /// The rows of `c`'s glyph, top first; bit 4 is the leftmost column. Characters
    /// outside printable ASCII map to `?`.
    pub(super) fn glyph(c: char) -> &'static [u8; 9] {
        let index = match c {
            ' '..='~' => c as usize - ' ' as usize,
            _ => '?' as usize - ' ' as usize,
        };
        GLYPHS.get(index).unwrap_or(&GLYPHS[0])
    }

    /// Rows 0–6 hold capitals and digits (baseline under row 6), lowercase letters use
    /// rows 2–6, and rows 7–8 hold descenders (g, j, p, q, y, `,`, `;`, `_`).
    #[rustfmt::skip]
    const GLYPHS: [[u8; 9]; 95] = [
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ' '
        [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00, 0x00], // '!'
        [0x0a, 0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '"'
        [0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a, 0x00, 0x00], // '#'
        [0x04, 0x0f, 0x14, 0x0e, 0x05, 0x1e, 0x04, 0x00, 0x00], // '$'
        [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00, 0x00], // '%'
        [0x0c, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0d, 0x00, 0x00], // '&'
        [0x04, 0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '\''
        [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00, 0x00], // '('
        [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00, 0x00], // ')'
        [0x00, 0x04, 0x15, 0x0e, 0x15, 0x04, 0x00, 0x00, 0x00], // '*'
        [0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00, 0x00, 0x00], // '+'
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x06, 0x02, 0x04], // ','
        [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00, 0x00, 0x00], // '-'
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c, 0x00, 0x00], // '.'
        [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00, 0x00], // '/'
        [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e, 0x00, 0x00], // '0'
        [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e, 0x00, 0x00], // '1'
        [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f, 0x00, 0x00], // '2'
        [0x0e, 0x11, 0x01, 0x06, 0x01, 0x11, 0x0e, 0x00, 0x00], // '3'
        [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02, 0x00, 0x00], // '4'
        [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e, 0x00, 0x00], // '5'
        [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e, 0x00, 0x00], // '6'
        [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00, 0x00], // '7'
        [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e, 0x00, 0x00], // '8'
        [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c, 0x00, 0x00], // '9'
        [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00, 0x00, 0x00], // ':'
        [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x04, 0x08, 0x00], // ';'
        [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00], // '<'
        [0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00, 0x00, 0x00], // '='
        [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00, 0x00], // '>'
        [0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00, 0x00], // '?'
        [0x0e, 0x11, 0x17, 0x15, 0x17, 0x10, 0x0f, 0x00, 0x00], // '@'
        [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11, 0x00, 0x00], // 'A'
        [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e, 0x00, 0x00], // 'B'
        [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e, 0x00, 0x00], // 'C'
        [0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c, 0x00, 0x00], // 'D'
        [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f, 0x00, 0x00], // 'E'
        [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10, 0x00, 0x00], // 'F'
        [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f, 0x00, 0x00], // 'G'
        [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11, 0x00, 0x00], // 'H'
        [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e, 0x00, 0x00], // 'I'
        [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c, 0x00, 0x00], // 'J'
        [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00, 0x00], // 'K'
        [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f, 0x00, 0x00], // 'L'
        [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00, 0x00], // 'M'
        [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00, 0x00], // 'N'
        [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e, 0x00, 0x00], // 'O'
        [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10, 0x00, 0x00], // 'P'
        [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d, 0x00, 0x00], // 'Q'
        [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11, 0x00, 0x00], // 'R'
        [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e, 0x00, 0x00], // 'S'
        [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // 'T'
        [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e, 0x00, 0x00], // 'U'
        [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04, 0x00, 0x00], // 'V'
        [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a, 0x00, 0x00], // 'W'
        [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11, 0x00, 0x00], // 'X'
        [0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // 'Y'
        [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f, 0x00, 0x00], // 'Z'
        [0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e, 0x00, 0x00], // '['
        [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00, 0x00], // '\\'
        [0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e, 0x00, 0x00], // ']'
        [0x04, 0x0a, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '^'
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x00], // '_'
        [0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '`'
        [0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f, 0x00, 0x00], // 'a'
        [0x10, 0x10, 0x1e, 0x11, 0x11, 0x11, 0x1e, 0x00, 0x00], // 'b'
        [0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e, 0x00, 0x00], // 'c'
        [0x01, 0x01, 0x0f, 0x11, 0x11, 0x11, 0x0f, 0x00, 0x00], // 'd'
        [0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e, 0x00, 0x00], // 'e'
        [0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08, 0x00, 0x00], // 'f'
        [0x00, 0x00, 0x0f, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x0e], // 'g'
        [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // 'h'
        [0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e, 0x00, 0x00], // 'i'
        [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c], // 'j'
        [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00, 0x00], // 'k'
        [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e, 0x00, 0x00], // 'l'
        [0x00, 0x00, 0x1a, 0x15, 0x15, 0x15, 0x15, 0x00, 0x00], // 'm'
        [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // 'n'
        [0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e, 0x00, 0x00], // 'o'
        [0x00, 0x00, 0x1e, 0x11, 0x11, 0x11, 0x1e, 0x10, 0x10], // 'p'
        [0x00, 0x00, 0x0f, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x01], // 'q'
        [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00, 0x00], // 'r'
        [0x00, 0x00, 0x0f, 0x10, 0x0e, 0x01, 0x1e, 0x00, 0x00], // 's'
        [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06, 0x00, 0x00], // 't'
        [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d, 0x00, 0x00], // 'u'
        [0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04, 0x00, 0x00], // 'v'
        [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a, 0x00, 0x00], // 'w'
        [0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x00, 0x00], // 'x'
        [0x00, 0x00, 0x11, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x0e], // 'y'
        [0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f, 0x00, 0x00], // 'z'
        [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00, 0x00], // '{'
        [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // '|'
        [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00, 0x00], // '}'
        [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00, 0x00], // '~'
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Rows from `json!` objects.
    fn rows(values: Vec<Value>) -> Vec<Map<String, Value>> {
        values
            .into_iter()
            .map(|v| match v {
                Value::Object(map) => map,
                other => panic!("not an object: {other}"),
            })
            .collect()
    }

    /// Ten epochs shaped like a real run: loss falling, accuracy rising, noisy validation.
    fn example_rows() -> Vec<Map<String, Value>> {
        let noise = [
            0.0, 0.01, -0.008, 0.012, -0.004, 0.006, -0.01, 0.004, 0.008, -0.002,
        ];
        (0..10)
            .map(|i| {
                let t = i as f64 / 9.0;
                let mut row = Map::new();
                row.insert("epoch".into(), json!(i + 1));
                row.insert("loss".into(), json!(0.05 + 0.65 * (1.0 - t).powi(2)));
                row.insert("val_loss".into(), json!(0.35 - 0.09 * t + noise[i]));
                row.insert("accuracy".into(), json!(0.8 + 0.19 * t.sqrt()));
                row.insert(
                    "val_accuracy".into(),
                    json!(0.90 + 0.04 * t + noise[i] / 2.0),
                );
                row.insert("samples_per_sec".into(), json!(60059.5));
                row.insert("seconds".into(), json!(0.9));
                row
            })
            .collect()
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ringtrain-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Decodes a PNG into (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::io::BufReader::new(File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count_colour(pixels: &[u8], colour: Rgb) -> usize {
        pixels.chunks_exact(3).filter(|p| *p == colour).count()
    }

    #[test]
    fn panels_follow_the_rule_loss_first_then_alphabetical() {
        let rows = rows(vec![
            json!({"epoch": 1, "loss": 0.5, "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.91,
                   "samples_per_sec": 100.0, "seconds": 1.0, "f1": null, "mae": 0.2,
                   "val_mse": 3.0, "name": "run", "top_k_accuracy": null}),
            json!({"epoch": 2, "loss": 0.4, "f1": 0.7, "precision": 0.8, "always_null": null}),
        ]);
        // f1 counts because epoch 2 has a number; val_mse alone gets no panel; strings,
        // all-null keys and the non-metrics are skipped.
        assert_eq!(
            panel_keys(&rows),
            ["loss", "accuracy", "f1", "mae", "precision"]
        );
    }

    #[test]
    fn series_skip_missing_and_keep_the_latest_of_repeated_epochs() {
        let rows = rows(vec![
            json!({"epoch": 2, "loss": 0.4}),
            json!({"epoch": 1, "loss": 0.5}),
            json!({"epoch": 3, "loss": null}),
            json!({"epoch": 4}),
            json!({"epoch": 2, "loss": 0.35}),
            json!({"loss": 0.2}),
        ]);
        let epochs = row_epochs(&rows);
        assert_eq!(epochs, [2.0, 1.0, 3.0, 4.0, 2.0, 6.0]);
        assert_eq!(
            series(&rows, &epochs, "loss"),
            [(1.0, 0.5), (2.0, 0.35), (6.0, 0.2)]
        );
    }

    #[test]
    fn renders_both_series_at_the_expected_size() {
        let dir = scratch_dir("render");
        let out = dir.join("curves.png");
        let summary = plot_rows(&example_rows(), &out).unwrap();
        assert_eq!(summary.panels, ["loss", "accuracy"]);
        assert_eq!(summary.epochs, 10);
        assert_eq!((summary.width, summary.height), (2 * PANEL_W, PANEL_H));
        let (w, h, pixels) = decode(&out);
        assert_eq!((w, h), (summary.width, summary.height));
        assert!(count_colour(&pixels, TRAIN) > 500, "train curve missing");
        assert!(
            count_colour(&pixels, VALIDATION) > 500,
            "validation curve missing"
        );
        assert!(count_colour(&pixels, TEXT) > 500, "no text drawn");
        // Mostly white background.
        assert!(count_colour(&pixels, WHITE) > pixels.len() / 3 * 3 / 4);
    }

    #[test]
    fn panels_wrap_into_two_columns() {
        let mut rows = example_rows();
        for (i, row) in rows.iter_mut().enumerate() {
            row.insert("f1".into(), json!(0.5 + i as f64 / 40.0));
            row.insert("mae".into(), json!(1.0 / (i as f64 + 1.0)));
        }
        let dir = scratch_dir("grid");
        let out = dir.join("grid.png");
        let summary = plot_rows(&rows, &out).unwrap();
        assert_eq!(summary.panels, ["loss", "accuracy", "f1", "mae"]);
        assert_eq!((summary.width, summary.height), (2 * PANEL_W, 2 * PANEL_H));
        assert_eq!(decode(&out).0, summary.width);
    }

    #[test]
    fn a_single_epoch_still_shows_both_points() {
        let dir = scratch_dir("single");
        let out = dir.join("one.png");
        let rows = rows(vec![json!({"epoch": 1, "loss": 0.3, "val_loss": 0.2})]);
        let summary = plot_rows(&rows, &out).unwrap();
        assert_eq!(
            (summary.width, summary.height, summary.epochs),
            (PANEL_W, PANEL_H, 1)
        );
        let (_, _, pixels) = decode(&out);
        // Each marker is a disc plus its legend sample.
        assert!(count_colour(&pixels, TRAIN) > 60);
        assert!(count_colour(&pixels, VALIDATION) > 60);
    }

    #[test]
    fn reads_jsonl_with_blank_lines_and_non_finite_tokens() {
        let dir = scratch_dir("jsonl");
        let input = dir.join("metrics.jsonl");
        std::fs::write(
            &input,
            "{\"epoch\":1,\"loss\":0.7,\"val_loss\":NaN,\"note\":\"NaN stays\"}\n\n\
             {\"epoch\":2,\"loss\":Infinity,\"val_loss\":0.3}\n\
             {\"epoch\":3,\"loss\":0.2,\"val_loss\":-Infinity}\n",
        )
        .unwrap();
        let rows = read_rows(&input).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["note"], json!("NaN stays"));
        assert!(rows[1]["loss"].is_null());
        let summary = plot_metrics_file(&input, &dir.join("m.png")).unwrap();
        assert_eq!(summary.panels, ["loss"]);
        assert_eq!(summary.epochs, 3);
    }

    #[test]
    fn bad_lines_are_reported_with_file_and_line() {
        let dir = scratch_dir("bad");
        let input = dir.join("metrics.jsonl");
        let out = dir.join("never.png");
        let name = input.display().to_string();

        std::fs::write(&input, "{\"epoch\":1,\"loss\":0.5}\n\n[1, 2]\n").unwrap();
        let err = plot_metrics_file(&input, &out).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{name}: line 3: not a JSON object")
        );

        std::fs::write(
            &input,
            "{\"epoch\":1,\"loss\":0.5}\n{\"epoch\":2,\"loss\":}\n",
        )
        .unwrap();
        let err = plot_metrics_file(&input, &out).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{name}: line 2: invalid JSON: expected value (column "
            )),
            "{err}"
        );

        std::fs::write(&input, "\n  \n").unwrap();
        let err = plot_metrics_file(&input, &out).unwrap_err();
        assert_eq!(err.to_string(), format!("{name}: empty: no epochs to plot"));

        std::fs::write(&input, "{\"epoch\":1,\"seconds\":2.0,\"val_loss\":0.1}\n").unwrap();
        let err = plot_metrics_file(&input, &out).unwrap_err();
        assert!(matches!(err, PlotError::NoMetrics { .. }), "{err}");

        let missing = dir.join("absent.jsonl");
        let err = plot_metrics_file(&missing, &out).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn unwritable_output_names_the_png() {
        let dir = scratch_dir("unwritable");
        let out = dir.join("no-such-dir").join("x.png");
        let err = plot_rows(&example_rows(), &out).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: cannot write: ", out.display())),
            "{err}"
        );
        let err = plot_rows(&[], &out).unwrap_err().to_string();
        assert_eq!(err, "rows: empty: no epochs to plot");
    }

    #[test]
    fn value_axis_has_three_to_five_round_ticks_enclosing_the_data() {
        let axis = value_axis(0.8, 0.99);
        assert_eq!(axis.labels, ["0.80", "0.85", "0.90", "0.95", "1.00"]);
        let axis = value_axis(0.05, 0.7);
        assert_eq!(axis.labels, ["0.0", "0.2", "0.4", "0.6", "0.8"]);
        let axis = value_axis(-0.3, 0.2);
        assert_eq!(axis.labels, ["-0.4", "-0.2", "0.0", "0.2"]);
        let axis = value_axis(0.5, 0.5);
        assert!((3..=5).contains(&axis.ticks.len()), "{axis:?}");
        assert!(value_axis(2e-6, 9e-6)
            .labels
            .iter()
            .all(|l| l.contains('e')));
        assert!(value_axis(1.0, 4e7).labels.iter().any(|l| l.contains('e')));

        let mut min = 1e-7;
        while min < 1e9 {
            for factor in [1.001, 1.3, 2.0, 7.7, 55.0] {
                let max = min * factor;
                let axis = value_axis(min, max);
                assert!((3..=5).contains(&axis.ticks.len()), "{min} {max}: {axis:?}");
                assert!(axis.lo <= min && axis.hi >= max, "{min} {max}: {axis:?}");
                let mut labels = axis.labels.clone();
                labels.dedup();
                assert_eq!(labels.len(), axis.labels.len(), "{min} {max}: {axis:?}");
            }
            min *= 3.7;
        }
    }

    #[test]
    fn epoch_axis_uses_integer_ticks_that_fit() {
        let axis = epoch_axis(1.0, 10.0, 400);
        assert_eq!(
            axis.labels,
            ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
        );
        let axis = epoch_axis(1.0, 300.0, 400);
        assert!(axis.ticks.len() <= 10 && axis.ticks.len() >= 3, "{axis:?}");
        assert!(axis.ticks.iter().all(|t| t.fract() == 0.0));
        let axis = epoch_axis(5.0, 5.0, 400);
        assert_eq!(axis.labels, ["4", "5", "6"]);
    }

    #[test]
    fn font_covers_printable_ascii_and_falls_back_to_question_mark() {
        for c in ' '..='~' {
            let lit = font::glyph(c).iter().any(|row| *row != 0);
            assert_eq!(lit, c != ' ', "glyph for {c:?}");
            assert!(font::glyph(c).iter().all(|row| *row < 32));
        }
        assert_eq!(font::glyph('é'), font::glyph('?'));
        assert_eq!(text_width("ab"), (2 * 6 - 1) * SCALE);
        assert_eq!(fit_text("abcdef", text_width("abc..")), "abc..");
    }
}
