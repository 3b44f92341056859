//! What became of each SN: the counts behind the progress lines, the summary and the exit status.

use std::fmt::Write as _;
use std::time::Duration;

/// How many failed SNs the summary names.
const EXAMPLES: usize = 10;

/// What became of one SN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Found, and fetched from the upstream for this run (or joined a fetch under way).
    Fetched,
    /// Found, and already in the cache (fresh or stale).
    Cached,
    /// The upstream does not know it, whether it was just asked or remembered.
    NotFound,
    /// The proxy rejected the SN itself: the input was wrong.
    Invalid(Failure),
    /// The lookup failed: an item error, or the whole batch's request failed.
    Error(Failure),
}

/// An error code from the proxy (or made up here, for a failed request) and its message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Failure {
    /// Like `upstream_error`, `unauthorized` or `connection_failed`.
    pub code: String,
    /// A sentence for the operator.
    pub message: String,
}

/// The running counts.
#[derive(Debug, Default)]
pub struct Tally {
    /// SNs with an answer so far, of whatever kind.
    pub done: usize,
    /// [`Kind::Fetched`] SNs.
    pub fetched: usize,
    /// [`Kind::Cached`] SNs.
    pub cached: usize,
    /// [`Kind::NotFound`] SNs.
    pub not_found: usize,
    /// [`Kind::Invalid`] SNs.
    pub invalid: usize,
    /// [`Kind::Error`] SNs.
    pub errors: usize,
    examples: Vec<(String, Failure)>,
}

impl Tally {
    /// Counts one SN's outcome.
    pub fn add(&mut self, sn: &str, kind: Kind) {
        self.done += 1;
        let failure = match kind {
            Kind::Fetched => {
                self.fetched += 1;
                return;
            }
            Kind::Cached => {
                self.cached += 1;
                return;
            }
            Kind::NotFound => {
                self.not_found += 1;
                return;
            }
            Kind::Invalid(failure) => {
                self.invalid += 1;
                failure
            }
            Kind::Error(failure) => {
                self.errors += 1;
                failure
            }
        };
        if self.examples.len() < EXAMPLES {
            self.examples.push((sn.to_owned(), failure));
        }
    }

    /// Whether any SN ended in error or was invalid: the run then exits non-zero, since
    /// either the cache is not warm for it or the input was wrong.
    pub fn failed(&self) -> bool {
        self.errors + self.invalid > 0
    }

    /// The counts, as the progress line and the summary show them.
    fn counts(&self, cached_label: &str) -> String {
        format!(
            "{} fetched, {} {cached_label}, {} not found, {} invalid, {} errors",
            self.fetched, self.cached, self.not_found, self.invalid, self.errors
        )
    }

    /// `warm: 3000/10000 SNs (30%), 1500 fetched, 1400 cached, …`.
    pub fn progress_line(&self, total: usize) -> String {
        let percent = (self.done * 100).checked_div(total).unwrap_or(100);
        format!(
            "warm: {}/{total} SNs ({percent}%), {}",
            self.done,
            self.counts("cached")
        )
    }

    /// The counts for the progress bar's message.
    pub fn bar_message(&self) -> String {
        self.counts("cached")
    }

    /// The final report: the counts, then up to ten failed SNs with their codes.
    pub fn summary(&self, read: usize, elapsed: Duration) -> String {
        let duplicates = read.saturating_sub(self.done);
        let mut out = format!("warmed {} SNs", self.done);
        if duplicates > 0 {
            let _ = write!(out, " ({read} read, {duplicates} duplicates)");
        }
        let _ = write!(
            out,
            " in {:.1} s: {}",
            elapsed.as_secs_f64(),
            self.counts("already cached")
        );
        let failed = self.errors + self.invalid;
        if failed > 0 {
            let _ = write!(
                out,
                "\n{failed} SNs failed (exit status 1); the first {}:",
                self.examples.len()
            );
            for (sn, failure) in &self.examples {
                let _ = write!(out, "\n  {sn}: {} ({})", failure.code, failure.message);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: &str) -> Failure {
        Failure {
            code: code.to_owned(),
            message: "it went wrong".to_owned(),
        }
    }

    #[test]
    fn counts_add_up_and_only_errors_and_invalid_fail_the_run() {
        let mut tally = Tally::default();
        tally.add("A", Kind::Fetched);
        tally.add("B", Kind::Cached);
        tally.add("C", Kind::NotFound);
        assert!(!tally.failed());
        assert_eq!(
            tally.progress_line(6),
            "warm: 3/6 SNs (50%), 1 fetched, 1 cached, 1 not found, 0 invalid, 0 errors"
        );
        tally.add("D E", Kind::Invalid(failure("invalid_sn")));
        assert!(tally.failed());
        tally.add("F", Kind::Error(failure("upstream_error")));
        let summary = tally.summary(7, Duration::from_millis(41_250));
        assert!(
            summary.starts_with(
                "warmed 5 SNs (7 read, 2 duplicates) in 41.2 s: 1 fetched, 1 already cached, \
                 1 not found, 1 invalid, 1 errors\n2 SNs failed (exit status 1); the first 2:"
            ),
            "{summary}"
        );
        assert!(summary.contains("\n  D E: invalid_sn (it went wrong)"));
        assert!(summary.contains("\n  F: upstream_error (it went wrong)"));
    }

    #[test]
    fn at_most_ten_failed_sns_are_named() {
        let mut tally = Tally::default();
        for i in 0..25 {
            tally.add(&format!("S{i}"), Kind::Error(failure("upstream_error")));
        }
        let summary = tally.summary(25, Duration::from_secs(1));
        assert!(summary.contains("25 SNs failed (exit status 1); the first 10:"));
        assert_eq!(summary.lines().count(), 12);
        assert!(summary.contains("S9:") && !summary.contains("S10:"));
    }

    #[test]
    fn an_empty_run_is_complete() {
        let tally = Tally::default();
        assert!(tally.progress_line(0).contains("0/0 SNs (100%)"));
        assert!(!tally.failed());
    }
}
