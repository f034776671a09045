//! Reading (and writing) NumPy `.npy` files.
//!
//! The format: the magic `\x93NUMPY`, a major and minor version byte, the
//! header length (2 bytes little-endian in version 1.0, 4 bytes in 2.0 and
//! 3.0), then the header, a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (60000, 784), }`,
//! then the raw elements. [`read_npy`] accepts little-endian floats
//! (`<f2`, `<f4`, `<f8`), signed and unsigned integers of 1 to 8 bytes and
//! booleans, in C order, and converts them to `f32` (large 64-bit integers
//! lose precision). Every error names the file, says what is wrong and, where
//! there is one, the NumPy call that fixes it.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;

use crate::csv_table::TableError;

/// An array read from a `.npy` file, converted to `f32`, in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The elements, row-major.
    pub data: Vec<f32>,
    /// The dimensions; empty for a 0-d (scalar) array.
    pub shape: Vec<usize>,
}

/// Reads an array of dtype f32, f64, u8 or i64 (little-endian `<f4`, `<f8`,
/// `|u1`, `<i8`; also `<f2`, the other signed and unsigned integer widths and
/// `|b1`), C order only, converting to f32.
///
/// Fortran order, big-endian, structured, object and string dtypes,
/// truncated data or extra bytes after it, and NaN or infinite values
/// (or `f8` values beyond `f32`'s range) are errors naming the file and what
/// is wrong; a bad value is located by its index.
pub fn read_npy(path: &Path) -> Result<NpyArray, TableError> {
    let bytes = std::fs::read(path).map_err(|e| TableError::io(path, e))?;
    parse(&bytes).map_err(|message| TableError::file(path, message))
}

/// Reads a 2-D (rows × features) array; returns the data, rows and features.
///
/// A 1-D array is rejected with a hint to reshape it, as are arrays with no
/// rows or no features.
pub fn read_npy_features(path: &Path) -> Result<(Vec<f32>, usize, usize), TableError> {
    let array = read_npy(path)?;
    let message = match array.shape.as_slice() {
        [0, _] => "holds no rows (shape (0, n)); features need at least one row".to_string(),
        [_, 0] => {
            "holds no features (shape (n, 0)); each row needs at least one feature".to_string()
        }
        &[rows, features] => return Ok((array.data, rows, features)),
        [n] => format!(
            "is 1-D (shape ({n},)), but features must be 2-D (rows × features); \
             for one feature per row save arr.reshape(-1, 1), for a single row arr.reshape(1, -1)"
        ),
        [] => "is 0-d (a scalar), but features must be 2-D (rows × features)".to_string(),
        shape => format!(
            "is {}-D (shape {}), but features must be 2-D (rows × features); \
             flatten each example with arr.reshape(len(arr), -1)",
            shape.len(),
            shape_tuple(shape)
        ),
    };
    Err(TableError::file(path, message))
}

/// Reads labels: a 1-D array, or a 2-D array with one column.
pub fn read_npy_labels(path: &Path) -> Result<Vec<f32>, TableError> {
    let array = read_npy(path)?;
    let message = match array.shape.as_slice() {
        [0] | [0, 1] => "holds no labels (it is empty)".to_string(),
        [_] | [_, 1] => return Ok(array.data),
        [] => "is 0-d (a scalar), but labels must be 1-D (one per row)".to_string(),
        shape => format!(
            "has shape {}, but labels must be 1-D (one per row) or 2-D with one column; \
             for one-hot labels save arr.argmax(axis=1)",
            shape_tuple(shape)
        ),
    };
    Err(TableError::file(path, message))
}

