//! The export job the proxy exists for: read contract SNs, ask the proxy for all of them in
//! one streamed lookup, and write a CSV row per SN as its line arrives.
//!
//! ```sh
//! cargo run --release --example export_csv -- --proxy http://127.0.0.1:8080 sns.txt > export.csv
//! ```
//!
//! SNs come one per line from the file (or stdin without one). Rows are written in the
//! order the proxy resolves them (cached ones first); the columns are `sn`, `status`,
//! `source`, `ratio`, `apportionment` (`item=ratio` pairs joined by `;`) and `error` (the
//! error code of a failed SN). Timings go to stderr. A token for `server.api_tokens` is
//! read from `DISCOUNT_PROXY_CLIENT_TOKEN`.

use futures_util::StreamExt;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::time::Instant;

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let (proxy, file) = parse_args()?;
    let sns = read_sns(file.as_deref())?;
    let started = Instant::now();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut request = reqwest::Client::new()
        .post(format!(
            "{}/v1/discounts/lookup",
            proxy.trim_end_matches('/')
        ))
        .header("accept", "application/x-ndjson")
        .json(&serde_json::json!({ "sns": sns }));
    if let Ok(token) = std::env::var("DISCOUNT_PROXY_CLIENT_TOKEN") {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        let status = response.status();
        return Err(format!("the proxy answered {status}: {}", response.text().await?).into());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(out, "sn,status,source,ratio,apportionment,error")?;
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    let mut rows = 0usize;
    let mut first_row = None;
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let item: Value = serde_json::from_slice(&line)?;
            if let Some(summary) = item.get("summary") {
                eprintln!("export: summary {summary}");
                continue;
            }
            write_row(&mut out, &item)?;
            rows += 1;
            first_row.get_or_insert_with(|| started.elapsed());
            // Each row reaches the file as it arrives, not when the export ends.
            out.flush()?;
        }
    }
    eprintln!(
        "export: {rows} rows for {} SNs in {:.3} s (first row after {:.3} s)",
        sns.len(),
        started.elapsed().as_secs_f64(),
        first_row.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}

fn parse_args() -> Result<(String, Option<String>), Failure> {
    let mut proxy = "http://127.0.0.1:8080".to_owned();
    let mut file = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--proxy" => proxy = args.next().ok_or("--proxy needs a URL")?,
            "-h" | "--help" => {
                eprintln!(
                    "usage: export_csv [--proxy URL] [FILE]   (SNs one per line; stdin without FILE)"
                );
                std::process::exit(0);
            }
            _ => file = Some(arg),
        }
    }
    Ok((proxy, file))
}

fn read_sns(file: Option<&str>) -> Result<Vec<String>, Failure> {
    let reader: Box<dyn BufRead> = match file {
        Some(path) => Box::new(std::io::BufReader::new(std::fs::File::open(path)?)),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut sns = Vec::new();
    for line in reader.lines() {
        let line = line?;
        let sn = line.trim();
        if !sn.is_empty() {
            sns.push(sn.to_owned());
        }
    }
    Ok(sns)
}

fn write_row(out: &mut impl Write, item: &Value) -> std::io::Result<()> {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let discount = &item["discount"];
    let apportionment = discount["apportionment"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .map(|part| format!("{}={}", text(&part["item"]), text(&part["ratio"])))
                .collect::<Vec<_>>()
                .join(";")
        })
        .unwrap_or_default();
    let fields = [
        text(&item["sn"]),
        text(&item["status"]),
        text(&item["source"]),
        text(&discount["ratio"]),
        apportionment,
        text(&item["error"]["code"]),
    ];
    let row: Vec<String> = fields.iter().map(|field| csv_field(field)).collect();
    writeln!(out, "{}", row.join(","))
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}
