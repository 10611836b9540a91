//! Stop strings, matched on detokenized text as it streams. Text that could be the start
//! of a stop string is held back until it is known not to be one, so a client never sees
//! part of a stop string; on a match, the text before it is released and generation
//! should be cancelled (the engine works on ids and knows nothing of strings).

/// Feeds streamed text through a set of stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    held: String,
    stopped: bool,
}

/// What one piece of text turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that is safe to show now.
    pub text: String,
    /// The stop string that matched; nothing follows it.
    pub matched: Option<String>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a piece of text. After a match every later piece is dropped.
    pub fn push(&mut self, piece: &str) -> StopOutput {
        if self.stopped {
            return StopOutput {
                text: String::new(),
                matched: None,
            };
        }
        self.held.push_str(piece);
        // The earliest match wins (ties: the longest stop string).
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            let text = self.held[..at].to_owned();
            self.held.clear();
            self.stopped = true;
            return StopOutput {
                text,
                matched: Some(stop),
            };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let release = self.held.len() - keep;
        let text = self.held[..release].to_owned();
        self.held.drain(..release);
        StopOutput { text, matched: None }
    }

    /// The end of the stream: whatever is held is not a stop string after all.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, cut at a
/// character boundary of `text`: what a streaming matcher must hold back. Shared by the
/// stop-string, tool-call and reasoning parsers.
pub(crate) fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.text);
            if o.matched.is_some() {
                return (out, o.matched);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_shown() {
        let mut m = StopMatcher::new(["</end>".to_string()]);
        assert_eq!(m.push("Hello </").text, "Hello ");
        assert_eq!(m.push("en").text, "");
        let last = m.push("d> more");
        assert_eq!((last.text.as_str(), last.matched.as_deref()), ("", Some("</end>")));
        assert!(m.is_stopped());
        assert_eq!(m.push("ignored").text, "");
    }

    #[test]
    fn held_text_that_turns_out_not_to_stop_is_released() {
        assert_eq!(run(&["STOP"], &["a ST", "ART b"]), ("a START b".into(), None));
        assert_eq!(run(&["STOP"], &["tail S"]), ("tail S".into(), None));
    }

    #[test]
    fn the_earliest_match_wins_and_unicode_is_cut_at_characters() {
        assert_eq!(run(&["b", "abc"], &["xxabc"]), ("xx".into(), Some("abc".into())));
        assert_eq!(run(&["ab", "abc"], &["xabcd"]), ("x".into(), Some("abc".into())));
        assert_eq!(run(&["é!"], &["café", "!", "x"]), ("caf".into(), Some("é!".into())));
        assert_eq!(
            run(&["", "\n\n"], &["one\n", "\ntwo"]),
            ("one".into(), Some("\n\n".into()))
        );
    }
}