/// Writes `data` (row-major, C order) as a version 1.0 `.npy` file of dtype
/// `<f4` with the given `shape`, as `np.save` would.
///
/// It is an error for `data` not to hold exactly the product of `shape`.
pub fn write_npy_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<(), TableError> {
    let count = element_count(shape);
    if count != Some(data.len()) {
        return Err(TableError::file(
            path,
            format!(
                "cannot write {} values as an array of shape {}",
                data.len(),
                shape_tuple(shape)
            ),
        ));
    }
    let dict = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': {}, }}",
        shape_tuple(shape)
    );
    // Like NumPy: pad the header with spaces and end it with a newline so that
    // the data starts at a multiple of 64 bytes. Version 2.0 only when the
    // header does not fit in 2 length bytes.
    let (version, prefix) = if dict.len() + 1 + 64 <= usize::from(u16::MAX) {
        (1u8, 10usize)
    } else {
        (2u8, 12usize)
    };
    let pad = (64 - (prefix + dict.len() + 1) % 64) % 64;
    let header_len = dict.len() + pad + 1;

    let mut out = Vec::with_capacity(prefix + header_len);
    out.extend_from_slice(b"\x93NUMPY");
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        let len = u16::try_from(header_len)
            .map_err(|_| TableError::file(path, "array header is too long"))?;
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        let len = u32::try_from(header_len)
            .map_err(|_| TableError::file(path, "array header is too long"))?;
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');

    let file = std::fs::File::create(path).map_err(|e| TableError::io(path, e))?;
    let mut writer = std::io::BufWriter::new(file);
    let written = (|| {
        writer.write_all(&out)?;
        for value in data {
            writer.write_all(&value.to_le_bytes())?;
        }
        writer.flush()
    })();
    written.map_err(|e| TableError::io(path, e))
}

/// The element types that can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F2,
    F4,
    F8,
    I1,
    I2,
    I4,
    I8,
    U1,
    U2,
    U4,
    U8,
    Bool,
}

impl Dtype {
    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Dtype::I1 | Dtype::U1 | Dtype::Bool => 1,
            Dtype::F2 | Dtype::I2 | Dtype::U2 => 2,
            Dtype::F4 | Dtype::I4 | Dtype::U4 => 4,
            Dtype::F8 | Dtype::I8 | Dtype::U8 => 8,
        }
    }

    /// Decodes one little-endian element (`b.len() == self.size()`) as f64,
    /// which holds every value of every dtype here except the largest 64-bit
    /// integers, which round.
    #[allow(clippy::cast_precision_loss)]
    fn decode(self, b: &[u8]) -> f64 {
        // Each arm takes exactly the element's bytes; `chunks_exact` guarantees the length.
        fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&b[..N]);
            out
        }
        match self {
            Dtype::F2 => f64::from(f16_to_f32(u16::from_le_bytes(arr(b)))),
            Dtype::F4 => f64::from(f32::from_le_bytes(arr(b))),
            Dtype::F8 => f64::from_le_bytes(arr(b)),
            Dtype::I1 => f64::from(i8::from_le_bytes(arr(b))),
            Dtype::I2 => f64::from(i16::from_le_bytes(arr(b))),
            Dtype::I4 => f64::from(i32::from_le_bytes(arr(b))),
            Dtype::I8 => i64::from_le_bytes(arr(b)) as f64,
            Dtype::U1 => f64::from(b[0]),
            Dtype::U2 => f64::from(u16::from_le_bytes(arr(b))),
            Dtype::U4 => f64::from(u32::from_le_bytes(arr(b))),
            Dtype::U8 => u64::from_le_bytes(arr(b)) as f64,
            Dtype::Bool => f64::from(u8::from(b[0] != 0)),
        }
    }
}

