//! Datasets the coordinator reads and shards: synthetic, IDX, CSV and NPY, plus the
//! feature normalization fitted on the training split.

use std::io::Read;
use std::path::Path;

use ringtrain_core::rng::{derive_seed, Rng};

use crate::csv_table::{read_csv, LabelColumn};
use crate::error::CoordinatorError;
use crate::job_file::{DataSource, Task};
use crate::npy::{read_npy_features, read_npy_labels};

/// Rows of features with one target each (a class index or a regression value).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// rows x features values, row-major.
    pub x: Vec<f32>,
    /// One target per row.
    pub y: Vec<f32>,
    /// Features per row.
    pub features: usize,
    /// Column names, when the source has them (CSV).
    pub feature_names: Option<Vec<String>>,
    /// Name of the target column, when the source has one (CSV).
    pub label_name: Option<String>,
    /// How to say where row `i` came from in an error: "line 7" for CSV, "element 7"
    /// for arrays.
    pub row_origin: RowOrigin,
    /// Where the data came from, for errors.
    pub origin: String,
}

/// How row numbers map to places in the source file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RowOrigin {
    /// Row i is line i + 2 (a header line, 1-based lines).
    #[default]
    CsvLine,
    /// Row i is array element i.
    Element,
}

impl Dataset {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Where row `i` is, for messages.
    pub fn place(&self, i: usize) -> String {
        match self.row_origin {
            RowOrigin::CsvLine => format!("{}: line {}", self.origin, i + 2),
            RowOrigin::Element => format!("{}: element {i}", self.origin),
        }
    }

    /// Rows `[start, end)` as a new dataset.
    pub fn slice(&self, start: usize, end: usize) -> Dataset {
        Dataset {
            x: self.x[start * self.features..end * self.features].to_vec(),
            y: self.y[start..end].to_vec(),
            ..self.clone_meta()
        }
    }

    fn clone_meta(&self) -> Dataset {
        Dataset {
            x: Vec::new(),
            y: Vec::new(),
            features: self.features,
            feature_names: self.feature_names.clone(),
            label_name: self.label_name.clone(),
            row_origin: self.row_origin,
            origin: self.origin.clone(),
        }
    }

    /// Splits off the last `fraction` of rows (Keras's `validation_split` convention:
    /// the split point is `floor(rows * (1 - fraction))`).
    pub fn split_tail(self, fraction: f64) -> (Dataset, Dataset) {
        let at = (self.rows() as f64 * (1.0 - fraction)).floor() as usize;
        let tail = self.slice(at, self.rows());
        let head = self.slice(0, at);
        (head, tail)
    }

