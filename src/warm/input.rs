//! The SNs to warm: one per line, or the first column of a CSV whose first line is a header.

use std::collections::HashSet;

/// The SNs read, in input order with duplicates removed, and how many lines named one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// Each distinct SN once, in the order it first appeared.
    pub sns: Vec<String>,
    /// SNs read, duplicates included.
    pub read: usize,
}

/// Parses the input text.
///
/// A first line with a comma is a CSV header: it is skipped, and each following row gives its
/// first field (a field in double quotes may hold commas, and `""` stands for `"`). Otherwise
/// each line is one SN. Surrounding whitespace is trimmed; blank lines and rows whose first
/// field is empty are skipped. A duplicate is counted in `read` but kept once: the proxy would
/// look it up once anyway, and each SN is then counted once in the summary.
pub fn parse(text: &str) -> Input {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    let is_csv = lines
        .clone()
        .next()
        .is_some_and(|first| first.contains(','));
    if is_csv {
        lines.next();
    }
    let mut seen = HashSet::new();
    let mut input = Input::default();
    for line in lines {
        let sn = if is_csv {
            first_field(line)
        } else {
            line.trim().to_owned()
        };
        if sn.is_empty() {
            continue;
        }
        input.read += 1;
        if seen.insert(sn.clone()) {
            input.sns.push(sn);
        }
    }
    input
}

/// The first field of a CSV row, trimmed; quoted fields are unquoted. Minimal on purpose: a
/// quoted field spanning lines is not supported.
fn first_field(row: &str) -> String {
    let row = row.trim_start();
    let Some(quoted) = row.strip_prefix('"') else {
        return row.split(',').next().unwrap_or_default().trim().to_owned();
    };
    let mut field = String::new();
    let mut chars = quoted.chars();
    while let Some(ch) = chars.next() {
        if ch != '"' {
            field.push(ch);
            continue;
        }
        match chars.next() {
            Some('"') => field.push('"'),
            // The closing quote: whatever follows up to the comma is not part of the SN.
            _ => break,
        }
    }
    field.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sn_per_line_trimmed_blank_lines_skipped_duplicates_counted() {
        let input = parse("C1\n  C2 \r\n\n\t\nC1\nC3\n");
        assert_eq!(input.sns, ["C1", "C2", "C3"]);
        assert_eq!(input.read, 4);
    }

    #[test]
    fn a_first_line_with_a_comma_makes_it_a_csv_with_a_header() {
        let input = parse("sn,customer\r\nC1,Acme\n C2 , Beta\n\n,no sn\nC1,again\n");
        assert_eq!(input.sns, ["C1", "C2"]);
        assert_eq!(input.read, 3);
    }

    #[test]
    fn quoted_first_fields_may_hold_commas_and_doubled_quotes() {
        let input = parse("\"sn\",\"name\"\n\"C1,a\",x\n\"C \"\"2\"\"\",y\n\"C3\"\n");
        assert_eq!(input.sns, ["C1,a", "C \"2\"", "C3"]);
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_sn() {
        assert_eq!(parse("\u{feff}C1\nC2").sns, ["C1", "C2"]);
        assert_eq!(parse("\u{feff}sn,x\nC1,y").sns, ["C1"]);
    }

    #[test]
    fn inner_whitespace_is_kept_for_the_proxy_to_reject() {
        assert_eq!(parse("C 1\n").sns, ["C 1"]);
    }

    #[test]
    fn empty_input_has_no_sns() {
        assert_eq!(parse(""), Input::default());
        assert_eq!(parse("sn,name\n"), Input::default());
    }
}
