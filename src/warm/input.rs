//! The SNs to warm: one per line, or one column of a CSV (an export file), read with the
//! `csv` crate.
//!
//! A CSV is assumed to start with a header row, as csvkit and xsv assume: the export files
//! this reads come out of spreadsheets and reporting tools that write one. `--no-header`
//! says there is none; `--column NAME|N` picks the SN's column by header name or by number
//! (from 1), the first column by default. Input is read as a CSV when it is named `*.csv`,
//! when either flag is given, or when its first line holds a comma; otherwise each line is
//! one SN. Rows that give no SN are counted by reason, for the summary.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroUsize;

/// Which column holds the SNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// The column whose header is this.
    Name(String),
    /// The column at this place, counted from 1.
    Number(NonZeroUsize),
}

impl Column {
    /// `--column`'s value: digits are a number (from 1), anything else a header name.
    ///
    /// # Errors
    /// `0`, or an empty name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("expected a header name or a column number from 1".to_owned());
        }
        if raw.bytes().all(|byte| byte.is_ascii_digit()) {
            return raw
                .parse::<NonZeroUsize>()
                .map(Self::Number)
                .map_err(|_| "columns are numbered from 1".to_owned());
        }
        Ok(Self::Name(raw.to_owned()))
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => write!(f, "\"{name}\""),
            Self::Number(number) => write!(f, "{number}"),
        }
    }
}

/// How to read the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Format {
    /// `--no-header`: a CSV's first row is data.
    pub no_header: bool,
    /// `--column`: where the SNs are (the first column when `None`).
    pub column: Option<Column>,
    /// The input file is named `*.csv`.
    pub named_csv: bool,
}

/// The SNs read, in input order with duplicates removed, how many rows named one, and the
/// rows that did not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// Each distinct SN once, in the order it first appeared.
    pub sns: Vec<String>,
    /// SNs read, duplicates included.
    pub read: usize,
    /// Rows that gave no SN.
    pub skipped: Skipped,
}

/// Rows that gave no SN, by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The CSV's header row (0 or 1).
    pub header: usize,
    /// Blank lines of a plain list, or CSV rows whose SN field is empty (a CSV's blank
    /// lines are no rows).
    pub empty: usize,
    /// Rows with fewer fields than the SN's column.
    pub short: usize,
    /// Rows the CSV reader could not read (bad quoting, not UTF-8).
    pub unreadable: usize,
    /// The column the SNs came from, for the summary.
    pub column: String,
}

impl Skipped {
    /// All rows skipped.
    pub fn total(&self) -> usize {
        self.header + self.empty + self.short + self.unreadable
    }

    /// One line for the summary, when any row was skipped.
    pub fn summary(&self) -> Option<String> {
        let reasons: Vec<String> = [
            (self.header, "header".to_owned()),
            (self.empty, format!("with no SN in {}", self.column)),
            (self.short, format!("too short to have {}", self.column)),
            (self.unreadable, "not readable as CSV".to_owned()),
        ]
        .into_iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, why)| format!("{count} {why}"))
        .collect();
        (!reasons.is_empty()).then(|| {
            let total = self.total();
            let rows = if total == 1 { "row" } else { "rows" };
            format!("skipped {total} {rows}: {}", reasons.join(", "))
        })
    }
}

/// The input cannot be read the way the flags ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// `--column NAME` with `--no-header`: there is no header to find the name in.
    #[error("--column {0} names a header, but --no-header says there is none; give its number")]
    NameWithoutHeader(String),
    /// `--column NAME` that the header does not have.
    #[error("--column {wanted}: the header has no such column (it has {have})")]
    NoSuchColumn {
        /// The name asked for.
        wanted: String,
        /// The header's names, quoted, comma-separated.
        have: String,
    },
}

/// Parses the input text.
///
/// Surrounding whitespace is trimmed from each SN. A duplicate is counted in `read` but kept
/// once: the proxy would look it up once anyway, and each SN is then counted once in the
/// summary.
///
/// # Errors
/// A `--column` the input cannot have (see [`FormatError`]).
pub fn parse(text: &str, format: &Format) -> Result<Input, FormatError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first_has_comma = text.lines().next().is_some_and(|first| first.contains(','));
    let is_csv = format.named_csv || format.no_header || format.column.is_some() || first_has_comma;
    if is_csv {
        parse_csv(text, format)
    } else {
        Ok(parse_lines(text))
    }
}

fn parse_lines(text: &str) -> Input {
    let mut input = Input {
        skipped: Skipped {
            column: "the line".to_owned(),
            ..Skipped::default()
        },
        ..Input::default()
    };
    let mut seen = HashSet::new();
    for line in text.lines() {
        input.add(line.trim(), &mut seen);
    }
    input
}

fn parse_csv(text: &str, format: &Format) -> Result<Input, FormatError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let mut input = Input::default();
    let header = if format.no_header {
        if let Some(Column::Name(name)) = &format.column {
            return Err(FormatError::NameWithoutHeader(name.clone()));
        }
        None
    } else {
        // A header that cannot be read is a row like any other: counted, not fatal.
        match records.next() {
            Some(Ok(header)) => Some(header),
            Some(Err(_)) => {
                input.skipped.unreadable += 1;
                None
            }
            None => None,
        }
    };
    input.skipped.header = usize::from(header.is_some());
    let index = column_index(header.as_ref(), format.column.as_ref())?;
    input.skipped.column = match &format.column {
        Some(column) => format!("column {column}"),
        None => "the first column".to_owned(),
    };
    let mut seen = HashSet::new();
    for record in records {
        match record {
            Err(_) => input.skipped.unreadable += 1,
            // Blank lines are no rows at all to the CSV reader: not counted.
            Ok(record) => match record.get(index) {
                Some(sn) => input.add(sn, &mut seen),
                None => input.skipped.short += 1,
            },
        }
    }
    Ok(input)
}

