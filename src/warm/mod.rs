//! `discount-proxy warm`: reads SNs from a file or stdin and sends them to a running proxy in
//! batches, a few at a time, so the cache is warm before an export job needs it.

mod client;
mod input;
mod progress;
mod tally;

use self::client::BatchClient;
use self::progress::Progress;
use self::tally::{Kind, Tally};
use crate::cli::WarmArgs;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

pub use self::input::Column;

/// Why `warm` could not start; it exits with status 2, like a bad flag.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The input file (or stdin) could not be read, or is not UTF-8.
    #[error("could not read SNs from {where_}: {source}")]
    Input {
        /// The file, or `stdin`.
        where_: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The flags ask for a column the input cannot have.
    #[error("{0}")]
    Format(#[from] input::FormatError),
    /// The HTTP client could not be built.
    #[error("could not set up the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Runs the command: progress on stderr, the summary on stdout.
///
/// Exit status 0 when every SN was found, cached or not found; 1 when any SN ended in error
/// or was invalid; 2 when it could not start (unreadable input).
pub async fn run(args: &WarmArgs) -> ExitCode {
    match warm(args).await {
        Ok(tally) if tally.failed() => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

async fn warm(args: &WarmArgs) -> Result<Tally, WarmError> {
    let format = input::Format {
        no_header: args.no_header,
        column: args.column.clone(),
        named_csv: args.file.as_deref().is_some_and(|path| {
            path.extension()
                .is_some_and(|extension| extension.eq_ignore_ascii_case("csv"))
        }),
    };
    let input = read_input(args.file.as_deref(), &format)?;
    let client = BatchClient::new(&args.proxy, args.refresh, args.token.clone(), args.timeout)
        .map_err(WarmError::Client)?;
    let started = Instant::now();
    let progress = Progress::new(input.sns.len());
    // Each distinct batch failure is told once; its SNs are all named in the counts.
    let mut told = HashSet::new();
    let mut tally = Tally::default();
    let mut batches = futures_util::stream::iter(input.sns.chunks(args.batch_size as usize))
        .map(|batch| {
            let (client, progress) = (&client, &progress);
            async move { (batch, client.send(batch, |note| progress.note(&note)).await) }
        })
        .buffer_unordered(args.parallel as usize);
    while let Some((batch, answer)) = batches.next().await {
        let kinds = answer.unwrap_or_else(|failure| {
            if told.insert(failure.clone()) {
                progress.note(&format!(
                    "warm: a batch of {} SNs failed: {} ({})",
                    batch.len(),
                    failure.code,
                    failure.message
                ));
            }
            vec![Kind::Error(failure); batch.len()]
        });
        for (sn, kind) in batch.iter().zip(kinds) {
            tally.add(sn, kind);
        }
        progress.update(&tally);
    }
    progress.finish(&tally);
    println!("{}", tally.summary(input.read, started.elapsed()));
    if let Some(skipped) = input.skipped.summary() {
        println!("{skipped}");
    }
    Ok(tally)
}

fn read_input(file: Option<&Path>, format: &input::Format) -> Result<input::Input, WarmError> {
    let mut text = String::new();
    let (read, where_) = match file {
        Some(path) if path != Path::new("-") => (
            std::fs::File::open(path).and_then(|mut file| file.read_to_string(&mut text)),
            path.display().to_string(),
        ),
        _ => (
            std::io::stdin().lock().read_to_string(&mut text),
            "stdin".to_owned(),
        ),
    };
    read.map_err(|source| WarmError::Input { where_, source })?;
    Ok(input::parse(&text, format)?)
}
