//! Device names as people see them: a sharer's `--name` is shown in other
//! people's terminals (`offers`, `admin list`) and logs, so it is checked
//! once where it enters (the coordinator refuses others with the reason)
//! and every human-readable printer escapes whatever got through anyway.

use std::borrow::Cow;
use std::fmt;

/// The longest name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    #[error("the name is empty: give --name")]
    Empty,
    #[error("the name is {0} bytes; at most {MAX_NAME_BYTES} bytes of UTF-8")]
    TooLong(usize),
    #[error("the name {shown} holds {what} U+{code:04X}: names are printable text")]
    Unprintable {
        shown: String,
        what: &'static str,
        code: u32,
    },
    #[error("the name {0} starts or ends with white space")]
    Padded(String),
}

/// Characters that move the cursor, reorder text or hide it: controls
/// (C0, DEL, C1), line and paragraph separators, bidirectional overrides
/// and isolates, zero-width characters and the BOM.
fn unprintable(c: char) -> Option<&'static str> {
    match c {
        c if c.is_control() => Some("the control character"),
        '\u{2028}' | '\u{2029}' => Some("the line separator"),
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' => {
            Some("the bidirectional control")
        }
        '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' => Some("the invisible character"),
        _ => None,
    }
}

/// Checks a device name: 1–64 bytes of printable text, no padding.
pub fn check_name(name: &str) -> Result<(), BadName> {
    if name.is_empty() {
        return Err(BadName::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(BadName::TooLong(name.len()));
    }
    if let Some(c) = name.chars().find(|c| unprintable(*c).is_some()) {
        return Err(BadName::Unprintable {
            shown: Printable(name).to_string(),
            what: unprintable(c).unwrap_or("the character"),
            code: c as u32,
        });
    }
    if name.trim() != name {
        return Err(BadName::Padded(Printable(name).to_string()));
    }
    Ok(())
}

/// Text from elsewhere, safe to print to a terminal: unprintable characters
/// become `\u{..}` escapes (and a backslash `\\`), everything else is kept.
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if unprintable(c).is_some() {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            } else if c == '\\' {
                f.write_str("\\\\")?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// `s` escaped for a terminal, borrowed when nothing needed escaping.
pub fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(|c| c == '\\' || unprintable(c).is_some()) {
        Cow::Owned(Printable(s).to_string())
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_printable_text() {
        for ok in [
            "alpha",
            "Café 5G",
            "北京-1",
            "a",
            &"x".repeat(64),
            "bob's phone",
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_name(""), Err(BadName::Empty));
        assert_eq!(check_name(&"é".repeat(33)), Err(BadName::TooLong(66)));
        for bad in [
            "a\nb",
            "\x1b[2Jclear",
            "\x1b]0;title\x07",
            "tab\there",
            "del\x7f",
            "c1\u{9b}",
            "rtl\u{202e}gpj.exe",
            "zw\u{200b}j",
            "ls\u{2028}",
        ] {
            assert!(
                matches!(check_name(bad), Err(BadName::Unprintable { .. })),
                "{bad:?}"
            );
            let shown = printable(bad);
            assert!(
                !shown.chars().any(|c| unprintable(c).is_some()),
                "{shown:?}"
            );
        }
        assert!(matches!(check_name(" pad"), Err(BadName::Padded(_))));
        let e = check_name("x\x1b[2J").expect_err("escape").to_string();
        assert!(
            e.contains("U+001B") && e.contains("\\u{1b}") && !e.contains('\x1b'),
            "{e}"
        );
        assert_eq!(printable("plain"), Cow::Borrowed("plain"));
        assert_eq!(printable("a\\u{1b}"), "a\\\\u{1b}");
    }
}