/// Parses a whole `.npy` file; the error is the message without the path.
fn parse(bytes: &[u8]) -> Result<NpyArray, String> {
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err(if bytes.starts_with(b"PK\x03\x04") {
            "is a .npz archive (a zip of arrays), not a .npy file; save the array you \
             need with np.save(path, np.load(archive)[name])"
                .to_string()
        } else {
            "is not a .npy file (it does not start with \\x93NUMPY); save arrays with np.save"
                .to_string()
        });
    }
    let (header_start, header_len) = match bytes.get(6..8) {
        Some([1, _]) => match bytes.get(8..10) {
            Some(&[a, b]) => (10, usize::from(u16::from_le_bytes([a, b]))),
            _ => return Err(truncated_header()),
        },
        Some([2 | 3, _]) => match bytes.get(8..12) {
            Some(&[a, b, c, d]) => (12, u32::from_le_bytes([a, b, c, d]) as usize),
            _ => return Err(truncated_header()),
        },
        Some([major, minor]) => {
            return Err(format!(
                ".npy format version {major}.{minor} is not supported (only 1.0, 2.0 and 3.0)"
            ))
        }
        _ => return Err(truncated_header()),
    };
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .ok_or_else(truncated_header)?;
    let header = std::str::from_utf8(header)
        .map_err(|_| "has a header that is not valid text; is the file corrupt?".to_string())?;
    let (descr, fortran_order, shape) = parse_header(header)?;
    let dtype = parse_descr(&descr)?;
    if fortran_order && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(format!(
            "is stored in Fortran (column-major) order, which is not supported; save it in C \
             order with np.save(path, np.ascontiguousarray(arr)) (shape {})",
            shape_tuple(&shape)
        ));
    }
    // With at most one dimension above 1, Fortran and C order lay out the same bytes.

    let count = element_count(&shape)
        .ok_or_else(|| format!("has an impossible shape {}", shape_tuple(&shape)))?;
    let expected = count
        .checked_mul(dtype.size())
        .ok_or_else(|| format!("has an impossible shape {}", shape_tuple(&shape)))?;
    let data = &bytes[data_start.min(bytes.len())..];
    if data.len() < expected {
        return Err(format!(
            "is truncated: shape {} of '{descr}' needs {expected} bytes of data but only {} \
             are there; write the file again",
            shape_tuple(&shape),
            data.len()
        ));
    }
    if data.len() > expected {
        return Err(format!(
            "has {} unexpected bytes after the data (shape {} of '{descr}' needs {expected}); \
             is the header's shape right?",
            data.len() - expected,
            shape_tuple(&shape)
        ));
    }

    let mut out = Vec::with_capacity(count);
    for (index, element) in data.chunks_exact(dtype.size()).enumerate() {
        let wide = dtype.decode(element);
        let value = wide as f32;
        if !value.is_finite() {
            let what = if wide.is_nan() {
                "is NaN; fill in or drop missing values before saving".to_string()
            } else if wide.is_infinite() {
                "is infinite; fill in or drop bad values before saving".to_string()
            } else {
                format!(
                    "is {wide:e}, out of range for f32 (magnitude at most about 3.4e38); \
                     rescale the data before saving"
                )
            };
            return Err(format!("element {} {what}", locate(index, &shape)));
        }
        out.push(value);
    }
    Ok(NpyArray { data: out, shape })
}

fn truncated_header() -> String {
    "is truncated: its header is incomplete; write the file again".to_string()
}

/// Where a flat (C order) index lies: `arr[2, 5] (row 2, column 5, flat index 17)`.
fn locate(flat: usize, shape: &[usize]) -> String {
    let mut rest = flat;
    let mut index = vec![0usize; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = rest % dim;
            rest /= dim;
        }
    }
    let joined = index
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match index.as_slice() {
        [row, col] => format!("arr[{joined}] (row {row}, column {col}, flat index {flat})"),
        _ => format!("arr[{joined}] (flat index {flat})"),
    }
}