/// Where `column` is in a CSV whose header is `header` (if it has one).
fn column_index(
    header: Option<&csv::StringRecord>,
    column: Option<&Column>,
) -> Result<usize, FormatError> {
    match column {
        None => Ok(0),
        Some(Column::Number(number)) => Ok(number.get() - 1),
        Some(Column::Name(name)) => {
            let names = header.map(csv::StringRecord::iter).into_iter().flatten();
            let found = names.clone().position(|field| field == name);
            found.ok_or_else(|| FormatError::NoSuchColumn {
                wanted: name.clone(),
                have: names
                    .map(|field| format!("\"{field}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }
}

impl Input {
    fn add(&mut self, sn: &str, seen: &mut HashSet<String>) {
        if sn.is_empty() {
            self.skipped.empty += 1;
            return;
        }
        self.read += 1;
        if seen.insert(sn.to_owned()) {
            self.sns.push(sn.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(text: &str) -> Input {
        parse(text, &Format::default()).unwrap()
    }

    fn with(text: &str, no_header: bool, column: Option<&str>) -> Result<Input, FormatError> {
        let format = Format {
            no_header,
            column: column.map(|raw| Column::parse(raw).unwrap()),
            named_csv: false,
        };
        parse(text, &format)
    }

    #[test]
    fn one_sn_per_line_trimmed_blank_lines_skipped_duplicates_counted() {
        let input = plain("C1\n  C2 \r\n\n\t\nC1\nC3\n");
        assert_eq!(input.sns, ["C1", "C2", "C3"]);
        assert_eq!(input.read, 4);
        assert_eq!(input.skipped.empty, 2);
    }

    #[test]
    fn a_first_line_with_a_comma_makes_it_a_csv_with_a_header() {
        let input = plain("sn,customer\r\nC1,Acme\n C2 , Beta\n\n,no sn\nC1,again\n");
        assert_eq!(input.sns, ["C1", "C2"]);
        assert_eq!(input.read, 3);
        assert_eq!((input.skipped.header, input.skipped.empty), (1, 1));
        assert_eq!(
            input.skipped.summary().unwrap(),
            "skipped 2 rows: 1 header, 1 with no SN in the first column"
        );
    }

    #[test]
    fn quoted_fields_may_hold_commas_doubled_quotes_and_line_breaks() {
        let input =
            plain("\"sn\",\"name\"\n\"C1,a\",x\n\"C \"\"2\"\"\",y\n\"C3\",\"two\nlines\"\n");
        assert_eq!(input.sns, ["C1,a", "C \"2\"", "C3"]);
    }

    #[test]
    fn a_column_is_found_by_header_name_or_by_number_from_one() {
        let text = "customer,contract_sn,amount\nAcme,C1,10\nBeta,C2,20\nGamma\n";
        for column in ["contract_sn", "2"] {
            let input = with(text, false, Some(column)).unwrap();
            assert_eq!(input.sns, ["C1", "C2"], "{column}");
            assert_eq!(input.skipped.short, 1, "Gamma's row has no second field");
        }
        let summary = with(text, false, Some("contract_sn")).unwrap().skipped;
        assert_eq!(
            summary.summary().unwrap(),
            "skipped 2 rows: 1 header, 1 too short to have column \"contract_sn\""
        );
    }

    #[test]
    fn without_a_header_the_first_row_is_data() {
        let input = with("C1,Acme\nC2,Beta\n", true, None).unwrap();
        assert_eq!(input.sns, ["C1", "C2"]);
        assert_eq!(input.skipped.total(), 0);
        assert_eq!(input.skipped.summary(), None);
        let second = with("Acme,C1\nBeta,C2\n", true, Some("2")).unwrap();
        assert_eq!(second.sns, ["C1", "C2"]);
    }

    #[test]
    fn a_file_named_csv_is_a_csv_even_with_one_column() {
        let format = Format {
            named_csv: true,
            ..Format::default()
        };
        let input = parse("sn\nC1\nC2\n", &format).unwrap();
        assert_eq!(input.sns, ["C1", "C2"]);
    }

    #[test]
    fn a_column_the_input_cannot_have_is_an_error_that_names_it() {
        assert_eq!(
            with("a,b\n1,2\n", true, Some("sn")).unwrap_err(),
            FormatError::NameWithoutHeader("sn".to_owned())
        );
        let err = with("customer,amount\nAcme,1\n", false, Some("sn")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--column sn: the header has no such column (it has \"customer\", \"amount\")"
        );
    }

    #[test]
    fn column_values_are_names_or_numbers_from_one() {
        assert_eq!(
            Column::parse("3"),
            Ok(Column::Number(NonZeroUsize::new(3).unwrap()))
        );
        assert_eq!(Column::parse("sn"), Ok(Column::Name("sn".to_owned())));
        assert!(Column::parse("0").is_err());
        assert!(Column::parse(" ").is_err());
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_sn() {
        assert_eq!(plain("\u{feff}C1\nC2").sns, ["C1", "C2"]);
        assert_eq!(plain("\u{feff}sn,x\nC1,y").sns, ["C1"]);
    }

    #[test]
    fn inner_whitespace_is_kept_for_the_proxy_to_reject() {
        assert_eq!(plain("C 1\n").sns, ["C 1"]);
    }

    #[test]
    fn empty_input_has_no_sns() {
        assert_eq!(plain("").sns, Vec::<String>::new());
        assert_eq!(plain("sn,name\n").sns, Vec::<String>::new());
    }
}
