//! Reading numeric training tables from CSV files.
//!
//! [`read_csv`] turns a CSV file with a header row into a dense `f32`
//! [`Table`]: one label column (or none, at predict time) and the feature
//! columns, either all the others or an explicit list chosen by header name.
//!
//! The parser is a small RFC 4180 reader written for this purpose: comma
//! separated, `"`-quoted fields (which may hold commas, doubled quotes and
//! line breaks), CRLF or LF line ends, an optional UTF-8 byte order mark.
//! Every field is trimmed. Every error ([`TableError`]) names the file, the
//! 1-based line (the header is line 1) and, for a cell, the column by name and
//! 1-based position, and says what to do about it.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
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
    let file = File::open(path).map_err(|e| TableError::io(path, e))?;
    let mut reader = RecordReader::new(BufReader::with_capacity(1 << 16, file), path);
    let mut record = Record::default();

    // The header: required, and it fixes the number of fields of every row.
    let header = match reader.next_record(&mut record)? {
        Some(start) if !start.blank => record.to_strings(),
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
    while let Some(start) = reader.next_record(&mut record)? {
        if start.blank {
            first_blank.get_or_insert(start.line);
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
        if record.len() != header.len() {
            return Err(TableError::Line {
                path: path.to_path_buf(),
                line: start.line,
                message: format!(
                    "has {} fields, the header has {} (ragged row); look for a missing or \
                     extra comma, and quote values that contain commas",
                    record.len(),
                    header.len()
                ),
            });
        }
        for &col in &feature_cols {
            x.push(columns.cell(&record, col, start.line, false)?);
        }
        if let Some(col) = label_col {
            y.push(columns.cell(&record, col, start.line, true)?);
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

    /// Parses the cell at 0-based column `col` of `record`, which starts on `line`.
    fn cell(
        &self,
        record: &Record,
        col: usize,
        line: usize,
        is_label: bool,
    ) -> Result<f32, TableError> {
        let raw = record.field(col);
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

/// One record's fields, unescaped and trimmed, stored end to end so that
/// reading a row allocates nothing once the buffers have grown.
#[derive(Default)]
struct Record {
    text: Vec<u8>,
    ends: Vec<usize>,
}

impl Record {
    /// The number of fields.
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes of the 0-based field `i` (`i < self.len()`).
    fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    /// The fields as strings (for the header; invalid UTF-8 is replaced).
    fn to_strings(&self) -> Vec<String> {
        (0..self.len())
            .map(|i| String::from_utf8_lossy(self.field(i)).into_owned())
            .collect()
    }

    /// Ends the field that began at `start` in `text`, trimming its whitespace.
    fn finish_field(&mut self, start: usize) {
        while self.text.len() > start && self.text.last().is_some_and(u8::is_ascii_whitespace) {
            self.text.pop();
        }
        let lead = self.text[start..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        if lead > 0 {
            self.text.drain(start..start + lead);
        }
        self.ends.push(self.text.len());
    }
}

/// Where a record starts.
struct RecordStart {
    /// The 1-based line of its first byte.
    line: usize,
    /// The line was empty or all whitespace (the record holds one empty field).
    blank: bool,
}

/// Reads CSV records (which may span lines inside quotes) from a buffered file.
struct RecordReader<'p, R> {
    input: R,
    path: &'p Path,
    /// Lines read so far.
    line: usize,
    /// The current physical line, including its line end.
    buf: Vec<u8>,
}

impl<'p, R: BufRead> RecordReader<'p, R> {
    fn new(input: R, path: &'p Path) -> Self {
        RecordReader {
            input,
            path,
            line: 0,
            buf: Vec::new(),
        }
    }

    /// Reads the next physical line into `buf`; false at end of file.
    fn read_line(&mut self) -> Result<bool, TableError> {
        self.buf.clear();
        let n = self
            .input
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| TableError::io(self.path, e))?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        if self.line == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
            // A UTF-8 byte order mark, as spreadsheet programs write.
            self.buf.drain(..3);
        }
        Ok(true)
    }

    /// Reads the next record into `record`; `None` at end of file.
    fn next_record(&mut self, record: &mut Record) -> Result<Option<RecordStart>, TableError> {
        record.text.clear();
        record.ends.clear();
        if !self.read_line()? {
            return Ok(None);
        }
        let start = RecordStart {
            line: self.line,
            blank: self.buf.iter().all(u8::is_ascii_whitespace),
        };
        let mut i = 0;
        loop {
            // One field per iteration; `i` is at its first byte.
            let field_start = record.text.len();
            while self.buf.get(i).is_some_and(|&b| b == b' ' || b == b'\t') {
                i += 1;
            }
            if self.buf.get(i) == Some(&b'"') {
                i = self.quoted_field(i + 1, start.line, record)?;
                // After the closing quote only whitespace may come before the separator.
                while let Some(&b) = self.buf.get(i) {
                    if b == b',' || b == b'\n' {
                        break;
                    }
                    if !b.is_ascii_whitespace() {
                        return Err(TableError::Line {
                            path: self.path.to_path_buf(),
                            line: self.line,
                            message: "has text after a closing quote; a quote inside a quoted \
                                      field must be doubled (\"\")"
                                .to_string(),
                        });
                    }
                    i += 1;
                }
            } else {
                let rest = &self.buf[i..];
                let len = rest
                    .iter()
                    .position(|&b| b == b',' || b == b'\n')
                    .unwrap_or(rest.len());
                record.text.extend_from_slice(&rest[..len]);
                i += len;
            }
            record.finish_field(field_start);
            if self.buf.get(i) == Some(&b',') {
                i += 1;
            } else {
                // A line end or the end of the file.
                return Ok(Some(start));
            }
        }
    }

    /// Copies a quoted field's content, starting just after its opening quote
    /// at `i`, reading further lines when it holds line breaks. Returns the
    /// position just after the closing quote.
    fn quoted_field(
        &mut self,
        mut i: usize,
        record_line: usize,
        record: &mut Record,
    ) -> Result<usize, TableError> {
        loop {
            let rest = &self.buf[i..];
            match rest.iter().position(|&b| b == b'"') {
                Some(q) => {
                    record.text.extend_from_slice(&rest[..q]);
                    i += q + 1;
                    if self.buf.get(i) == Some(&b'"') {
                        // A doubled quote stands for one quote.
                        record.text.push(b'"');
                        i += 1;
                    } else {
                        return Ok(i);
                    }
                }
                None => {
                    // The field goes on past this line.
                    record.text.extend_from_slice(rest);
                    if !self.read_line()? {
                        return Err(TableError::Line {
                            path: self.path.to_path_buf(),
                            line: record_line,
                            message: "has a quoted field that is never closed; add the \
                                      closing quote (\")"
                                .to_string(),
                        });
                    }
                    i = 0;
                }
            }
        }
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
        let csv = "\"name, with comma\",\"say \"\"hi\"\"\",y\n\"1\", \" 2 \" ,\"3\"\n";
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

    #[test]
    fn text_after_closing_quote() {
        let err = read("a,y\n\"1\"x,2\n", name("y"), None).unwrap_err();
        assert!(
            err.starts_with("line 2: has text after a closing quote"),
            "{err}"
        );
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
