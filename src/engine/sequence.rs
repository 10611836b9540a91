//! One sequence being generated: its tokens, how many of them are in the KV cache, and
//! the blocks that hold them. A request with `n > 1` has one sequence per completion.

use super::constraint::ConstraintState;
use super::kv_cache::{hash_block, BlockHash, BlockId};
use super::sampling::Rng;

/// A request, as the engine's caller names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// The id of a token the step in flight chooses on the device, in a sequence's tokens
/// until the engine reads it (async scheduling; never a vocabulary id).
pub const PLACEHOLDER: u32 = u32::MAX;

#[derive(Debug)]
pub struct Sequence {
    /// Unique among the engine's sequences (steps in flight name sequences by it).
    pub uid: u64,
    pub request: RequestId,
    /// Which completion of the request (0..n).
    pub index: usize,
    /// The prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache (`tokens[..num_computed]`).
    pub num_computed: usize,
    /// Blocks holding positions `0..num_computed` (and room for the next chunk).
    pub blocks: Vec<BlockId>,
    /// Content hashes of the leading full blocks computed so far.
    pub hashes: Vec<BlockHash>,
    /// Prompt tokens served by the prefix cache when the request was first admitted.
    pub num_cached_prompt_tokens: Option<usize>,
    pub rng: Rng,
    /// Parent hash of the first block: what else besides the tokens the cached K/V
    /// depend on (an encoder input's content), so that blocks are shared only between
    /// sequences with the same.
    pub cache_salt: Option<BlockHash>,
    /// Its request's encoder has yet to run (the scheduler admits few such a step).
    pub needs_encoder: bool,
    /// Admission order among waiting sequences: lowest first.
    pub priority: i64,
    /// For a request that asked for prompt log-probabilities: the prompt positions
    /// before this one have theirs (position 0 has none). Until the whole prompt has,
    /// the prompt is computed, not taken from the prefix cache.
    pub prompt_logprobs_done: Option<usize>,
    /// Structured outputs: where the output is in its grammar.
    pub constraint: Option<Box<ConstraintState>>,
    /// The token count at which the sequence ends by length (`max_tokens`, the context
    /// window): with async scheduling its last token may still be a placeholder then,
    /// and the scheduler computes nothing more for it.
    pub max_len: usize,
    /// When its last token is a `PLACEHOLDER`: the row of the step in flight that
    /// chooses it. (With async scheduling a sequence may hold two placeholders, the
    /// tokens of the step being read and of the one launched after it.)
    pub placeholder_row: Option<usize>,
    /// Times the sequence was preempted: a step launched before a preemption does not
    /// register the blocks it filled (they went back to the pool).
    pub epoch: u32,
}

impl Sequence {
    pub fn new(request: RequestId, index: usize, prompt: Vec<u32>, rng: Rng) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT_UID: AtomicU64 = AtomicU64::new(0);
        Sequence {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            request,
            index,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            num_cached_prompt_tokens: None,
            rng,
            cache_salt: None,
            needs_encoder: false,
            priority: 0,
            prompt_logprobs_done: None,
            constraint: None,
            max_len: usize::MAX,
            placeholder_row: None,
            epoch: 0,
        }
    }

    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// Whether nothing more is to be computed for it: it reached its length (its last
    /// token may be a placeholder still in flight).
    pub fn is_complete(&self) -> bool {
        self.tokens.len() >= self.max_len
    }

    pub fn with_constraint(mut self, constraint: Option<&super::sampling::Constraint>) -> Self {
        self.constraint = constraint.map(|c| Box::new(ConstraintState::new(c)));
        self
    }

    pub fn with_cache_salt(mut self, salt: Option<BlockHash>) -> Self {
        self.cache_salt = salt;
        self
    }

    /// Whether admission may take its prompt from the prefix cache.
    pub fn may_reuse_prefix(&self) -> bool {
        self.prompt_logprobs_done.is_none_or(|done| done >= self.prompt_len)
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not yet in the cache (the next chunk to compute).
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Hashes of full blocks `self.hashes.len()..` of `tokens[..upto]`.
    pub fn extend_hashes(&mut self, block_size: usize, upto: usize) -> impl Iterator<Item = (usize, BlockHash)> + '_ {
        let start = self.hashes.len();
        let end = upto.min(self.tokens.len()) / block_size;
        (start..end).map(move |b| {
            let hash = hash_block(
                self.hashes.last().copied().or(self.cache_salt),
                &self.tokens[b * block_size..(b + 1) * block_size],
            );
            self.hashes.push(hash);
            (b, hash)
        })
    }
}
