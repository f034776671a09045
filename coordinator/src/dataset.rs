//! Datasets the coordinator reads and shards: synthetic Gaussian clusters and IDX files.

use std::io::Read;
use std::path::Path;

use ringtrain_worker::rng::{derive_seed, Rng};

use crate::error::CoordinatorError;
use crate::job_file::DataSource;

/// Rows of features with integer class labels, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// rows x features values.
    pub x: Vec<f32>,
    /// One label per row.
    pub y: Vec<u32>,
    /// Features per row.
    pub features: usize,
}

impl Dataset {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Number of classes implied by the labels (max + 1).
    pub fn classes(&self) -> usize {
        self.y.iter().max().map(|&m| m as usize + 1).unwrap_or(0)
    }

    /// Rows `[start, end)` as a new dataset.
    pub fn slice(&self, start: usize, end: usize) -> Dataset {
        Dataset {
            x: self.x[start * self.features..end * self.features].to_vec(),
            y: self.y[start..end].to_vec(),
            features: self.features,
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

    /// Loads a data source; `seed` drives synthetic data.
    pub fn load(src: &DataSource, seed: u64) -> Result<Dataset, CoordinatorError> {
        match src {
            DataSource::Synthetic {
                samples,
                features,
                classes,
                noise,
            } => Ok(synthetic(
                *samples,
                *features,
                *classes,
                noise.unwrap_or(2.5),
                seed,
            )),
            DataSource::Idx { images, labels } => idx(images, labels),
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
) -> Dataset {
    let mut centres_rng = Rng::new(derive_seed(seed, &[0x4345_4E54])); // "CENT"
    let centres: Vec<f64> = (0..classes * features)
        .map(|_| centres_rng.normal())
        .collect();
    let mut rng = Rng::new(derive_seed(seed, &[0x5341_4D50])); // "SAMP"
    let mut x = Vec::with_capacity(samples * features);
    let mut y = Vec::with_capacity(samples);
    for _ in 0..samples {
        let c = rng.below(classes as u64) as usize;
        y.push(c as u32);
        for f in 0..features {
            x.push((centres[c * features + f] + noise * rng.normal()) as f32);
        }
    }
    Dataset { x, y, features }
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

/// Reads an IDX3 image file and an IDX1 label file (LeCun's MNIST format: big-endian
/// magic 0x00000803 / 0x00000801, dimensions, then unsigned bytes).
pub fn idx(images: &Path, labels: &Path) -> Result<Dataset, CoordinatorError> {
    let bad = |p: &Path, m: String| CoordinatorError::Data {
        path: p.display().to_string(),
        message: m,
    };
    let img = read_maybe_gz(images)?;
    if img.len() < 16 || be_u32(&img, 0) != 0x0000_0803 {
        return Err(bad(
            images,
            "not an IDX3 u8 image file (magic 0x00000803 expected)".into(),
        ));
    }
    let (n, r, c) = (
        be_u32(&img, 4) as usize,
        be_u32(&img, 8) as usize,
        be_u32(&img, 12) as usize,
    );
    let features = r * c;
    if img.len() != 16 + n * features {
        return Err(bad(
            images,
            format!(
                "header says {n} images of {r}x{c} but the file has {} pixel bytes",
                img.len() - 16
            ),
        ));
    }
    let lab = read_maybe_gz(labels)?;
    if lab.len() < 8 || be_u32(&lab, 0) != 0x0000_0801 {
        return Err(bad(
            labels,
            "not an IDX1 u8 label file (magic 0x00000801 expected)".into(),
        ));
    }
    let m = be_u32(&lab, 4) as usize;
    if lab.len() != 8 + m || m != n {
        return Err(bad(
            labels,
            format!(
                "{m} labels (file has {} bytes) for {n} images in {}",
                lab.len() - 8,
                images.display()
            ),
        ));
    }
    Ok(Dataset {
        x: img[16..].iter().map(|&p| p as f32 / 255.0).collect(),
        y: lab[8..].iter().map(|&l| l as u32).collect(),
        features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_from_the_seed() {
        let a = synthetic(50, 4, 3, 1.0, 7);
        assert_eq!(a, synthetic(50, 4, 3, 1.0, 7));
        assert_ne!(a, synthetic(50, 4, 3, 1.0, 8));
        assert_eq!(a.rows(), 50);
        assert!(a.classes() <= 3);
    }

    #[test]
    fn reads_the_shipped_mnist_subset() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/mnist-10k");
        let d = idx(
            &dir.join("t10k-images-idx3-ubyte.gz"),
            &dir.join("t10k-labels-idx1-ubyte.gz"),
        )
        .unwrap();
        assert_eq!((d.rows(), d.features, d.classes()), (1000, 784, 10));
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
    fn split_tail_follows_keras() {
        let d = synthetic(10, 1, 2, 1.0, 1);
        let (a, b) = d.clone().split_tail(0.25);
        assert_eq!((a.rows(), b.rows()), (7, 3)); // floor(10 * 0.75) = 7
        assert_eq!(b.y, d.y[7..].to_vec());
    }
}
