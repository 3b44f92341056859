//! `completions` and `man`: what a packager runs to install them, through the real binary.

use crate::support::{run_to_end, temp_dir};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn completions_are_printed_for_each_shell_and_an_unknown_shell_is_refused() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef"),
        ("fish", "complete -c"),
    ] {
        let run = run_to_end(&["completions", shell], &[], "", WAIT).await;
        assert!(run.status.success(), "{shell}: {run}");
        assert!(run.stdout.contains(marker), "{shell}: {run}");
        assert!(run.stdout.contains("warm"), "{shell}: {run}");
    }
    let run = run_to_end(&["completions", "tcsh"], &[], "", WAIT).await;
    assert_eq!(run.code(), Some(2), "{run}");
    assert!(
        run.stderr.contains("bash"),
        "the shells it knows are named: {run}"
    );
}

#[tokio::test]
async fn man_pages_are_written_one_per_subcommand() {
    let dir = temp_dir("man");
    let out = dir.join("man1");
    let run = run_to_end(&["man", "--out-dir", out.to_str().unwrap()], &[], "", WAIT).await;
    assert!(run.status.success(), "{run}");
    for page in [
        "discount-proxy.1",
        "discount-proxy-warm.1",
        "discount-proxy-serve.1",
    ] {
        let text = std::fs::read_to_string(out.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let warm = std::fs::read_to_string(out.join("discount-proxy-warm.1")).unwrap();
    assert!(
        warm.contains("no\\-header"),
        "the warm page lists its flags"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
