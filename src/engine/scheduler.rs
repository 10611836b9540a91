//! Which tokens each step computes. No prefill or decode phase: every sequence's
//! `num_computed` catches up with its token count under one token budget. A step takes
//! running sequences needing one token (decodes) first, then running sequences still
//! prefilling, then waiting ones by priority, in arrival order among equals (FCFS),
//! each prompt in chunks that fit
//! the budget (chunked prefill). When blocks run out the newest running sequence is
//! preempted: its blocks are released and it is recomputed later (the prefix cache often
//! still holds them).

use std::collections::VecDeque;

use super::kv_cache::{Announce, BlockPool};
use super::sequence::{RequestId, Sequence};

/// Sequences whose encoder has yet to run admitted per step: an encoder pass is long
/// (a Whisper window: hundreds of ms on a CPU), and every running sequence waits for
/// the step, so passes are spread over steps with decodes in between.
pub const MAX_ENCODER_ADMISSIONS_PER_STEP: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Most sequences computed in one step.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (the chunked-prefill budget).
    pub max_num_batched_tokens: usize,
}

/// One step's work: `(index into running, number of new tokens)`, in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<(usize, usize)>,
}

pub struct Scheduler {
    pub config: SchedulerConfig,
    pub pool: BlockPool,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    pub num_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        assert!(config.block_size > 0 && config.max_num_seqs > 0 && config.max_num_batched_tokens > 0);
        Scheduler {
            pool: BlockPool::new(config.num_blocks),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence after every waiting one of the same or a lower priority
    /// value (first come, first served among equals).
    pub fn enqueue(&mut self, seq: Sequence) {
        let at = self
            .waiting
            .iter()
            .position(|s| s.priority > seq.priority)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Grows `seq`'s blocks to hold `n` more tokens; false (nothing taken) if the pool
    /// is short.
    fn reserve(pool: &mut BlockPool, block_size: usize, seq: &mut Sequence, n: usize) -> bool {
        let need = (seq.num_computed + n)
            .div_ceil(block_size)
            .saturating_sub(seq.blocks.len());
        match pool.allocate(need) {
            Some(blocks) => {
                seq.blocks.extend(blocks);
                true
            }
            None => false,
        }
    }

    /// Releases a sequence's blocks and queues it for recomputation, first in line;
    /// `chunks` already planned keep pointing at the same sequences.
    fn preempt(&mut self, running_index: usize, chunks: &mut [(usize, usize)]) {
        for c in chunks.iter_mut().filter(|c| c.0 > running_index) {
            c.0 -= 1;
        }
        let mut seq = self.running.remove(running_index);
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.epoch += 1;
        self.waiting.push_front(seq);
        self.num_preemptions += 1;
    }

    pub fn schedule(&mut self) -> StepPlan {
        let bs = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        // Running sequences: decodes first, then unfinished prefills.
        for decodes in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let pending = self.running[i].num_pending();
                if (pending == 1) != decodes
                    || pending == 0
                    || self.running[i].is_complete()
                    || chunks.iter().any(|c| c.0 == i)
                {
                    i += 1;
                    continue;
                }
                let n = pending.min(budget);
                if Self::reserve(&mut self.pool, bs, &mut self.running[i], n) {
                    chunks.push((i, n));
                    budget -= n;
                    i += 1;
                    continue;
                }
                // Out of blocks: preempt the newest sequence not yet in this step.
                match (i + 1..self.running.len())
                    .rev()
                    .find(|j| !chunks.iter().any(|c| c.0 == *j))
                {
                    Some(victim) => self.preempt(victim, &mut chunks),
                    None => {
                        // Nothing newer to take from: this one waits (and everyone after it).
                        let scheduled_after = chunks.iter().any(|c| c.0 > i);
                        if scheduled_after {
                            i += 1;
                        } else {
                            self.preempt(i, &mut chunks);
                        }
                    }
                }
            }
        }
        // Waiting sequences, in queue order (`enqueue`), while there is room.
        let mut encoder_admissions = 0;
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else { break };
            if seq.is_complete() {
                break; // preempted with its last token in flight: it ends when that is read
            }
            if seq.needs_encoder {
                if encoder_admissions == MAX_ENCODER_ADMISSIONS_PER_STEP {
                    break;
                }
                encoder_admissions += 1;
            }
            let mut prefix_blocks = Vec::new();
            if seq.blocks.is_empty() && seq.may_reuse_prefix() {
                // Longest cached prefix of full blocks, leaving at least one token to
                // compute (its logits pick the next token).
                let reusable = (seq.tokens.len() - 1) / bs;
                seq.hashes.truncate(0);
                let hashes: Vec<_> = seq.extend_hashes(bs, reusable * bs).collect();
                for (b, hash) in hashes {
                    match self.pool.lookup(hash, &seq.tokens[b * bs..(b + 1) * bs]) {
                        Some(block) => prefix_blocks.push(block),
                        None => break,
                    }
                }
                seq.hashes.truncate(prefix_blocks.len());
                seq.num_computed = prefix_blocks.len() * bs;
                seq.blocks = prefix_blocks.clone();
            }
            let n = seq.num_pending().min(budget);
            if !Self::reserve(&mut self.pool, bs, seq, n) {
                // Hand back what the prefix lookup took; try again next step.
                self.pool.release(&prefix_blocks);
                if !prefix_blocks.is_empty() {
                    seq.blocks.clear();
                    seq.num_computed = 0;
                }
                break;
            }
            if seq.num_cached_prompt_tokens.is_none() {
                seq.num_cached_prompt_tokens = Some(seq.num_computed.min(seq.prompt_len));
            }
            let seq = self.waiting.pop_front().expect("front exists");
            self.running.push(seq);
            chunks.push((self.running.len() - 1, n));
            budget -= n;
        }
        StepPlan { chunks }
    }

    /// Marks a plan's tokens as computed (when its step is launched: the next plan
    /// starts after them).
    pub fn advance(&mut self, plan: &StepPlan) {
        for &(i, n) in &plan.chunks {
            self.running[i].num_computed += n;
        }
    }

    /// Makes the full blocks of running sequence `i` up to token `upto` findable by the
    /// prefix cache, once the step that computed them has run (and their tokens are
    /// known).
    pub fn register_computed(&mut self, i: usize, upto: usize) {
        let bs = self.config.block_size;
        let seq = &mut self.running[i];
        let new: Vec<_> = seq.extend_hashes(bs, upto).collect();
        for (b, hash) in new {
            let tokens = &seq.tokens[b * bs..(b + 1) * bs];
            assert!(
                !tokens.contains(&super::sequence::PLACEHOLDER),
                "a block is registered once its tokens are known"
            );
            let announce = match seq.cache_salt {
                Some(_) => Announce::No,
                None => Announce::After(b.checked_sub(1).map(|p| seq.hashes[p])),
            };
            self.pool.register(seq.blocks[b], hash, tokens, announce);
        }
    }

    /// Where the sequence `uid` is: `Ok(index into running)` or `Err(index into
    /// waiting)`; `None` once it is gone.
    pub fn locate(&self, uid: u64) -> Option<Result<usize, usize>> {
        if let Some(i) = self.running.iter().position(|s| s.uid == uid) {
            return Some(Ok(i));
        }
        self.waiting.iter().position(|s| s.uid == uid).map(Err)
    }

    pub fn sequence_mut(&mut self, at: Result<usize, usize>) -> &mut Sequence {
        match at {
            Ok(i) => &mut self.running[i],
            Err(i) => &mut self.waiting[i],
        }
    }

    /// Removes a sequence for good, wherever it is, releasing its blocks.
    pub fn finish_at(&mut self, at: Result<usize, usize>) -> Sequence {
        match at {
            Ok(i) => self.finish(i),
            Err(i) => {
                let seq = self.waiting.remove(i).expect("a waiting sequence");
                self.pool.release(&seq.blocks);
                seq
            }
        }
    }

    /// Removes a running sequence for good, releasing its blocks.
    pub fn finish(&mut self, running_index: usize) -> Sequence {
        let seq = self.running.remove(running_index);
        self.pool.release(&seq.blocks);
        seq
    }

    /// Request ids with a sequence that has never been admitted.
    pub fn unadmitted_requests(&self) -> std::collections::HashSet<RequestId> {
        self.waiting
            .iter()
            .filter(|s| s.num_cached_prompt_tokens.is_none())
            .map(|s| s.request)
            .collect()
    }

    /// Removes every sequence of `request`, waiting or running, releasing its blocks.
    pub fn remove_request(&mut self, request: RequestId) -> usize {
        let before = self.waiting.len() + self.running.len();
        for seq in self
            .waiting
            .iter()
            .chain(self.running.iter())
            .filter(|s| s.request == request)
        {
            self.pool.release(&seq.blocks);
        }
        self.waiting.retain(|s| s.request != request);
        self.running.retain(|s| s.request != request);
        before - self.waiting.len() - self.running.len()
    }

    pub fn num_blocks_in_use(&self) -> usize {
        self.pool.num_blocks() - self.pool.num_free()
    }

    /// Most tokens one sequence can hold: the whole pool.
    pub fn max_tokens_per_sequence(&self) -> usize {
        self.pool.num_blocks() * self.config.block_size
    }
}
