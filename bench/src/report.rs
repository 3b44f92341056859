//! The result table: one row per figure with its reference, ratio, target and verdict, as
//! aligned text for the terminal and as Markdown for the README.

use std::fmt::Write as _;
use std::time::Duration;

/// How a row came out.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// A reference figure: nothing to judge.
    Reference,
    /// The target is met.
    Pass,
    /// The target is missed (or the measurement failed).
    Fail,
    /// Not measured in this run, and why.
    Na(String),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Sort key: 0 for references, N for PN, so rows print in target order whatever the
    /// order the scenarios ran in.
    pub group: u8,
    /// What was measured.
    pub scenario: String,
    /// Our figure.
    pub figure: String,
    /// The reference figure it is compared with.
    pub reference: String,
    /// figure ÷ reference (or as the target defines it).
    pub ratio: String,
    /// The target from PERFORMANCE.md.
    pub target: String,
    /// The verdict.
    pub verdict: Verdict,
}

impl Row {
    /// A row with only its scenario and target filled in, not yet judged.
    pub fn new(group: u8, scenario: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            group,
            scenario: scenario.into(),
            figure: "—".to_owned(),
            reference: "—".to_owned(),
            ratio: "—".to_owned(),
            target: target.into(),
            verdict: Verdict::Fail,
        }
    }

    /// Marks the row as not measured, for `reason`.
    pub fn na(mut self, reason: impl Into<String>) -> Self {
        self.verdict = Verdict::Na(reason.into());
        self
    }

    /// Judges the row: pass when `met`.
    pub fn judged(mut self, met: bool) -> Self {
        self.verdict = if met { Verdict::Pass } else { Verdict::Fail };
        self
    }
}

/// The whole output of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// Lines printed above the table (machine, command, scale).
    pub header: Vec<String>,
    rows: Vec<Row>,
    /// Lines printed below the table: errors in full, counts behind a verdict.
    pub notes: Vec<String>,
}

impl Report {
    /// Adds a row.
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Adds a failed row whose measurement itself went wrong; the error goes to the notes.
    pub fn error(&mut self, mut row: Row, err: &anyhow::Error) {
        row.figure = "error (see notes)".to_owned();
        row.verdict = Verdict::Fail;
        self.notes.push(format!("{}: {err:#}", row.scenario));
        self.rows.push(row);
    }

    fn cells(&self) -> Vec<[String; 6]> {
        let mut rows = self.rows.clone();
        rows.sort_by_key(|row| row.group);
        rows.into_iter()
            .map(|row| {
                let verdict = match row.verdict {
                    Verdict::Reference => "ref".to_owned(),
                    Verdict::Pass => "PASS".to_owned(),
                    Verdict::Fail => "FAIL".to_owned(),
                    Verdict::Na(reason) => format!("n/a ({reason})"),
                };
                [
                    row.scenario,
                    row.figure,
                    row.reference,
                    row.ratio,
                    row.target,
                    verdict,
                ]
            })
            .collect()
    }

    /// The header, an aligned plain-text table and the notes.
    pub fn text(&self) -> String {
        let cells = self.cells();
        let mut widths = HEADINGS.map(|heading| heading.chars().count());
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |row: &[String; 6]| {
            let padded: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            padded.join("  ").trim_end().to_owned()
        };
        let mut out = self.header.join("\n") + "\n\n";
        out += &line(&HEADINGS.map(str::to_owned));
        out.push('\n');
        out += &line(&widths.map(|width| "-".repeat(width)));
        out.push('\n');
        for row in &cells {
            out += &line(row);
            out.push('\n');
        }
        out + &self.notes_text()
    }

    /// The same as Markdown: the header lines as a paragraph, a table, the notes as a list.
    pub fn markdown(&self) -> String {
        let escape = |cell: &str| cell.replace('|', "\\|");
        let mut out = self.header.join("  \n") + "\n\n";
        let _ = writeln!(out, "| {} |", HEADINGS.join(" | "));
        let _ = writeln!(out, "|{}", " --- |".repeat(HEADINGS.len()));
        for row in self.cells() {
            let escaped: Vec<String> = row.iter().map(|cell| escape(cell)).collect();
            let _ = writeln!(out, "| {} |", escaped.join(" | "));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    fn notes_text(&self) -> String {
        if self.notes.is_empty() {
            return String::new();
        }
        let mut out = String::from("\nNotes:\n");
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }
}

const HEADINGS: [&str; 6] = [
    "scenario",
    "figure",
    "reference",
    "ratio",
    "target",
    "result",
];

/// A rate with a magnitude suffix: `4.15 M`, `64.0 k`, `950`.
pub fn rate(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.1} k", value / 1e3)
    } else {
        count(value.round() as u64)
    }
}

/// A duration in the unit that reads best: `812 µs`, `4.21 ms`, `2.013 s`.
pub fn duration(value: Duration) -> String {
    let secs = value.as_secs_f64();
    if secs >= 1.0 {
        format!("{secs:.3} s")
    } else if secs >= 1e-3 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{:.0} µs", secs * 1e6)
    }
}

/// A count with thousands separators: `10,000`.
pub fn count(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Bytes in MiB: `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    let mib = bytes as f64 / f64::from(1 << 20);
    format!("{mib:.1} MiB")
}

/// A ratio: `0.52×`.
pub fn ratio(value: f64) -> String {
    format!("{value:.2}×")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_print_in_target_order_and_align() {
        let mut report = Report::default();
        report.push(Row::new(2, "P2", "≥ 1.0×").na("proxy without cache.local"));
        report.push(Row::new(1, "P1 hits", "≥ 0.5×").judged(true));
        let text = report.text();
        let p1 = text.find("P1 hits").unwrap();
        let p2 = text.find("P2").unwrap();
        assert!(p1 < p2);
        assert!(text.contains("n/a (proxy without cache.local)"));
        assert!(
            report
                .markdown()
                .contains("| P1 hits | — | — | — | ≥ 0.5× | PASS |")
        );
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(rate(4_150_000.0), "4.15 M");
        assert_eq!(rate(64_000.0), "64.0 k");
        assert_eq!(duration(Duration::from_micros(4210)), "4.21 ms");
        assert_eq!(mib(3 << 20), "3.0 MiB");
        assert_eq!(count(10_000), "10,000");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_234_567), "1,234,567");
    }
}