/// The number of elements of `shape`, `None` on overflow.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A shape as Python writes a tuple: `()`, `(3,)`, `(3, 4)`.
fn shape_tuple(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Maps a dtype description such as `<f4` to a [`Dtype`].
fn parse_descr(descr: &str) -> Result<Dtype, String> {
    let unsupported = || {
        format!(
            "has dtype '{descr}', which is not supported (use float16/32/64, int8/16/32/64, \
             uint8/16/32/64 or bool); convert with arr.astype(np.float32)"
        )
    };
    let mut chars = descr.chars();
    let order = chars.next().ok_or_else(unsupported)?;
    let code = chars.as_str();
    let dtype = match code {
        "f2" | "e" => Dtype::F2,
        "f4" | "f" => Dtype::F4,
        "f8" | "d" => Dtype::F8,
        "i1" | "b" => Dtype::I1,
        "i2" | "h" => Dtype::I2,
        "i4" => Dtype::I4,
        "i8" | "q" => Dtype::I8,
        "u1" | "B" => Dtype::U1,
        "u2" | "H" => Dtype::U2,
        "u4" => Dtype::U4,
        "u8" | "Q" => Dtype::U8,
        "b1" | "?" => Dtype::Bool,
        _ if code.starts_with('O') => {
            return Err(format!(
                "holds Python objects (dtype '{descr}'), which cannot be read; save a numeric \
                 array, e.g. np.save(path, arr.astype(np.float32))"
            ))
        }
        _ if code.starts_with(['U', 'S', 'a']) => {
            return Err(format!(
                "holds strings (dtype '{descr}'), not numbers; convert with arr.astype(np.float32)"
            ))
        }
        _ => return Err(unsupported()),
    };
    match order {
        // Byte order does not matter for one-byte elements.
        _ if dtype.size() == 1 && matches!(order, '|' | '<' | '>' | '=') => Ok(dtype),
        // NumPy writes '<' for little-endian; '=' (native) is read as little-endian.
        '<' | '=' => Ok(dtype),
        '>' => Err(format!(
            "is big-endian (dtype '{descr}'), which is not supported; convert with \
             arr.astype('<{code}')"
        )),
        _ => Err(unsupported()),
    }
}

/// The parsed header dict: `descr`, `fortran_order`, `shape`.
fn parse_header(header: &str) -> Result<(String, bool, Vec<usize>), String> {
    let bad = |why: &str| format!("has a malformed header ({why}): {:?}", header.trim_end());
    let mut parser = Literal {
        text: header,
        pos: 0,
    };
    let PyValue::Dict(entries) = parser.value().map_err(|why| bad(&why))? else {
        return Err(bad("not a dict"));
    };
    let find = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| bad(&format!("no '{key}'")))
    };
    let descr = match find("descr")? {
        PyValue::Str(s) => s.clone(),
        PyValue::List(_) => {
            return Err(
                "has a structured dtype (named fields), which is not supported; save \
                        a plain numeric array, e.g. np.save(path, \
                        numpy.lib.recfunctions.structured_to_unstructured(arr))"
                    .to_string(),
            )
        }
        _ => return Err(bad("'descr' is not a string")),
    };
    let fortran_order = match find("fortran_order")? {
        PyValue::Bool(b) => *b,
        _ => return Err(bad("'fortran_order' is not True or False")),
    };
    let shape = match find("shape")? {
        PyValue::Tuple(items) => items
            .iter()
            .map(|item| match item {
                PyValue::Int(n) => Ok(*n),
                _ => Err(bad("'shape' holds a non-integer")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("'shape' is not a tuple")),
    };
    Ok((descr, fortran_order, shape))
}

/// The Python literals that can appear in a `.npy` header.
#[derive(Debug, Clone, PartialEq)]
enum PyValue {
    Str(String),
    Int(usize),
    Bool(bool),
    None,
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    Dict(Vec<(String, PyValue)>),
}

/// A recursive-descent reader of the Python literal subset above.
struct Literal<'a> {
    text: &'a str,
    pos: usize,
}

