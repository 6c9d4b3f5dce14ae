//! Guest and provider bytes on the user's terminal.
//!
//! A task's logs are written by whoever submitted the job, and a task's reason, a node's GPU
//! name or what it is preparing by whoever runs the node: neither is the user reading them.
//! Sent to a terminal as they are, the control characters among them are obeyed — an escape
//! sequence can move the cursor and overwrite what `grid` said, retitle the window, hide a line
//! under a false one, or (on some terminals) make the terminal type a reply into the shell. So
//! when the destination is a terminal, they are shown, not sent: C0 controls but newline and
//! tab, DEL and C1 controls come out as `\x1b`, `\r`, `\x7f`, `\u{9b}`, and bytes that are not
//! UTF-8 as `\xff`. Everything else, newlines and tabs included, is left as it is.
//!
//! A pipe or a file gets the bytes exactly as written: logs are data, and `grid logs JOB --task
//! I > out.bin` must be the guest's output (a listing of many tasks adds only its headers, and
//! a newline where a log does not end one). `--raw` (`grid logs`, `grid run`) asks for the same
//! on a terminal. Reasons and other one-line texts from providers are escaped on a terminal
//! always; JSON output never carries a raw control character (see [`json_line`]).
//!
//! Not covered: characters that are not controls but mislead a reader (bidirectional
//! overrides, look-alike letters) pass through.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::IsTerminal;

/// Whether bytes bound for a stream go out escaped: on a terminal, unless `--raw` was given.
pub fn escape_for(stream_is_terminal: bool, raw: bool) -> bool {
    stream_is_terminal && !raw
}

/// Whether `c` is a control character a terminal may act on: C0 but `\n` and `\t`, DEL, C1.
fn is_hazard(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// `bytes` as text that a terminal shows and does not act on (see the module docs). Borrowed
/// when there is nothing to escape.
pub fn printable(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes)
        && !text.chars().any(is_hazard)
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(bytes.len() + 16);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\r' => out.push_str("\\r"),
                c if is_hazard(c) && (c as u32) < 0x80 => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if is_hazard(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    Cow::Owned(out)
}

/// `bytes` as they go out: escaped with [`printable`] when `escape` is set, else as they are.
pub fn shown_bytes(bytes: &[u8], escape: bool) -> Cow<'_, [u8]> {
    if !escape {
        return Cow::Borrowed(bytes);
    }
    match printable(bytes) {
        Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
        Cow::Owned(text) => Cow::Owned(text.into_bytes()),
    }
}

/// Writes `bytes` to `out`, escaped with [`printable`] when `escape` is set.
pub fn write_bytes(
    out: &mut impl std::io::Write,
    bytes: &[u8],
    escape: bool,
) -> std::io::Result<()> {
    out.write_all(&shown_bytes(bytes, escape))
}

/// A provider's or guest's text (a task's reason, a node's GPU name) for stdout: escaped when
/// stdout is a terminal.
pub fn for_stdout(text: &str) -> Cow<'_, str> {
    shown(text, std::io::stdout().is_terminal())
}

/// The same for stderr.
pub fn for_stderr(text: &str) -> Cow<'_, str> {
    shown(text, std::io::stderr().is_terminal())
}

fn shown(text: &str, terminal: bool) -> Cow<'_, str> {
    if terminal {
        printable(text.as_bytes())
    } else {
        Cow::Borrowed(text)
    }
}

/// `value` as one line of JSON without a raw control character in it. serde_json escapes C0
/// itself; DEL and C1, which it leaves raw and some terminals obey, are written `\u007f`,
/// `\u009b`: the same JSON value, wherever the line goes.
pub fn json_line(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if !text.chars().any(char::is_control) {
        return text;
    }
    // Compact JSON has no raw control character outside a string: every one is inside one,
    // where `\uXXXX` means that character.
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_newlines_and_tabs_are_unchanged() {
        for text in [
            "",
            "hello\n",
            "a\tb\nc\n",
            "π ≈ 3.14159 — ünïcode ✓\n",
            "C:\\path\\x1b",
        ] {
            assert!(
                matches!(printable(text.as_bytes()), Cow::Borrowed(t) if t == text),
                "{text:?}"
            );
        }
    }

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        assert_eq!(
            printable(b"\x1b[31mred\x1b[0m \x1b]0;title\x07"),
            "\\x1b[31mred\\x1b[0m \\x1b]0;title\\x07"
        );
        assert_eq!(printable(b"a\x00b\x7fc\x08"), "a\\x00b\\x7fc\\x08");
    }

    #[test]
    fn a_carriage_return_cannot_overwrite_the_line() {
        assert_eq!(printable(b"fake ok\rreal\r\n"), "fake ok\\rreal\\r\n");
    }

    #[test]
    fn c1_controls_are_shown() {
        // U+009B (CSI) and U+0085 (NEL), encoded as UTF-8.
        assert_eq!(
            printable("x\u{9b}2Jy\u{85}".as_bytes()),
            "x\\u{9b}2Jy\\u{85}"
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_shown_as_hex() {
        // A lone 0x9b is the 8-bit CSI to a terminal that is not in UTF-8 mode.
        assert_eq!(printable(b"a\x9b2Jb\xff\xfe"), "a\\x9b2Jb\\xff\\xfe");
        // A sequence cut short, then good text.
        assert_eq!(printable(b"\xe2\x82ok \xe2\x82\xac"), "\\xe2\\x82ok €");
    }

    #[test]
    fn only_a_terminal_without_raw_gets_escapes() {
        assert!(escape_for(true, false));
        assert!(!escape_for(true, true));
        assert!(!escape_for(false, false));
        assert!(!escape_for(false, true));
        let mut out = Vec::new();
        write_bytes(&mut out, b"\x1b[2J\xff", false).unwrap();
        assert_eq!(out, b"\x1b[2J\xff");
        out.clear();
        write_bytes(&mut out, b"\x1b[2J\xff", true).unwrap();
        assert_eq!(out, b"\\x1b[2J\\xff");
        assert_eq!(shown("\x1b[2J", false), "\x1b[2J");
        assert_eq!(shown("\x1b[2J", true), "\\x1b[2J");
    }

    #[test]
    fn json_lines_carry_no_raw_control_and_mean_the_same() {
        let value = serde_json::json!({"stdout": "a\u{1b}[2J\u{9b}b\u{7f}", "n": 1});
        let line = json_line(&value);
        assert!(!line.chars().any(char::is_control), "{line}");
        assert!(
            line.contains("\\u009b") && line.contains("\\u007f"),
            "{line}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap(),
            value
        );
        let plain = serde_json::json!({"a": "b"});
        assert_eq!(json_line(&plain), plain.to_string());
    }
}
