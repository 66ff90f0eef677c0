//! The text scan: the text of a simple Query or a Parse, looked at as it streams past for
//! what no hand-over can read back from the server — custom settings (`SET app.x`,
//! `set_config(...)`: `pg_settings` does not list them) and `LISTEN`. Conservative: a
//! false alarm (`UPDATE t SET a.b = 1`) only keeps a session where it is.
//!
//! A state machine fed byte by byte: what it finds does not depend on where the reads
//! cut the text, and nothing is held back or copied.

use super::tracker::Opaque;

/// The scan of one message's text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Scanner {
    /// The previous byte was part of a word (false at the start of a message).
    after_word: bool,
    /// Bytes of `set_config` matched so far (anywhere: also `pg_catalog.set_config`).
    set_config: u8,
    /// Bytes of the word `listen` matched so far; 6: found if whitespace or the end of
    /// the text follows.
    listen: u8,
    /// Bytes of the word `set` matched so far; 3: a statement starts if whitespace
    /// follows.
    set: u8,
    /// Where in `SET [SESSION] [LOCAL] name` the text stands.
    statement: SetStatement,
    found: Option<Opaque>,
}

/// `SET [SESSION] [LOCAL] name`: a name with a dot is a custom setting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum SetStatement {
    /// Not in one.
    #[default]
    Outside,
    /// Between words; `keywords`: 0 while SESSION or LOCAL may come, 1 while only LOCAL
    /// may, 2 after it.
    Gap { keywords: u8 },
    /// In a word: its first bytes (to tell SESSION and LOCAL) and its length.
    Word {
        keywords: u8,
        start: [u8; 7],
        len: usize,
    },
}

const SET_CONFIG: &[u8] = b"set_config";
const LISTEN: &[u8] = b"listen";
const SET: &[u8] = b"set";

/// A byte of an SQL word (what may stand before or after a keyword).
fn word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

/// A byte of a setting's name as `SET` takes it (quoted parts included).
fn name(b: u8) -> bool {
    word(b) || b == b'.' || b == b'"'
}

/// One step of matching `pattern` (which has no prefix that is also its suffix, so a
/// mismatch never needs to look back): the bytes matched after `b`.
fn step(pattern: &[u8], matched: u8, b: u8, may_start: bool) -> u8 {
    let m = usize::from(matched);
    if m > 0 && m < pattern.len() && b == pattern[m] {
        matched + 1
    } else {
        u8::from(may_start && b == pattern[0])
    }
}

impl Scanner {
    /// Start on the text of a new message.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// More of the text.
    pub(crate) fn feed(&mut self, text: &[u8]) {
        for &b in text {
            if self.found.is_some() {
                return;
            }
            self.byte(b.to_ascii_lowercase());
        }
    }

    /// The text is complete: what it holds, if anything.
    pub(crate) fn finish(&mut self) -> Option<Opaque> {
        if self.listen == 6 {
            self.found.get_or_insert(Opaque::Listen);
        }
        self.found
    }