impl Literal<'_> {
    /// The rest of the text after skipping whitespace.
    fn rest(&mut self) -> &str {
        let rest = &self.text[self.pos..];
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        &self.text[self.pos..]
    }

    /// Consumes `token` if it comes next.
    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<PyValue, String> {
        if self.eat("{") {
            let mut entries = Vec::new();
            while !self.eat("}") {
                let PyValue::Str(key) = self.value()? else {
                    return Err("a key is not a string".to_string());
                };
                if !self.eat(":") {
                    return Err("expected ':'".to_string());
                }
                entries.push((key, self.value()?));
                if !self.eat(",") && !self.rest().starts_with('}') {
                    return Err("expected ',' or '}'".to_string());
                }
            }
            return Ok(PyValue::Dict(entries));
        }
        if self.eat("(") {
            return self.sequence(")").map(PyValue::Tuple);
        }
        if self.eat("[") {
            return self.sequence("]").map(PyValue::List);
        }
        for (word, value) in [
            ("True", PyValue::Bool(true)),
            ("False", PyValue::Bool(false)),
            ("None", PyValue::None),
        ] {
            if self.eat(word) {
                return Ok(value);
            }
        }
        let rest = self.rest();
        match rest.chars().next() {
            Some(quote @ ('\'' | '"')) => {
                // NumPy's headers hold no escapes; a backslash keeps the next character.
                let mut out = String::new();
                let mut chars = rest.char_indices().skip(1);
                while let Some((i, c)) = chars.next() {
                    if c == quote {
                        self.pos += i + 1;
                        return Ok(PyValue::Str(out));
                    }
                    if c == '\\' {
                        if let Some((_, next)) = chars.next() {
                            out.push(next);
                        }
                    } else {
                        out.push(c);
                    }
                }
                Err("a string is not closed".to_string())
            }
            Some(c) if c.is_ascii_digit() => {
                let digits =
                    rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let n = rest[..digits]
                    .parse::<usize>()
                    .map_err(|_| "a number is too large".to_string())?;
                self.pos += digits;
                // Python 2 wrote long integers as `3L`.
                self.eat("L");
                Ok(PyValue::Int(n))
            }
            _ => Err("unexpected text".to_string()),
        }
    }

    /// The items of a tuple or list up to `close` (the opener already eaten).
    fn sequence(&mut self, close: &str) -> Result<Vec<PyValue>, String> {
        let mut items = Vec::new();
        while !self.eat(close) {
            items.push(self.value()?);
            if !self.eat(",") && !self.rest().starts_with(close) {
                return Err(format!("expected ',' or '{close}'"));
            }
        }
        Ok(items)
    }
}

