//! Reading numeric training tables from CSV files.
//!
//! [`read_csv`] turns a CSV file with a header row into a dense `f32`
//! [`Table`]: one label column (or none, at predict time) and the feature
//! columns, either all the others or an explicit list chosen by header name.
//!
//! The `csv` crate does the tokenizing (RFC 4180: comma separated,
//! `"`-quoted fields that may hold commas, doubled quotes and line breaks);
//! this module adds what a training table needs on top: an optional UTF-8
//! byte order mark is skipped, every field is trimmed (so CRLF line ends read
//! like LF), blank lines are allowed only at the end, rows must have as many
//! fields as the header, a quote left open at the end of the file is an error,
//! and every error ([`TableError`]) names the file, the 1-based line where the
//! row starts (the header is line 1) and, for a cell, the column by name and
//! 1-based position, and says what to do about it.
//!
//! Malformed quoting that `csv` reads leniently is not rejected by itself:
//! text after a closing quote (`"1"x`) joins the field (`1x`), and a quote
//! after leading spaces (` "2"`) is literal. Such a cell is then reported as
//! not a number, with its line and column, unless it is outside the columns
//! read.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A problem reading a data file (CSV or `.npy`): which file, where in it,
/// what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// One cell of a CSV file is unusable.
    #[error("{}: line {line}, column {column} ({name:?}): {message}", .path.display())]
    Cell {
        /// The file.
        path: PathBuf,
        /// The 1-based line where the row starts (the header is line 1).
        line: usize,
        /// The 1-based column position.
        column: usize,
        /// The column's header name.
        name: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// One line (row) of a CSV file is unusable as a whole.
    #[error("{}: line {line}: {message}", .path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The 1-based line (the header is line 1).
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },
    /// The file as a whole is unusable: a bad header, a wrong shape or dtype,
    /// a label or feature that does not exist, a value that is not finite.
    #[error("{}: {message}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

impl TableError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TableError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A problem with the file as a whole.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        TableError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            TableError::Io { path, .. }
            | TableError::Cell { path, .. }
            | TableError::Line { path, .. }
            | TableError::File { path, .. } => path,
        }
    }
}

/// Which column holds the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    /// The column with this header name.
    Name(String),
    /// The column at this 0-based position (the first column is 0).
    Index(usize),
    /// No label column (predict time): every column may be a feature.
    None,
}

/// A numeric table read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The features, rows × features, row-major.
    pub x: Vec<f32>,
    /// The label of each row; empty when read with [`LabelColumn::None`].
    pub y: Vec<f32>,
    /// How many features each row has (the row stride of `x`).
    pub features: usize,
    /// The header name of each feature column, in the order of `x`'s columns.
    pub feature_names: Vec<String>,
}

impl Table {
    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.x.len().checked_div(self.features).unwrap_or(0)
    }
}

