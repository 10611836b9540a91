//! Qwen3-style reasoning: a reply that opens with `<think>` keeps its reasoning until
//! `</think>`; the rest is the answer. Split as the text streams, holding back a tail
//! that could be the start of a tag, so neither tag reaches the client.

use super::stop::longest_suffix_prefix;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace seen yet: a reply may still open with `<think>`.
    Start,
    Thinking,
    /// Just after `</think>`: the newlines that separate it from the answer are dropped.
    AfterThinking,
    Answer,
}

/// Splits streamed text into (reasoning, content).
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    held: String,
}

impl Default for ReasoningParser {
    fn default() -> Self {
        ReasoningParser {
            state: State::Start,
            held: String::new(),
        }
    }
}

impl ReasoningParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds text; returns (reasoning, content) that became final.
    pub fn push(&mut self, piece: &str) -> (String, String) {
        self.held.push_str(piece);
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.held = rest.trim_start_matches('\n').to_owned();
                        self.state = State::Thinking;
                    } else if trimmed.is_empty() || OPEN.starts_with(trimmed) {
                        return (reasoning, content); // still undecided
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Thinking => match self.held.find(CLOSE) {
                    Some(at) => {
                        reasoning.push_str(self.held[..at].trim_end_matches('\n'));
                        self.held = self.held[at + CLOSE.len()..].to_owned();
                        self.state = State::AfterThinking;
                    }
                    None => {
                        // Hold back a possible `</think>` start and the newlines before it.
                        let keep = longest_suffix_prefix(&self.held, CLOSE);
                        let release = self.held[..self.held.len() - keep].trim_end_matches('\n').len();
                        reasoning.push_str(&self.held[..release]);
                        self.held.drain(..release);
                        return (reasoning, content);
                    }
                },
                State::AfterThinking => {
                    let trimmed = self.held.trim_start_matches('\n');
                    if trimmed.is_empty() {
                        self.held.clear();
                        return (reasoning, content);
                    }
                    self.held = trimmed.to_owned();
                    self.state = State::Answer;
                }
                State::Answer => {
                    content.push_str(&self.held);
                    self.held.clear();
                    return (reasoning, content);
                }
            }
        }
    }

    /// The end of the stream: whatever is held goes where it was heading.
    pub fn finish(&mut self) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Thinking => (held.trim_end_matches('\n').to_owned(), String::new()),
            State::AfterThinking => (String::new(), String::new()),
            State::Start | State::Answer => (String::new(), held),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new();
        let (mut r, mut c) = (String::new(), String::new());
        for piece in pieces {
            let (a, b) = p.push(piece);
            r.push_str(&a);
            c.push_str(&b);
        }
        let (a, b) = p.finish();
        (r + &a, c + &b)
    }

    #[test]
    fn thinking_split_across_pieces_goes_to_reasoning() {
        assert_eq!(
            run(&[
                "<th",
                "ink>\nLet me add.",
                " 2+2=4\n",
                "</thi",
                "nk>\n",
                "\nThe answer is 4."
            ]),
            ("Let me add. 2+2=4".into(), "The answer is 4.".into())
        );
    }

    #[test]
    fn replies_without_thinking_are_all_content() {
        assert_eq!(
            run(&["The", " answer <think> is 4."]),
            (String::new(), "The answer <think> is 4.".into())
        );
        assert_eq!(run(&["<", "b>bold</b>"]), (String::new(), "<b>bold</b>".into()));
        // Cut off while thinking: what came is reasoning.
        assert_eq!(run(&["<think>\nhmm"]), ("hmm".into(), String::new()));
    }
}
