//! Progress on stderr: a bar on a terminal, plain lines at most about once a second otherwise.

use super::tally::Tally;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Plain lines come no more often than this (and no more often than batches complete).
const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// Where progress goes.
pub enum Progress {
    /// A terminal: a bar redrawn in place.
    Bar(ProgressBar),
    /// A log or a pipe: a line per batch, at most one a second.
    Lines {
        /// SNs in the run.
        total: usize,
        /// When the last line was printed, and how many SNs were done then.
        last: Mutex<Option<(Instant, usize)>>,
    },
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new(total: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self::Lines {
                total,
                last: Mutex::new(None),
            };
        }
        let bar = ProgressBar::with_draw_target(
            Some(u64::try_from(total).unwrap_or(u64::MAX)),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} SNs  {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        // Batches of thousands take seconds: the clock keeps moving between them.
        bar.enable_steady_tick(Duration::from_millis(250));
        Self::Bar(bar)
    }

    /// Shows the counts after a batch.
    pub fn update(&self, tally: &Tally) {
        match self {
            Self::Bar(bar) => {
                bar.set_position(u64::try_from(tally.done).unwrap_or(u64::MAX));
                bar.set_message(tally.bar_message());
            }
            Self::Lines { total, last } => {
                let mut last = last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.is_some_and(|(at, _)| at.elapsed() < LINE_INTERVAL) {
                    return;
                }
                eprintln!("{}", tally.progress_line(*total));
                *last = Some((Instant::now(), tally.done));
            }
        }
    }

    /// Prints a message without garbling the bar.
    pub fn note(&self, message: &str) {
        match self {
            Self::Bar(bar) => bar.println(message),
            Self::Lines { .. } => eprintln!("{message}"),
        }
    }

    /// The last state, shown whatever the interval, unless it already was.
    pub fn finish(&self, tally: &Tally) {
        match self {
            Self::Bar(bar) => {
                bar.set_position(u64::try_from(tally.done).unwrap_or(u64::MAX));
                bar.finish_with_message(tally.bar_message());
            }
            Self::Lines { total, last } => {
                let last = last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.is_none_or(|(_, done)| done != tally.done) {
                    eprintln!("{}", tally.progress_line(*total));
                }
            }
        }
    }
}
