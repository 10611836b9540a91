//! Structured outputs in the engine: each constrained sequence's grammar matcher, where
//! its constraint starts (at once, after a reasoning block, after a tool call opens),
//! and the masks, computed for the next sampling while the model's forward pass runs.

use std::sync::Arc;

use rayon::prelude::*;

use crate::text::{Grammar, GrammarMatcher, TokenMask};

/// What a request's output must follow, and from where.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub grammar: Arc<Grammar>,
    pub start: ConstraintStart,
}

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.grammar, &other.grammar) && self.start == other.start
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintStart {
    /// From the first output token.
    Now,
    /// A reasoning model's reply may open with `open` (`<think>`): it reasons freely
    /// until `close`, and the answer after it is constrained. A reply that opens with
    /// anything else is constrained from its first token.
    AfterReasoning { open: u32, close: u32 },
    /// Free until `open` (a tool call's opening token) is generated; the rest follows
    /// the grammar.
    AfterToken(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first token: the grammar's, or `open` to start reasoning.
    Opening {
        open: u32,
        close: u32,
    },
    Reasoning {
        close: u32,
    },
    Waiting {
        open: u32,
    },
    Active,
}

/// One sequence's progress through its constraint.
pub struct ConstraintState {
    matcher: GrammarMatcher,
    phase: Phase,
    /// The last token generated under the grammar, consumed with the next mask's
    /// computation (off the engine thread).
    pending: Option<u32>,
    /// The tokens allowed next, when the next token is constrained.
    mask: Option<TokenMask>,
    /// The grammar refused a token or failed: the request fails with this.
    pub error: Option<String>,
}

impl std::fmt::Debug for ConstraintState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintState")
            .field("phase", &self.phase)
            .field("pending", &self.pending)
            .field("error", &self.error)
            .finish()
    }
}

impl ConstraintState {
    pub fn new(constraint: &Constraint) -> Self {
        ConstraintState {
            matcher: constraint.grammar.matcher(),
            phase: match constraint.start {
                ConstraintStart::Now => Phase::Active,
                ConstraintStart::AfterReasoning { open, close } => Phase::Opening { open, close },
                ConstraintStart::AfterToken(open) => Phase::Waiting { open },
            },
            pending: None,
            mask: None,
            error: None,
        }
    }

    /// Consumes the pending token and computes the next mask (what `prepare_all` runs on
    /// the worker threads).
    fn prepare(&mut self) {
        if self.error.is_some() {
            return;
        }
        let result = (|| {
            if let Some(token) = self.pending.take() {
                self.matcher.consume(token)?;
            }
            self.mask = match self.phase {
                Phase::Active => Some(self.matcher.mask()?),
                Phase::Opening { open, .. } => {
                    let mut mask = self.matcher.mask()?;
                    mask.allow(open);
                    Some(mask)
                }
                Phase::Reasoning { .. } | Phase::Waiting { .. } => None,
            };
            Ok::<_, String>(())
        })();
        if let Err(e) = result {
            self.error = Some(format!("structured output: {e}"));
        }
    }

    /// The mask for the token about to be sampled (`None`: unconstrained here).
    pub fn mask(&self) -> Option<&TokenMask> {
        self.mask.as_ref()
    }

    /// Whether sampling the next token needs a mask `prepare` has to compute.
    pub fn constrains_next(&self) -> bool {
        matches!(self.phase, Phase::Active | Phase::Opening { .. })
    }

    /// Records the token just sampled. `ends`: it ends the sequence (nothing to consume).
    pub fn advance(&mut self, token: u32, ends: bool) {
        self.mask = None;
        self.phase = match self.phase {
            Phase::Opening { open, close } if token == open => Phase::Reasoning { close },
            Phase::Reasoning { close } if token == close => Phase::Active,
            Phase::Waiting { open } if token == open => Phase::Active,
            Phase::Opening { .. } | Phase::Active => {
                if !ends {
                    self.pending = Some(token);
                }
                Phase::Active
            }
            other => other,
        };
    }
}

