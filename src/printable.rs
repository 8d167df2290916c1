//! Text that came from a broker or an API caller (message ids, business ids, dead-letter reasons,
//! audit details), made safe to show on an operator's terminal or page: control characters and
//! the Unicode marks that reorder text are written out as visible escapes (`\x1b`, `\n`,
//! `\u{202e}`), so a hostile id can neither move the cursor, recolour, retitle or clear the
//! terminal, nor pass for a different id. Everything else is left as it is.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// `text` with every character [`needs_escape`] written as a visible escape; borrowed when there
/// is none (the common case).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push(&mut out, c);
    }
    Cow::Owned(out)
}

/// Replaces `text` by its [`printable`] form, if that differs.
pub fn make_printable(text: &mut String) {
    if let Cow::Owned(p) = printable(text) {
        *text = p;
    }
}

/// An arbitration record with every text that came from a broker or a caller made printable.
pub fn printable_record(mut r: crate::arbiter::Record) -> crate::arbiter::Record {
    make_printable(&mut r.id);
    make_printable(&mut r.owner);
    r.seen.iter_mut().for_each(make_printable);
    if let Some(reason) = &mut r.reason {
        make_printable(reason);
    }
    if let Some((token, _)) = &mut r.lease {
        make_printable(token);
    }
    r
}

/// A parity report with its one-sided ids made printable.
pub fn printable_parity(mut r: crate::parity::ParityReport) -> crate::parity::ParityReport {
    for o in &mut r.one_sided {
        make_printable(&mut o.id);
    }
    r
}

/// Displays its text through [`printable`] (allocating only when there is something to escape).
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match printable(self.0) {
            // Through `pad`, so that width and alignment (`{:<10}`) still apply.
            Cow::Borrowed(s) => f.pad(s),
            Cow::Owned(s) => f.pad(&s),
        }
    }
}

/// Control characters (C0, DEL, C1: a terminal acts on them) and the invisible marks that
/// reorder or hide text (bidirectional overrides and isolates, zero-width characters).
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}' | '\u{feff}'
        )
}

fn push(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if needs_escape(c) && (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["order-7", "ユーザー 42", "a\\x1b b", ""] {
            assert!(matches!(printable(s), Cow::Borrowed(b) if b == s), "{s}");
        }
    }

    #[test]
    fn terminal_controls_are_written_out() {
        assert_eq!(
            printable("id\x1b[2J\x1b]0;pwned\x07"),
            "id\\x1b[2J\\x1b]0;pwned\\x07"
        );
        assert_eq!(printable("a\nb\rc\td\0e\x7f"), "a\\nb\\rc\\td\\x00e\\x7f");
        // C1 controls: U+009B is a one-character CSI on some terminals.
        assert_eq!(printable("x\u{9b}31m"), "x\\u{9b}31m");
    }

    #[test]
    fn marks_that_reorder_or_hide_text_are_written_out() {
        assert_eq!(
            printable("user\u{202e}gnp.exe\u{200b}"),
            "user\\u{202e}gnp.exe\\u{200b}"
        );
    }

    #[test]
    fn display_escapes_and_keeps_the_width() {
        assert_eq!(format!("[{:<6}]", Printable("a\x1b")), "[a\\x1b ]");
        assert_eq!(format!("[{:<6}]", Printable("ab")), "[ab    ]");
    }

    proptest::proptest! {
        #[test]
        fn the_result_never_holds_a_character_that_needs_escaping(s in ".*") {
            let p = printable(&s);
            proptest::prop_assert!(!p.chars().any(needs_escape));
            if !s.chars().any(needs_escape) {
                proptest::prop_assert_eq!(p.as_ref(), s.as_str());
            }
        }
    }
}