    /// Checks every target is a class index below `classes`; the error names the row.
    pub fn check_classes(&self, classes: usize, field: &str) -> Result<(), CoordinatorError> {
        for (i, &v) in self.y.iter().enumerate() {
            if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < classes) {
                return Err(CoordinatorError::Data {
                    path: self.place(i),
                    message: format!(
                        "label {v} is out of range: {field} needs class indices 0..{} for this model",
                        classes.saturating_sub(1)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Loads a data source. Synthetic data draws its class centres (or regression
    /// weights) from the job `seed` and its samples from `stream`, so the train,
    /// validation and test splits of one job share a distribution but not samples.
    pub fn load(src: &DataSource, seed: u64, stream: u64) -> Result<Dataset, CoordinatorError> {
        match src {
            DataSource::Synthetic {
                samples,
                features,
                classes,
                task,
                noise,
            } => Ok(match task {
                Task::Classification => synthetic(
                    *samples,
                    *features,
                    classes.unwrap_or(2),
                    noise.unwrap_or(2.5),
                    seed,
                    stream,
                ),
                Task::Regression => {
                    synthetic_regression(*samples, *features, noise.unwrap_or(0.1), seed, stream)
                }
            }),
            DataSource::Idx { images, labels } => idx(images, labels),
            DataSource::Csv {
                path,
                label,
                label_index,
                features,
            } => {
                let col = match (label, label_index) {
                    (_, Some(i)) => LabelColumn::Index(*i),
                    (Some(n), None) => LabelColumn::Name(n.clone()),
                    (None, None) => LabelColumn::Name("label".into()),
                };
                let t = read_csv(path, &col, features.as_deref())?;
                let label_name = match col {
                    LabelColumn::Name(n) => Some(n),
                    _ => None,
                };
                Ok(Dataset {
                    features: t.features,
                    x: t.x,
                    y: t.y,
                    feature_names: Some(t.feature_names),
                    label_name,
                    row_origin: RowOrigin::CsvLine,
                    origin: path.display().to_string(),
                })
            }
            DataSource::Npy { features, labels } => {
                let (x, rows, d) = read_npy_features(features)?;
                let y = read_npy_labels(labels)?;
                if y.len() != rows {
                    return Err(CoordinatorError::Data {
                        path: labels.display().to_string(),
                        message: format!(
                            "{} labels for {rows} feature rows in {}",
                            y.len(),
                            features.display()
                        ),
                    });
                }
                Ok(Dataset {
                    x,
                    y,
                    features: d,
                    feature_names: None,
                    label_name: None,
                    row_origin: RowOrigin::Element,
                    origin: labels.display().to_string(),
                })
            }
        }
    }
}

/// Gaussian clusters: class centres drawn N(0, 1) per feature, samples centre + noise·N(0, 1),
/// labels uniform. With 100 features and noise 2.5 the classes are separable to ~97%.
pub fn synthetic(
    samples: usize,
    features: usize,
    classes: usize,
    noise: f64,
    seed: u64,
    stream: u64,
) -> Dataset {
    let mut centres_rng = Rng::new(derive_seed(seed, &[0x4345_4E54])); // "CENT"
    let centres: Vec<f64> = (0..classes * features)
        .map(|_| centres_rng.normal())
        .collect();
    let mut rng = Rng::new(derive_seed(seed, &[0x5341_4D50, stream])); // "SAMP"
    let mut x = Vec::with_capacity(samples * features);
    let mut y = Vec::with_capacity(samples);
    for _ in 0..samples {
        let c = rng.below(classes as u64) as usize;
        y.push(c as f32);
        for f in 0..features {
            x.push((centres[c * features + f] + noise * rng.normal()) as f32);
        }
    }
    Dataset {
        x,
        y,
        features,
        row_origin: RowOrigin::Element,
        origin: "synthetic data".into(),
        ..Dataset::default()
    }
}

/// Regression target y = u + 0.5·sin(2u) + noise·N(0, 1) with u = w·x / sqrt(d), x and w
/// standard normal: smooth, nonlinear, and learnable by a small MLP.
pub fn synthetic_regression(
    samples: usize,
    features: usize,
    noise: f64,
    seed: u64,
    stream: u64,
) -> Dataset {
    let mut wr = Rng::new(derive_seed(seed, &[0x5745_4947])); // "WEIG"
    let w: Vec<f64> = (0..features).map(|_| wr.normal()).collect();
    let mut rng = Rng::new(derive_seed(seed, &[0x5245_4752, stream])); // "REGR"
    let mut x = Vec::with_capacity(samples * features);
    let mut y = Vec::with_capacity(samples);
    let norm = (features as f64).sqrt();
    for _ in 0..samples {
        let mut u = 0.0;
        for wf in &w {
            let v = rng.normal();
            u += wf * v;
            x.push(v as f32);
        }
        u /= norm;
        // `libm::sin`, not the platform's: the data set is a function of the seed alone,
        // the same bits on whichever host regenerates it (as `Rng::normal`).
        y.push((u + 0.5 * libm::sin(2.0 * u) + noise * rng.normal()) as f32);
    }
    Dataset {
        x,
        y,
        features,
        row_origin: RowOrigin::Element,
        origin: "synthetic data".into(),
        ..Dataset::default()
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, CoordinatorError> {
    let raw =
        std::fs::read(path).map_err(CoordinatorError::io(format!("reading {}", path.display())))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| CoordinatorError::Data {
                path: path.display().to_string(),
                message: format!("not a valid gzip file: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads an IDX3 image file (LeCun's MNIST format: big-endian magic 0x00000803, count,
/// rows, columns, then unsigned bytes); pixels are scaled to [0, 1]. Returns the pixels
/// and the features per image.
pub fn idx_images(images: &Path) -> Result<(Vec<f32>, usize), CoordinatorError> {
    let bad = |m: String| CoordinatorError::Data {
        path: images.display().to_string(),
        message: m,
    };
    let img = read_maybe_gz(images)?;
    if img.len() < 16 || be_u32(&img, 0) != 0x0000_0803 {
        return Err(bad(
            "not an IDX3 u8 image file (magic 0x00000803 expected)".into()
        ));
    }
    let (n, r, c) = (
        be_u32(&img, 4) as usize,
        be_u32(&img, 8) as usize,
        be_u32(&img, 12) as usize,
    );
    let features = r * c;
    let expected = n.checked_mul(features).and_then(|v| v.checked_add(16));
    if expected != Some(img.len()) {
        return Err(bad(format!(
            "header says {n} images of {r}x{c} but the file has {} pixel bytes",
            img.len() - 16
        )));
    }
    Ok((
        img[16..].iter().map(|&p| p as f32 / 255.0).collect(),
        features,
    ))
}

/// Reads an IDX1 label file (magic 0x00000801, count, then unsigned bytes).
pub fn idx_labels(labels: &Path) -> Result<Vec<f32>, CoordinatorError> {
    let lab = read_maybe_gz(labels)?;
    if lab.len() < 8 || be_u32(&lab, 0) != 0x0000_0801 {
        return Err(CoordinatorError::Data {
            path: labels.display().to_string(),
            message: "not an IDX1 u8 label file (magic 0x00000801 expected)".into(),
        });
    }
    let m = be_u32(&lab, 4) as usize;
    if lab.len() != 8 + m {
        return Err(CoordinatorError::Data {
            path: labels.display().to_string(),
            message: format!(
                "header says {m} labels but the file has {} label bytes",
                lab.len() - 8
            ),
        });
    }
    Ok(lab[8..].iter().map(|&l| l as f32).collect())
}

/// Reads an IDX image file and its label file as one dataset.
pub fn idx(images: &Path, labels: &Path) -> Result<Dataset, CoordinatorError> {
    let (x, features) = idx_images(images)?;
    let y = idx_labels(labels)?;
    let n = x.len() / features.max(1);
    if y.len() != n {
        return Err(CoordinatorError::Data {
            path: labels.display().to_string(),
            message: format!("{} labels for {n} images in {}", y.len(), images.display()),
        });
    }
    Ok(Dataset {
        x,
        y,
        features,
        row_origin: RowOrigin::Element,
        origin: labels.display().to_string(),
        ..Dataset::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_file::NormalizeKind;
    use ringtrain_core::saved_model::Normalization;

    #[test]
    fn synthetic_is_deterministic_from_the_seed() {
        let a = synthetic(50, 4, 3, 1.0, 7, 0);
        assert_eq!(a, synthetic(50, 4, 3, 1.0, 7, 0));
        assert_ne!(a, synthetic(50, 4, 3, 1.0, 8, 0));
        assert_eq!(a.rows(), 50);
        assert!(a.check_classes(3, "data.train").is_ok());
        assert!(a.check_classes(1, "data.train").is_err());
    }

    #[test]
    fn reads_the_shipped_mnist_subset() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/mnist-10k");
        let d = idx(
            &dir.join("t10k-images-idx3-ubyte.gz"),
            &dir.join("t10k-labels-idx1-ubyte.gz"),
        )
        .unwrap();
        assert_eq!((d.rows(), d.features), (1000, 784));
        d.check_classes(10, "data.test").unwrap();
        assert!(d.x.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn truncated_idx_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        bytes.extend([1, 2, 3]); // 3 pixels, header promises 8
        std::fs::write(&p, bytes).unwrap();
        let e = idx(&p, &p).unwrap_err().to_string();
        assert!(
            e.contains("img") && e.contains("header says 2 images"),
            "{e}"
        );
    }

    #[test]
    fn normalization_uses_the_fitted_statistics() {
        let d = Dataset {
            x: vec![1.0, 10.0, 3.0, 10.0],
            y: vec![0.0, 1.0],
            features: 2,
            ..Dataset::default()
        };
        let s = Normalization::fit(NormalizeKind::Standard, &d.x, d.features);
        let mut x = d.x.clone();
        s.apply(&mut x, 2);
        assert_eq!(x, vec![-1.0, 0.0, 1.0, 0.0]); // constant feature maps to 0
        let m = Normalization::fit(NormalizeKind::Minmax, &d.x, d.features);
        let mut x = vec![2.0, 10.0];
        m.apply(&mut x, 2);
        assert_eq!(x, vec![0.5, 0.0]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Normalization>(&json).unwrap(), s);
    }

    #[test]
    fn splits_share_centres_but_not_samples() {
        // Same job seed, different streams: the class means agree, the rows differ.
        let a = synthetic(4000, 3, 2, 0.5, 9, 0);
        let b = synthetic(4000, 3, 2, 0.5, 9, 1);
        assert_ne!(a.x[..3], b.x[..3]);
        let mean = |d: &Dataset, c: f32| {
            let rows: Vec<usize> = (0..d.rows()).filter(|&i| d.y[i] == c).collect();
            rows.iter().map(|&i| d.x[i * 3] as f64).sum::<f64>() / rows.len() as f64
        };
        assert!((mean(&a, 0.0) - mean(&b, 0.0)).abs() < 0.05);
        assert!((mean(&a, 1.0) - mean(&b, 1.0)).abs() < 0.05);
    }

    #[test]
    fn regression_data_is_deterministic() {
        let a = synthetic_regression(20, 3, 0.1, 5, 0);
        assert_eq!(a, synthetic_regression(20, 3, 0.1, 5, 0));
        assert!(a.y.iter().any(|v| v.fract() != 0.0));
    }

    #[test]
    fn split_tail_follows_keras() {
        let d = synthetic(10, 1, 2, 1.0, 1, 0);
        let (a, b) = d.clone().split_tail(0.25);
        assert_eq!((a.rows(), b.rows()), (7, 3)); // floor(10 * 0.75) = 7
        assert_eq!(b.y, d.y[7..].to_vec());
    }
}
