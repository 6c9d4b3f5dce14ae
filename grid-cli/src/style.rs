//! Colours on the terminal. Lines go out through `anstream`, which drops the colours when
//! stdout is not a terminal or `NO_COLOR` is set (and keeps them with `CLICOLOR_FORCE`).

use anstyle::{AnsiColor, Style};

/// A job's or task's state word, coloured by what it means: green ended well, red ended badly,
/// yellow still going.
pub fn state(word: &str) -> String {
    let colour = match word {
        "done" | "succeeded" => AnsiColor::Green,
        "failed" | "cancelled" | "disputed" | "refused" => AnsiColor::Red,
        _ => AnsiColor::Yellow,
    };
    let style = Style::new().fg_color(Some(colour.into())).bold();
    format!("{style}{word}{style:#}")
}

/// Dimmed text (ids, hints).
pub fn dim(text: &str) -> String {
    let style = Style::new().dimmed();
    format!("{style}{text}{style:#}")
}