/// Reads a CSV with a header row. All columns other than the label are
/// features unless `features` lists (by header name) exactly which ones to
/// use, in that order.
///
/// Only the label and the feature columns are parsed, so columns left out of
/// an explicit `features` list (ids, free text) may hold anything. Values are
/// parsed as `f64` and converted to `f32`; empty cells, NaN, infinities,
/// non-numbers and values beyond `f32`'s range are errors, as are ragged rows
/// and blank lines other than at the end of the file. A file with a header
/// but no data rows is an error too.
pub fn read_csv(
    path: &Path,
    label: &LabelColumn,
    features: Option<&[String]>,
) -> Result<Table, TableError> {
    let mut records = Records::open(path)?;

    // The header: required, and it fixes the number of fields of every row.
    let header = match records.next()? {
        Some(row) if !row.blank && row.blank_before.is_none() => records.to_strings(),
        _ => {
            return Err(TableError::file(
                path,
                "is empty; expected a header row naming the columns, then one row per example",
            ))
        }
    };
    let columns = Columns {
        path,
        names: &header,
    };
    let label_col = columns.label(label)?;
    let feature_cols = columns.features(features, label_col)?;

    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut rows = 0usize;
    // A blank line is fine only if nothing but blank lines follows it.
    let mut first_blank: Option<usize> = None;
    while let Some(row) = records.next()? {
        if let Some(line) = row.blank_before {
            first_blank.get_or_insert(line);
        }
        if row.blank {
            first_blank.get_or_insert(row.line);
            continue;
        }
        if let Some(line) = first_blank {
            return Err(TableError::Line {
                path: path.to_path_buf(),
                line,
                message: "is blank; blank lines are only allowed at the end of the file \
                          (remove it)"
                    .to_string(),
            });
        }
        if records.len() != header.len() {
            return Err(TableError::Line {
                path: path.to_path_buf(),
                line: row.line,
                message: format!(
                    "has {} fields, the header has {} (ragged row); look for a missing or \
                     extra comma, and quote values that contain commas",
                    records.len(),
                    header.len()
                ),
            });
        }
        for &col in &feature_cols {
            x.push(columns.cell(records.field(col), col, row.line, false)?);
        }
        if let Some(col) = label_col {
            y.push(columns.cell(records.field(col), col, row.line, true)?);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(TableError::file(
            path,
            "has a header but no data rows; add one row per example below the header",
        ));
    }

    Ok(Table {
        x,
        y,
        features: feature_cols.len(),
        feature_names: feature_cols.iter().map(|&c| header[c].clone()).collect(),
    })
}

/// The header of a file, for resolving column names and reporting cells.
struct Columns<'a> {
    path: &'a Path,
    names: &'a [String],
}

