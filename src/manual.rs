//! Shell completions and man pages, generated from the command line's own definition
//! (`clap_complete`, `clap_mangen`), so they cannot drift from the flags the binary takes.
//! `discount-proxy completions bash` and `discount-proxy man` print them; packagers and
//! users install the output where their shell and `man` look.

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use clap::CommandFactory;
use std::io::Write;
use std::path::Path;

/// Writes the completion script for `args.shell` to `out`.
pub fn completions(args: &CompletionsArgs, out: &mut impl Write) {
    let mut command = Cli::command();
    let name = command.get_name().to_owned();
    clap_complete::generate(args.shell, &mut command, name, out);
}

/// Prints the main man page to `out`, or writes every page into `args.out_dir`.
///
/// # Errors
/// The page or the folder could not be written.
pub fn man(args: &ManArgs, out: &mut impl Write) -> std::io::Result<()> {
    let command = Cli::command();
    match &args.out_dir {
        None => clap_mangen::Man::new(command).render(out),
        Some(dir) => write_pages(command, dir),
    }
}

/// `discount-proxy.1` and one page per subcommand, in `dir` (made if missing).
fn write_pages(command: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(command, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_and_flag_is_completed() {
        let mut script = Vec::new();
        completions(
            &CompletionsArgs {
                shell: clap_complete::Shell::Bash,
            },
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in [
            "serve",
            "warm",
            "simulate-upstream",
            "demo",
            "--no-header",
            "--column",
        ] {
            assert!(script.contains(word), "{word}");
        }
    }

    #[test]
    fn the_man_page_names_the_subcommands() {
        let mut page = Vec::new();
        man(&ManArgs { out_dir: None }, &mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.starts_with(".ie"), "a roff page: {}", &page[..40]);
        assert!(page.contains(".TH discount-proxy 1"));
        assert!(page.contains("warm"));
    }
}