/// Converts an IEEE 754 half-precision value to `f32` (exactly).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    let bits = match exponent {
        0 if mantissa == 0 => sign,
        0 => {
            // Subnormal: mantissa × 2^-24.
            let magnitude = mantissa as f32 / 16_777_216.0;
            return if sign == 0 { magnitude } else { -magnitude };
        }
        0x1f => sign | 0x7f80_0000 | (mantissa << 13),
        _ => sign | ((exponent + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A path in the temporary directory, its file removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            TempFile(std::env::temp_dir().join(format!(
                "ringtrain-npy-test-{}-{}.npy",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            )))
        }

        fn with(bytes: &[u8]) -> Self {
            let file = TempFile::new();
            std::fs::write(&file.0, bytes).unwrap();
            file
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A version 1.0 file with header dict `dict` and raw data `data`.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.as_bytes().to_vec();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out
    }

    fn dict(descr: &str, shape: &str) -> String {
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
    }

    /// Reads `bytes` as a file; the error message with the path checked and removed.
    fn read(bytes: &[u8]) -> Result<NpyArray, String> {
        let file = TempFile::with(bytes);
        read_npy(&file.0).map_err(|e| strip(&file, e))
    }

    fn strip(file: &TempFile, e: TableError) -> String {
        let message = e.to_string();
        let prefix = format!("{}: ", file.0.display());
        assert!(message.starts_with(&prefix), "{message}");
        message[prefix.len()..].to_string()
    }

    #[test]
    fn f32_round_trip_through_writer() {
        let file = TempFile::new();
        let data = [1.5f32, -2.0, 0.0, 3.25e10, f32::MIN_POSITIVE, 7.0];
        write_npy_f32(&file.0, &data, &[2, 3]).unwrap();
        let bytes = std::fs::read(&file.0).unwrap();
        assert_eq!(
            (bytes.len() - 24) % 64,
            0,
            "data starts on a 64-byte boundary"
        );
        let array = read_npy(&file.0).unwrap();
        assert_eq!(array.shape, vec![2, 3]);
        assert_eq!(array.data, data);
        let (x, rows, features) = read_npy_features(&file.0).unwrap();
        assert_eq!((x.as_slice(), rows, features), (&data[..], 2, 3));
    }

    #[test]
    fn writer_handles_1d_and_0d_and_rejects_wrong_lengths() {
        let file = TempFile::new();
        write_npy_f32(&file.0, &[4.0, 5.0], &[2]).unwrap();
        assert_eq!(read_npy_labels(&file.0).unwrap(), vec![4.0, 5.0]);
        write_npy_f32(&file.0, &[9.0], &[]).unwrap();
        assert_eq!(
            read_npy(&file.0).unwrap(),
            NpyArray {
                data: vec![9.0],
                shape: vec![]
            }
        );
        let err = write_npy_f32(&file.0, &[1.0, 2.0, 3.0], &[2, 2]).unwrap_err();
        assert!(strip(&file, err).starts_with("cannot write 3 values as an array of shape (2, 2)"));
    }

    #[test]
    fn f64_u8_i64_and_others_convert() {
        let f64s: Vec<u8> = [0.1f64, -1e300 * 0.0, 2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = read(&npy(&dict("<f8", "(3,)"), &f64s)).unwrap();
        assert_eq!(a.data, vec![0.1f64 as f32, 0.0, 2.5]);

        let a = read(&npy(&dict("|u1", "(2, 2)"), &[0, 1, 128, 255])).unwrap();
        assert_eq!(
            (a.data, a.shape),
            (vec![0.0, 1.0, 128.0, 255.0], vec![2, 2])
        );

        let i64s: Vec<u8> = [-5i64, 0, 1 << 40]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = read(&npy(&dict("<i8", "(3,)"), &i64s)).unwrap();
        assert_eq!(a.data, vec![-5.0, 0.0, (1u64 << 40) as f32]);

        let i32s: Vec<u8> = [-7i32, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            read(&npy(&dict("<i4", "(2,)"), &i32s)).unwrap().data,
            vec![-7.0, 9.0]
        );
        assert_eq!(
            read(&npy(&dict("|i1", "(2,)"), &[0xff, 3])).unwrap().data,
            vec![-1.0, 3.0]
        );
        let u16s: Vec<u8> = [65535u16, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            read(&npy(&dict("<u2", "(2,)"), &u16s)).unwrap().data,
            vec![65535.0, 1.0]
        );
        assert_eq!(
            read(&npy(&dict("|b1", "(3,)"), &[1, 0, 1])).unwrap().data,
            vec![1.0, 0.0, 1.0]
        );
        // Half precision: 1.0, -2.0, the smallest subnormal, 65504.
        let f16s: Vec<u8> = [0x3c00u16, 0xc000, 0x0001, 0x7bff]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            read(&npy(&dict("<f2", "(4,)"), &f16s)).unwrap().data,
            vec![1.0, -2.0, 2f32.powi(-24), 65504.0]
        );
    }

    #[test]
    fn header_variants_parse() {
        // Keys in another order, double quotes, no trailing comma, Python 2 longs.
        let d = "{\"shape\": (1L, 2L), \"fortran_order\": False, \"descr\": \"<f4\"}";
        let data: Vec<u8> = [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = read(&npy(d, &data)).unwrap();
        assert_eq!(a.shape, vec![1, 2]);
        // An empty array.
        let a = read(&npy(&dict("<f4", "(0, 3)"), &[])).unwrap();
        assert_eq!(a.shape, vec![0, 3]);
        assert!(a.data.is_empty());
    }

    #[test]
    fn version_2_and_3_headers() {
        for version in [2u8, 3] {
            let mut header = dict("<f4", "(2,)").into_bytes();
            header.push(b'\n');
            let mut bytes = vec![0x93, b'N', b'U', b'M', b'P', b'Y', version, 0];
            bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&1f32.to_le_bytes());
            bytes.extend_from_slice(&2f32.to_le_bytes());
            assert_eq!(read(&bytes).unwrap().data, vec![1.0, 2.0]);
        }
        let err = read(b"\x93NUMPY\x04\x00\x00\x00\x00\x00").unwrap_err();
        assert!(
            err.starts_with(".npy format version 4.0 is not supported"),
            "{err}"
        );
    }

    #[test]
    fn fortran_order_is_rejected_unless_layout_is_the_same() {
        let d = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }";
        let err = read(&npy(d, &[0; 16])).unwrap_err();
        assert!(
            err.starts_with("is stored in Fortran (column-major) order"),
            "{err}"
        );
        assert!(err.contains("np.ascontiguousarray"), "{err}");
        let d = "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 1), }";
        assert_eq!(read(&npy(d, &[0; 12])).unwrap().shape, vec![3, 1]);
    }

    #[test]
    fn big_endian_object_string_and_structured_dtypes_are_rejected() {
        let err = read(&npy(&dict(">f4", "(1,)"), &[0; 4])).unwrap_err();
        assert!(err.starts_with("is big-endian (dtype '>f4')"), "{err}");
        assert!(err.contains("arr.astype('<f4')"), "{err}");
        // One-byte types have no byte order.
        assert!(read(&npy(&dict(">u1", "(1,)"), &[7])).is_ok());
        let err = read(&npy(&dict("|O", "(1,)"), &[0; 8])).unwrap_err();
        assert!(
            err.starts_with("holds Python objects (dtype '|O')"),
            "{err}"
        );
        let err = read(&npy(&dict("<U3", "(1,)"), &[0; 12])).unwrap_err();
        assert!(err.starts_with("holds strings (dtype '<U3')"), "{err}");
        let err = read(&npy(&dict("<c8", "(1,)"), &[0; 8])).unwrap_err();
        assert!(
            err.starts_with("has dtype '<c8', which is not supported"),
            "{err}"
        );
        let d = "{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order': False, 'shape': (1,), }";
        let err = read(&npy(d, &[0; 8])).unwrap_err();
        assert!(err.starts_with("has a structured dtype"), "{err}");
    }

    #[test]
    fn truncated_and_oversized_data_are_errors() {
        let err = read(&npy(&dict("<f4", "(2, 3)"), &[0; 20])).unwrap_err();
        assert_eq!(
            err,
            "is truncated: shape (2, 3) of '<f4' needs 24 bytes of data but only 20 are there; write the file again"
        );
        let err = read(&npy(&dict("<f4", "(1,)"), &[0; 8])).unwrap_err();
        assert!(
            err.starts_with("has 4 unexpected bytes after the data"),
            "{err}"
        );
        let full = npy(&dict("<f4", "(1,)"), &[0; 4]);
        let err = read(&full[..40]).unwrap_err();
        assert!(
            err.starts_with("is truncated: its header is incomplete"),
            "{err}"
        );
        let err = read(&full[..9]).unwrap_err();
        assert!(
            err.starts_with("is truncated: its header is incomplete"),
            "{err}"
        );
    }

    #[test]
    fn not_npy_files_are_recognised() {
        let err = read(b"a,b\n1,2\n").unwrap_err();
        assert!(err.starts_with("is not a .npy file"), "{err}");
        let err = read(b"PK\x03\x04rest").unwrap_err();
        assert!(err.starts_with("is a .npz archive"), "{err}");
    }

    #[test]
    fn malformed_headers_are_errors() {
        for d in [
            "{'descr': '<f4', 'shape': (1,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,), }",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }",
            "{'descr': '<f4' 'fortran_order': False, 'shape': (1,), }",
            "['descr']",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
        ] {
            let err = read(&npy(d, &[0; 4])).unwrap_err();
            assert!(err.starts_with("has a malformed header"), "{d}: {err}");
        }
        let d = "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }";
        let err = read(&npy(d, &[])).unwrap_err();
        assert!(err.starts_with("has an impossible shape"), "{err}");
    }

    #[test]
    fn nan_and_infinity_are_located() {
        let values = [1f32, 2.0, 3.0, 4.0, f32::NAN, 6.0];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let err = read(&npy(&dict("<f4", "(2, 3)"), &data)).unwrap_err();
        assert!(
            err.starts_with("element arr[1, 1] (row 1, column 1, flat index 4) is NaN"),
            "{err}"
        );
        let data: Vec<u8> = [0f64, f64::NEG_INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let err = read(&npy(&dict("<f8", "(2,)"), &data)).unwrap_err();
        assert!(
            err.starts_with("element arr[1] (flat index 1) is infinite"),
            "{err}"
        );
        let data: Vec<u8> = [1e300f64].iter().flat_map(|v| v.to_le_bytes()).collect();
        let err = read(&npy(&dict("<f8", "(1, 1, 1)"), &data)).unwrap_err();
        assert!(
            err.starts_with("element arr[0, 0, 0] (flat index 0) is 1e300, out of range for f32"),
            "{err}"
        );
    }

    #[test]
    fn features_must_be_2d() {
        let file = TempFile::new();
        write_npy_f32(&file.0, &[1.0, 2.0, 3.0], &[3]).unwrap();
        let err = strip(&file, read_npy_features(&file.0).unwrap_err());
        assert!(
            err.starts_with("is 1-D (shape (3,)), but features must be 2-D"),
            "{err}"
        );
        assert!(err.contains("arr.reshape(-1, 1)"), "{err}");
        write_npy_f32(&file.0, &[0.0; 8], &[2, 2, 2]).unwrap();
        let err = strip(&file, read_npy_features(&file.0).unwrap_err());
        assert!(err.starts_with("is 3-D (shape (2, 2, 2))"), "{err}");
        write_npy_f32(&file.0, &[], &[0, 4]).unwrap();
        let err = strip(&file, read_npy_features(&file.0).unwrap_err());
        assert!(err.starts_with("holds no rows"), "{err}");
    }

    #[test]
    fn labels_are_1d_or_one_column() {
        let file = TempFile::new();
        write_npy_f32(&file.0, &[1.0, 0.0], &[2, 1]).unwrap();
        assert_eq!(read_npy_labels(&file.0).unwrap(), vec![1.0, 0.0]);
        write_npy_f32(&file.0, &[1.0, 0.0, 0.0, 1.0], &[2, 2]).unwrap();
        let err = strip(&file, read_npy_labels(&file.0).unwrap_err());
        assert!(
            err.starts_with("has shape (2, 2), but labels must be 1-D"),
            "{err}"
        );
        write_npy_f32(&file.0, &[], &[0]).unwrap();
        let err = strip(&file, read_npy_labels(&file.0).unwrap_err());
        assert!(err.starts_with("holds no labels"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = std::env::temp_dir().join("ringtrain-npy-test-does-not-exist.npy");
        let err = read_npy(&path).unwrap_err();
        assert!(matches!(err, TableError::Io { .. }));
        assert!(err
            .to_string()
            .starts_with(&format!("{}: ", path.display())));
    }

    #[test]
    fn f16_conversion_matches_all_finite_halves() {
        // Compare against a straightforward formula for every finite half value.
        for h in 0u16..=u16::MAX {
            let exponent = (h >> 10) & 0x1f;
            if exponent == 0x1f {
                assert!(!f16_to_f32(h).is_finite());
                continue;
            }
            let mantissa = f64::from(h & 0x3ff);
            let magnitude = if exponent == 0 {
                mantissa * 2f64.powi(-24)
            } else {
                (1.0 + mantissa / 1024.0) * 2f64.powi(i32::from(exponent) - 15)
            };
            let expected = if h >> 15 == 1 { -magnitude } else { magnitude };
            assert_eq!(f64::from(f16_to_f32(h)), expected, "{h:#06x}");
        }
    }
}