/// Prepares the masks of `states` (the constrained sequences about to sample) on
/// rayon's pool, while `during` runs here: the model's forward pass hides the grammar
/// work.
pub fn prepare_during<R>(states: &mut [&mut ConstraintState], during: impl FnOnce() -> R) -> R {
    if states.is_empty() {
        return during();
    }
    // The forward pass stays on this thread (a CUDA context is current on the thread
    // that made it); the masks go to a scoped thread that fans out on rayon's pool.
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| states.par_iter_mut().for_each(|s| s.prepare()));
        let out = during();
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{GrammarCompiler, GrammarSpec, JsonStyle, Tokenizer};

    const EOS: u32 = 151_645;

    fn setup() -> (Arc<Tokenizer>, Arc<Grammar>) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/qwen2.5-coder-0.5b");
        let tokenizer = Arc::new(Tokenizer::from_dir(std::path::Path::new(dir)).unwrap());
        let compiler = GrammarCompiler::new(tokenizer.clone(), 151_936, vec![EOS]);
        let grammar = compiler
            .compile(
                &GrammarSpec::Choice(vec!["yes".into(), "no".into()]),
                &JsonStyle::default(),
            )
            .unwrap();
        (tokenizer, grammar)
    }

    fn step(state: &mut ConstraintState, token: u32) {
        state.prepare();
        assert!(state.error.is_none(), "{:?}", state.error);
        state.advance(token, token == EOS);
    }

    #[test]
    fn reasoning_is_free_and_the_answer_after_it_is_constrained() {
        let (tok, grammar) = setup();
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        // Stand-ins for `<think>` and `</think>` (this tokenizer has neither).
        let (open, close) = (
            tok.token_to_id("<tool_call>").unwrap(),
            tok.token_to_id("</tool_call>").unwrap(),
        );
        let constraint = Constraint {
            grammar: grammar.clone(),
            start: ConstraintStart::AfterReasoning { open, close },
        };
        // Opening: the grammar's first tokens, or the opening of a reasoning block.
        let mut s = ConstraintState::new(&constraint);
        s.prepare();
        let mask = s.mask().unwrap();
        assert!(mask.allows(open) && mask.allows(id("yes")) && !mask.allows(id("maybe")));
        s.advance(open, false);
        // Reasoning: anything, with no mask to compute.
        for t in [id("maybe"), id(" well"), id("\n")] {
            assert!(!s.constrains_next());
            step(&mut s, t);
            assert!(s.mask().is_none());
        }
        step(&mut s, close);
        // The answer: the grammar from its start.
        assert!(s.constrains_next());
        s.prepare();
        let mask = s.mask().unwrap();
        assert!(mask.allows(id("no")) && !mask.allows(open) && !mask.allows(id("maybe")));
        // A reply that opens with the answer is constrained at once.
        let mut direct = ConstraintState::new(&constraint);
        step(&mut direct, id("no"));
        direct.prepare();
        assert_eq!(direct.mask().unwrap().count(), 1, "only the end token after `no`");
        assert!(direct.mask().unwrap().allows(EOS));
    }

    #[test]
    fn a_tool_call_grammar_starts_after_its_opening_token() {
        let (tok, grammar) = setup();
        let open = tok.token_to_id("<tool_call>").unwrap();
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        let mut s = ConstraintState::new(&Constraint {
            grammar,
            start: ConstraintStart::AfterToken(open),
        });
        for t in [id("Let"), id(" me"), id(" check")] {
            assert!(!s.constrains_next());
            step(&mut s, t);
        }
        step(&mut s, open);
        s.prepare();
        assert!(s.mask().unwrap().allows(id("yes")) && !s.mask().unwrap().allows(id("Let")));
        // A token the grammar refuses (which masking prevents) fails the request.
        s.advance(id("Let"), false);
        s.prepare();
        assert!(
            s.error.as_deref().is_some_and(|e| e.starts_with("structured output:")),
            "{:?}",
            s.error
        );
    }
}