impl Columns<'_> {
    /// The 0-based position of the label column, if any.
    fn label(&self, label: &LabelColumn) -> Result<Option<usize>, TableError> {
        match label {
            LabelColumn::None => Ok(None),
            LabelColumn::Index(i) if *i < self.names.len() => Ok(Some(*i)),
            LabelColumn::Index(i) => Err(TableError::file(
                self.path,
                format!(
                    "label column index {i} is out of range: the header has {} column(s), \
                     indices 0 to {} (columns: {})",
                    self.names.len(),
                    self.names.len().saturating_sub(1),
                    self.listing()
                ),
            )),
            LabelColumn::Name(name) => self.find("label column", name).map(Some),
        }
    }

    /// The 0-based positions of the feature columns, in output order.
    fn features(
        &self,
        features: Option<&[String]>,
        label: Option<usize>,
    ) -> Result<Vec<usize>, TableError> {
        let cols: Vec<usize> = match features {
            None => (0..self.names.len())
                .filter(|&c| Some(c) != label)
                .collect(),
            Some(list) => {
                let mut cols = Vec::with_capacity(list.len());
                for name in list {
                    let col = self.find("feature column", name)?;
                    if Some(col) == label {
                        return Err(TableError::file(
                            self.path,
                            format!(
                                "feature column {name:?} is also the label column; \
                                 remove it from the features"
                            ),
                        ));
                    }
                    if cols.contains(&col) {
                        return Err(TableError::file(
                            self.path,
                            format!(
                                "feature column {name:?} is listed more than once in the \
                                 features; list each column once"
                            ),
                        ));
                    }
                    cols.push(col);
                }
                cols
            }
        };
        if cols.is_empty() {
            let why = if features.is_some() {
                "the features list is empty; name at least one column".to_string()
            } else {
                format!(
                    "has no feature columns: the only column is the label (columns: {})",
                    self.listing()
                )
            };
            return Err(TableError::file(self.path, why));
        }
        Ok(cols)
    }

    /// The unique column named `name`; `what` says what it is for.
    fn find(&self, what: &str, name: &str) -> Result<usize, TableError> {
        let name = name.trim();
        let hits: Vec<usize> = (0..self.names.len())
            .filter(|&c| self.names[c] == name)
            .collect();
        match hits.as_slice() {
            [col] => Ok(*col),
            [] => {
                let mut message = format!(
                    "{what} {name:?} is not in the header (columns: {})",
                    self.listing()
                );
                if let Some(c) = self.names.iter().find(|n| n.eq_ignore_ascii_case(name)) {
                    message.push_str(&format!("; did you mean {c:?}?"));
                } else if let Some(hint) = self.separator_hint() {
                    message.push_str(&hint);
                }
                Err(TableError::file(self.path, message))
            }
            many => Err(TableError::file(
                self.path,
                format!(
                    "{what} {name:?} is ambiguous: the header has it at columns {}; \
                     rename the duplicates",
                    many.iter()
                        .map(|c| (c + 1).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// The header names for an error message, shortened when there are many.
    fn listing(&self) -> String {
        const SHOWN: usize = 20;
        let mut out = self
            .names
            .iter()
            .take(SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if self.names.len() > SHOWN {
            out.push_str(&format!(", … and {} more", self.names.len() - SHOWN));
        }
        out
    }

    /// A hint for the common mistake of a file separated by something other
    /// than commas, which reads as a single column.
    fn separator_hint(&self) -> Option<String> {
        let [only] = self.names else { return None };
        [(';', "semicolons"), ('\t', "tabs"), ('|', "pipes")]
            .iter()
            .find(|(c, _)| only.contains(*c))
            .map(|(_, what)| {
                format!("; the file seems to be separated by {what}, but only commas are supported")
            })
    }

    /// Parses `raw`, the (trimmed) cell at 0-based column `col` of the row that
    /// starts on `line`.
    fn cell(&self, raw: &[u8], col: usize, line: usize, is_label: bool) -> Result<f32, TableError> {
        parse_number(raw).map_err(|problem| {
            let shown = shorten(&String::from_utf8_lossy(raw));
            let message = match problem {
                Problem::Empty => "is empty; every feature and label cell needs a number \
                                   (fill in or drop rows with missing values)"
                    .to_string(),
                Problem::NotFinite => format!(
                    "{shown:?} is not a finite number; NaN and infinity are not allowed \
                     (fill in or drop rows with missing values)"
                ),
                Problem::OutOfRange => format!(
                    "{shown:?} is out of range for f32 (magnitude at most about 3.4e38); \
                     rescale the column"
                ),
                Problem::NotANumber if is_label => format!(
                    "{shown:?} is not a number; the label must be numeric \
                     (encode classes as 0, 1, 2, …)"
                ),
                Problem::NotANumber => format!(
                    "{shown:?} is not a number; encode the column as numbers or leave it \
                     out of the features"
                ),
            };
            TableError::Cell {
                path: self.path.to_path_buf(),
                line,
                column: col + 1,
                name: self.names[col].clone(),
                message,
            }
        })
    }
}

/// Why a cell is not a usable number.
enum Problem {
    Empty,
    NotANumber,
    NotFinite,
    OutOfRange,
}

/// Parses one (already trimmed) cell: as `f64`, then converted to `f32`.
fn parse_number(raw: &[u8]) -> Result<f32, Problem> {
    if raw.is_empty() {
        return Err(Problem::Empty);
    }
    // Fast path for plain integers (pixel values, class ids): up to 15 digits
    // are exact in f64, so this gives the same result as the general parse.
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, raw),
    };
    if !digits.is_empty() && digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit) {
        let magnitude = digits
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        // Exact: magnitude < 10^15 < 2^53.
        #[allow(clippy::cast_precision_loss)]
        let value = magnitude as f64;
        return Ok((if negative { -value } else { value }) as f32);
    }
    let text = std::str::from_utf8(raw).map_err(|_| Problem::NotANumber)?;
    let value: f64 = text.parse().map_err(|_| Problem::NotANumber)?;
    if !value.is_finite() {
        return Err(Problem::NotFinite);
    }
    let single = value as f32;
    if !single.is_finite() {
        return Err(Problem::OutOfRange);
    }
    Ok(single)
}

/// `text` cut to a length fit for an error message.
fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Where a record sits in the file.
struct Row {
    /// The 1-based line of its first byte.
    line: usize,
    /// The record is one field of nothing but whitespace (a blank line).
    blank: bool,
    /// The first of the empty lines just before the record, which `csv` skips
    /// without returning a record.
    blank_before: Option<usize>,
}

/// CSV records read by the `csv` crate, with the line each one starts on.
///
/// `csv` counts `\n` bytes as it goes but stamps a record with the position
/// before any empty lines it skipped, so the start line is worked out from the
/// count before and after the record: the difference is the skipped empty
/// lines, the line breaks inside (quoted) fields, and the record's own line
/// end, which only the last record can lack. Only `\n` ends a record; a `\r`
/// before it is trailing whitespace of the last field, trimmed like any other,
/// so line counts are the same for CRLF files.
struct Records<'p> {
    reader: csv::Reader<Source<io::Chain<io::Cursor<Vec<u8>>, File>>>,
    record: csv::ByteRecord,
    path: &'p Path,
}

impl<'p> Records<'p> {
    fn open(path: &'p Path) -> Result<Self, TableError> {
        let mut file = File::open(path).map_err(|e| TableError::io(path, e))?;
        let mut head = Vec::with_capacity(3);
        file.by_ref()
            .take(3)
            .read_to_end(&mut head)
            .map_err(|e| TableError::io(path, e))?;
        if head == b"\xEF\xBB\xBF" {
            // A UTF-8 byte order mark, as spreadsheet programs write.
            head.clear();
        }
        let reader = csv::ReaderBuilder::new()
            .has_headers(false)
            // Ragged rows get our own error, which says what to look for.
            .flexible(true)
            .terminator(csv::Terminator::Any(b'\n'))
            .buffer_capacity(1 << 16)
            .from_reader(Source::new(io::Cursor::new(head).chain(file)));
        Ok(Records {
            reader,
            record: csv::ByteRecord::new(),
            path,
        })
    }

    /// Reads the next record; `None` at the end of the file.
    fn next(&mut self) -> Result<Option<Row>, TableError> {
        let before = self.reader.position().line();
        let more = self
            .reader
            .read_byte_record(&mut self.record)
            .map_err(|e| {
                // With flexible records and bytes (not strings) only I/O can fail.
                let message = format!("cannot be read as CSV: {e}");
                match e.into_kind() {
                    csv::ErrorKind::Io(io) => TableError::io(self.path, io),
                    _ => TableError::file(self.path, message),
                }
            })?;
        if !more {
            return Ok(None);
        }
        let end = self.reader.position();
        let source = self.reader.get_ref();
        let at_eof = source.eof && end.byte() == source.total;
        let last_field = self.record.iter().next_back().unwrap_or_default();
        // A quote left open swallows the rest of the file, its final line break
        // included; a closed field that ends in a line break is followed by its
        // closing quote, so the file does not end in that line break alone.
        let unclosed = at_eof && last_field.ends_with(b"\n") && source.last_non_space != Some(b'"');
        let terminated = !(at_eof && (source.last != Some(b'\n') || unclosed));
        let inner_breaks = self
            .record
            .as_slice()
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        let consumed = usize::try_from(end.line().saturating_sub(before)).unwrap_or(usize::MAX);
        let skipped = consumed.saturating_sub(inner_breaks + usize::from(terminated));
        let first = usize::try_from(before).unwrap_or(usize::MAX);
        let line = first + skipped;
        if unclosed {
            return Err(TableError::Line {
                path: self.path.to_path_buf(),
                line,
                message: "has a quoted field that is never closed; add the closing quote (\")"
                    .to_string(),
            });
        }
        Ok(Some(Row {
            line,
            blank: self.record.len() == 1 && last_field.trim_ascii().is_empty(),
            blank_before: (skipped > 0).then_some(first),
        }))
    }

    /// The number of fields of the current record.
    fn len(&self) -> usize {
        self.record.len()
    }

    /// The trimmed bytes of the current record's 0-based field `i` (empty past the end).
    fn field(&self, i: usize) -> &[u8] {
        self.record.get(i).unwrap_or_default().trim_ascii()
    }

    /// The current record's fields as strings (for the header; invalid UTF-8 is replaced).
    fn to_strings(&self) -> Vec<String> {
        (0..self.len())
            .map(|i| String::from_utf8_lossy(self.field(i)).into_owned())
            .collect()
    }
}

/// The file's bytes as `csv` reads them (after any byte order mark), noting
/// what tells where the last record ends: how many bytes went out, whether the
/// end of the file was reached, and the last byte and last non-whitespace byte.
struct Source<R> {
    inner: R,
    total: u64,
    eof: bool,
    last: Option<u8>,
    last_non_space: Option<u8>,
}

impl<R> Source<R> {
    fn new(inner: R) -> Self {
        Source {
            inner,
            total: 0,
            eof: false,
            last: None,
            last_non_space: None,
        }
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = buf.get(..n).unwrap_or_default();
        if got.is_empty() {
            self.eof |= !buf.is_empty();
            return Ok(n);
        }
        self.total += n as u64;
        self.last = got.last().copied();
        if let Some(&b) = got.iter().rev().find(|b| !b.is_ascii_whitespace()) {
            self.last_non_space = Some(b);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A file in the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(content: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "ringtrain-csv-test-{}-{}.csv",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn read(content: &str, label: LabelColumn, features: Option<&[&str]>) -> Result<Table, String> {
        let file = TempFile::new(content);
        let features: Option<Vec<String>> =
            features.map(|f| f.iter().map(|s| s.to_string()).collect());
        read_csv(&file.0, &label, features.as_deref()).map_err(|e| {
            let message = e.to_string();
            // Every error names the file.
            assert!(
                message.starts_with(&format!("{}: ", file.0.display())),
                "{message}"
            );
            message[file.0.display().to_string().len() + 2..].to_string()
        })
    }

    fn name(n: &str) -> LabelColumn {
        LabelColumn::Name(n.to_string())
    }

    #[test]
    fn reads_label_by_name_and_all_other_columns() {
        let t = read("a,target,b\n1,0,2\n3,1,4.5\n", name("target"), None).unwrap();
        assert_eq!(t.x, vec![1.0, 2.0, 3.0, 4.5]);
        assert_eq!(t.y, vec![0.0, 1.0]);
        assert_eq!(t.features, 2);
        assert_eq!(t.feature_names, vec!["a", "b"]);
        assert_eq!(t.rows(), 2);
    }

    #[test]
    fn reads_label_by_index() {
        let t = read("a,b,c\n1,2,3\n", LabelColumn::Index(2), None).unwrap();
        assert_eq!(t.x, vec![1.0, 2.0]);
        assert_eq!(t.y, vec![3.0]);
    }

    #[test]
    fn without_label_every_column_is_a_feature() {
        let t = read("a,b\n1,2\n3,4\n", LabelColumn::None, None).unwrap();
        assert_eq!(t.x, vec![1.0, 2.0, 3.0, 4.0]);
        assert!(t.y.is_empty());
        assert_eq!(t.features, 2);
    }

    #[test]
    fn explicit_features_pick_and_order_columns_and_skip_the_rest() {
        let csv = "id,a,b,y,c\nrow-1,1,2,0,3\nrow-2,4,5,1,6\n";
        let t = read(csv, name("y"), Some(&["c", "a"])).unwrap();
        assert_eq!(t.x, vec![3.0, 1.0, 6.0, 4.0]);
        assert_eq!(t.y, vec![0.0, 1.0]);
        assert_eq!(t.feature_names, vec!["c", "a"]);
    }

    #[test]
    fn trims_fields_and_accepts_crlf_bom_and_trailing_blank_lines() {
        let csv = "\u{feff} a , y \r\n 1.5 ,\t2 \r\n-3e2,+4\r\n\r\n  \n\n";
        let t = read(csv, name("y"), None).unwrap();
        assert_eq!(t.x, vec![1.5, -300.0]);
        assert_eq!(t.y, vec![2.0, 4.0]);
        assert_eq!(t.feature_names, vec!["a"]);
    }

    #[test]
    fn no_trailing_newline() {
        let t = read("a,y\n1,2", name("y"), None).unwrap();
        assert_eq!(t.x, vec![1.0]);
    }

    #[test]
    fn quoted_fields() {
        let csv = "\"name, with comma\",\"say \"\"hi\"\"\",y\n\"1\",\" 2 \" ,\"3\"\n";
        let t = read(csv, name("y"), None).unwrap();
        assert_eq!(t.feature_names, vec!["name, with comma", "say \"hi\""]);
        assert_eq!(t.x, vec![1.0, 2.0]);
        assert_eq!(t.y, vec![3.0]);
    }

    #[test]
    fn quoted_field_spanning_lines_and_line_numbers_after_it() {
        let csv = "note,a,y\n\"two\nlines\",1,0\n\"x\",abc,1\n";
        let err = read(csv, name("y"), Some(&["a"])).unwrap_err();
        assert_eq!(err, "line 4, column 2 (\"a\"): \"abc\" is not a number; encode the column as numbers or leave it out of the features");
    }

    #[test]
    fn unterminated_quote() {
        let err = read("a,y\n1,2\n\"3,4\n5,6\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 3: has a quoted field that is never closed"),
            "{err}"
        );
    }

    /// `csv` reads malformed quoting leniently (there is no strict mode,
    /// BurntSushi/rust-csv#77): text after a closing quote joins the field and a
    /// quote after leading spaces is literal. In a column that is read, that is
    /// still an error naming the line and column.
    #[test]
    fn malformed_quoting_in_a_read_column_is_a_cell_error() {
        let err = read("a,y\n\"1\"x,2\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2, column 1 (\"a\"): \"1x\" is not a number"),
            "{err}"
        );
        let err = read("a,b,y\n1, \"2\",3\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2, column 2 (\"b\"): \"\\\"2\\\"\" is not a number"),
            "{err}"
        );
    }

    #[test]
    fn unterminated_quote_in_a_column_not_read_is_still_an_error() {
        let csv = "a,y,note\n1,2,\"x\n3,4,z\n";
        let err = read(csv, name("y"), Some(&["a"])).unwrap_err();
        assert!(
            err.starts_with("line 2: has a quoted field that is never closed"),
            "{err}"
        );
        // Closed, with a line break just before the closing quote, on the last row.
        for csv in ["a,y,note\n1,2,\"x\n\"\n", "a,y,note\r\n1,2,\"x\r\n\" \r\n"] {
            let t = read(csv, name("y"), Some(&["a"])).unwrap();
            assert_eq!((t.x, t.y), (vec![1.0], vec![2.0]));
        }
    }

    #[test]
    fn line_numbers_count_skipped_and_crlf_lines() {
        let err = read("a,y\r\n1,2\r\n\r\n3,4\r\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("line 3: is blank"), "{err}");
        let err = read("a,y\n1,2\n\n\n3,4", name("y"), None).unwrap_err();
        assert!(err.starts_with("line 3: is blank"), "{err}");
        let err = read("a,y\r\n1,2\r\n\"x\r\ny\",1\r\nz,2", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 3, column 1 (\"a\"): \"x\\r\\ny\" is not a number"),
            "{err}"
        );
        let err = read("a,y\n1,2\nz,2\n\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("line 3, column 1 (\"a\")"), "{err}");
        let err = read("a,y\n1,2\nz,2", name("y"), None).unwrap_err();
        assert!(err.starts_with("line 3, column 1 (\"a\")"), "{err}");
        let err = read("\na,y\n1,2\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("is empty; expected a header row"), "{err}");
    }

    #[test]
    fn non_numeric_cell_names_line_and_column() {
        let csv = "x,y,age\n1,2,3\n1,2,3\n1,2,3\n1,2,3\n1,2,3\n1,2,abc\n";
        let err = read(csv, name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 7, column 3 (\"age\"): \"abc\" is not a number"),
            "{err}"
        );
    }

    #[test]
    fn non_numeric_label_says_labels_must_be_numeric() {
        let err = read("a,y\n1,cat\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with(
                "line 2, column 2 (\"y\"): \"cat\" is not a number; the label must be numeric"
            ),
            "{err}"
        );
    }

    #[test]
    fn nan_and_infinity_are_errors() {
        for bad in ["NaN", "nan", "inf", "-inf", "Infinity"] {
            let err = read(&format!("a,y\n1,2\n{bad},0\n"), name("y"), None).unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "line 3, column 1 (\"a\"): \"{bad}\" is not a finite number"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn empty_cell_is_an_error() {
        let err = read("a,b,y\n1,,0\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2, column 2 (\"b\"): is empty"),
            "{err}"
        );
        let err = read("a,b,y\n1,\"  \",0\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2, column 2 (\"b\"): is empty"),
            "{err}"
        );
    }

    #[test]
    fn out_of_f32_range_is_an_error_but_tiny_values_are_fine() {
        let err = read("a,y\n1e39,0\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2, column 1 (\"a\"): \"1e39\" is out of range for f32"),
            "{err}"
        );
        let t = read("a,y\n1e-50,3.4e38\n", name("y"), None).unwrap();
        assert_eq!(t.x, vec![0.0]);
        assert_eq!(t.y, vec![3.4e38]);
    }

    #[test]
    fn values_round_like_f64_then_f32() {
        let cells = [
            "0.1",
            "16777217",
            "-123456789012345",
            "1234567890123456789",
            "2.5e-3",
        ];
        let csv = format!(
            "{}\n{}\n",
            ["c"; 5]
                .iter()
                .enumerate()
                .map(|(i, _)| format!("c{i}"))
                .collect::<Vec<_>>()
                .join(","),
            cells.join(",")
        );
        let t = read(&csv, LabelColumn::None, None).unwrap();
        let expected: Vec<f32> = cells
            .iter()
            .map(|c| c.parse::<f64>().unwrap() as f32)
            .collect();
        assert_eq!(t.x, expected);
    }

    #[test]
    fn ragged_rows_are_errors() {
        let mut csv = "a,b,c,d,y\n".to_string();
        for _ in 0..10 {
            csv.push_str("1,2,3,4,5\n");
        }
        csv.push_str("1,2,3,4\n");
        let err = read(&csv, name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 12: has 4 fields, the header has 5 (ragged row)"),
            "{err}"
        );
        let err = read("a,y\n1,2,\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2: has 3 fields, the header has 2 (ragged row)"),
            "{err}"
        );
    }

    #[test]
    fn blank_line_in_the_middle_is_an_error() {
        let err = read("a,y\n1,2\n\n3,4\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("line 3: is blank"), "{err}");
    }

    #[test]
    fn unknown_label_lists_the_columns() {
        let err = read("a,b,c\n1,2,3\n", name("target"), None).unwrap_err();
        assert_eq!(
            err,
            "label column \"target\" is not in the header (columns: a, b, c)"
        );
        let err = read("a,Target\n1,2\n", name("target"), None).unwrap_err();
        assert!(err.ends_with("did you mean \"Target\"?"), "{err}");
        let err = read("a;b;target\n1;2;3\n", name("target"), None).unwrap_err();
        assert!(
            err.ends_with("separated by semicolons, but only commas are supported"),
            "{err}"
        );
    }

    #[test]
    fn long_header_listing_is_shortened() {
        let names: Vec<String> = (0..30).map(|i| format!("p{i}")).collect();
        let csv = format!("{}\n{}\n", names.join(","), vec!["0"; 30].join(","));
        let err = read(&csv, name("label"), None).unwrap_err();
        assert!(err.ends_with("p19, … and 10 more)"), "{err}");
    }

    #[test]
    fn label_index_out_of_range() {
        let err = read("a,b,c\n1,2,3\n", LabelColumn::Index(3), None).unwrap_err();
        assert_eq!(
            err,
            "label column index 3 is out of range: the header has 3 column(s), indices 0 to 2 (columns: a, b, c)"
        );
    }

    #[test]
    fn unknown_duplicate_or_label_features_are_errors() {
        let csv = "a,b,y\n1,2,3\n";
        let err = read(csv, name("y"), Some(&["a", "zz"])).unwrap_err();
        assert_eq!(
            err,
            "feature column \"zz\" is not in the header (columns: a, b, y)"
        );
        let err = read(csv, name("y"), Some(&["a", "b", "a"])).unwrap_err();
        assert!(
            err.starts_with("feature column \"a\" is listed more than once"),
            "{err}"
        );
        let err = read(csv, name("y"), Some(&["a", "y"])).unwrap_err();
        assert!(
            err.starts_with("feature column \"y\" is also the label column"),
            "{err}"
        );
        let err = read(csv, name("y"), Some(&[])).unwrap_err();
        assert!(err.starts_with("the features list is empty"), "{err}");
    }

    #[test]
    fn ambiguous_header_names_are_errors_only_when_used() {
        let csv = "a,a,y\n1,2,3\n";
        let err = read(csv, name("a"), None).unwrap_err();
        assert!(
            err.starts_with("label column \"a\" is ambiguous: the header has it at columns 1, 2"),
            "{err}"
        );
        let t = read(csv, name("y"), None).unwrap();
        assert_eq!(t.feature_names, vec!["a", "a"]);
    }

    #[test]
    fn label_only_file_has_no_features() {
        let err = read("y\n1\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("has no feature columns"), "{err}");
    }

    #[test]
    fn empty_file_and_header_only_file_are_errors() {
        let err = read("", name("y"), None).unwrap_err();
        assert!(err.starts_with("is empty; expected a header row"), "{err}");
        let err = read("\n\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("is empty; expected a header row"), "{err}");
        let err = read("a,y\n\n", name("y"), None).unwrap_err();
        assert!(err.starts_with("has a header but no data rows"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = std::env::temp_dir().join("ringtrain-csv-test-does-not-exist.csv");
        let err = read_csv(&path, &LabelColumn::None, None).unwrap_err();
        assert!(matches!(err, TableError::Io { .. }));
        assert_eq!(err.path(), path.as_path());
        assert!(err
            .to_string()
            .starts_with(&format!("{}: ", path.display())));
    }

    #[test]
    fn long_bad_values_are_shortened_in_messages() {
        let long = "x".repeat(100);
        let err = read(&format!("a,y\n{long},1\n"), name("y"), None).unwrap_err();
        assert!(
            err.contains(&format!("\"{}…\" is not a number", "x".repeat(40))),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_cell_is_not_a_number() {
        let file = TempFile::new("");
        std::fs::write(&file.0, b"a,y\n\xff\xfe,1\n").unwrap();
        let err = read_csv(&file.0, &name("y"), None).unwrap_err().to_string();
        assert!(err.contains("line 2, column 1 (\"a\"): "), "{err}");
        assert!(err.contains("is not a number"), "{err}");
    }
}