    fn byte(&mut self, b: u8) {
        let space = b.is_ascii_whitespace();
        self.statement = match self.statement {
            SetStatement::Outside => SetStatement::Outside,
            SetStatement::Gap { keywords } if space => SetStatement::Gap { keywords },
            SetStatement::Gap { keywords } if name(b) => SetStatement::Word {
                keywords,
                start: [b, 0, 0, 0, 0, 0, 0],
                len: 1,
            },
            SetStatement::Word {
                keywords,
                mut start,
                len,
            } if name(b) => {
                if let Some(at) = start.get_mut(len) {
                    *at = b;
                }
                SetStatement::Word {
                    keywords,
                    start,
                    len: len + 1,
                }
            }
            SetStatement::Word {
                keywords,
                start,
                len,
            } if space => match (&start[..len.min(7)], keywords) {
                (b"session", 0) => SetStatement::Gap { keywords: 1 },
                (b"local", 0 | 1) => SetStatement::Gap { keywords: 2 },
                _ => SetStatement::Outside,
            },
            SetStatement::Gap { .. } | SetStatement::Word { .. } => SetStatement::Outside,
        };
        if b == b'.' && matches!(self.statement, SetStatement::Word { .. }) {
            self.found = Some(Opaque::CustomSetting);
        }
        if self.set == 3 && space {
            self.statement = SetStatement::Gap { keywords: 0 };
        }
        if self.listen == 6 && space {
            self.found = Some(Opaque::Listen);
        }
        let may_start = !self.after_word;
        self.set_config = step(SET_CONFIG, self.set_config, b, true);
        if usize::from(self.set_config) == SET_CONFIG.len() {
            self.found = Some(Opaque::SetConfig);
        }
        self.listen = step(LISTEN, self.listen, b, may_start);
        self.set = step(SET, self.set, b, may_start);
        self.after_word = word(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_chunks(text: &str, split: usize) -> Option<Opaque> {
        let mut s = Scanner::default();
        for chunk in text.as_bytes().chunks(split) {
            s.feed(chunk);
        }
        s.finish()
    }

    #[test]
    fn the_scan_finds_what_a_hand_over_cannot_carry_across_any_split() {
        let cases = [
            ("SET app.tenant_id = 'acme'", Some(Opaque::CustomSetting)),
            (
                "set session  \"app\".\"tenant\" to 1",
                Some(Opaque::CustomSetting),
            ),
            (
                "BEGIN; SET LOCAL app.x = 1; COMMIT",
                Some(Opaque::CustomSetting),
            ),
            ("SET\tSESSION\nLOCAL a.b TO 2", Some(Opaque::CustomSetting)),
            ("set x set y.z = 1", Some(Opaque::CustomSetting)),
            (
                "SELECT set_config('app.x', '1', false)",
                Some(Opaque::SetConfig),
            ),
            ("listen news", Some(Opaque::Listen)),
            ("SELECT 1; LISTEN", Some(Opaque::Listen)),
            // A long way between SET and the name: no window to fall out of.
            (
                &format!("SET{}app.x = 1", " ".repeat(500)),
                Some(Opaque::CustomSetting),
            ),
            // A false alarm the scan accepts (it only keeps a session where it is).
            ("UPDATE t SET a.b = 1", Some(Opaque::CustomSetting)),
            ("SET search_path = public", None),
            ("SET SESSION search_path TO a", None),
            ("SELECT offset, reset FROM t", None),
            ("SELECT 'settings.x'", None),
            ("SELECT listener_id FROM t", None),
            ("UNLISTEN news", None),
            ("SET session", None),
            ("RESET app.x", None),
        ];
        for (text, want) in cases {
            for split in 1..=text.len() {
                assert_eq!(scan_in_chunks(text, split), want, "{text:?} split {split}");
            }
        }
    }

    /// The scan this one replaced (a window over the last 160 bytes, searched after each
    /// read), over a whole text: the oracle for texts short enough to fit its window.
    fn windowed(text: &str) -> bool {
        let t = text.to_ascii_lowercase().into_bytes();
        let find = |needle: &[u8]| t.windows(needle.len()).any(|w| w == needle);
        if find(b"set_config") {
            return true;
        }
        let mut at = 0;
        while let Some(p) = t[at..].windows(6).position(|w| w == b"listen") {
            let start = at + p;
            at = start + 6;
            let before = start == 0 || !word(t[start - 1]);
            let after = t.get(start + 6).is_none_or(|b| b.is_ascii_whitespace());
            if before && after {
                return true;
            }
        }
        let mut at = 0;
        while let Some(p) = t[at..].windows(3).position(|w| w == b"set") {
            let start = at + p;
            at = start + 3;
            if start > 0 && word(t[start - 1]) {
                continue;
            }
            let mut i = start + 3;
            if i >= t.len() || !t[i].is_ascii_whitespace() {
                continue;
            }
            let skip_ws = |mut i: usize| {
                while i < t.len() && t[i].is_ascii_whitespace() {
                    i += 1;
                }
                i
            };
            i = skip_ws(i);
            for kw in [&b"session"[..], b"local"] {
                if t[i..].starts_with(kw)
                    && t.get(i + kw.len()).is_some_and(u8::is_ascii_whitespace)
                {
                    i = skip_ws(i + kw.len());
                }
            }
            let end = t[i..]
                .iter()
                .position(|&b| !name(b))
                .map_or(t.len(), |n| i + n);
            if t[i..end].contains(&b'.') {
                return true;
            }
        }
        false
    }

    #[test]
    fn the_scan_agrees_with_the_windowed_one_it_replaced() {
        // Every text of up to 5 words from pieces that make and break the patterns.
        let pieces = [
            "set", "SET", " ", "\t", "session", "local", "listen", "x.y", "\"a\".b", "_", "$", "(",
            "config", "set_", "a", ".", "=",
        ];
        let mut texts = vec![String::new()];
        for _ in 0..5 {
            texts = texts
                .iter()
                .flat_map(|t| pieces.iter().map(move |p| format!("{t}{p}")))
                .collect();
            for text in &texts {
                assert_eq!(
                    scan_in_chunks(text, text.len().max(1)).is_some(),
                    windowed(text),
                    "{text:?}"
                );
            }
        }
    }
}
