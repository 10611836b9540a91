//! The KV block pool: a fixed set of blocks, reference counts, an LRU queue of free
//! blocks, and the prefix cache (full blocks addressed by a hash of their parent's hash
//! and their token ids). The scheduler owns one pool; sequences hold block ids only.
//!
//! A free block may still hold a cached prefix: it stays findable until it is handed
//! out again, oldest first. Blocks of one sequence are freed tail first, so a shared
//! prefix outlives the private ends of the conversations that used it.
//!
//! When asked (`record_events`), the pool also logs what enters and leaves the prefix
//! cache as `KvEvent`s, for a router outside the process that sends each request where
//! its prefix already is (Dynamo's KV router, through `inferd-dynamo`).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Index of a block in the pool (and in the backend's KV cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Identity of a full block's contents: its token ids and everything before them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Hash of a full block following `parent` (None for a sequence's first block).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed keys: the same on every run and machine.
    let mut h = std::hash::DefaultHasher::new();
    parent.map(|p| p.0).hash(&mut h);
    tokens.hash(&mut h);
    BlockHash(h.finish())
}

/// A change to the set of blocks the prefix cache can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks now findable: a chain, each block the child of the one before it and the
    /// first the child of `parent` (`None`: the first block of a prompt).
    Stored {
        parent: Option<BlockHash>,
        blocks: Vec<(BlockHash, Box<[u32]>)>,
    },
    /// Blocks no longer findable (evicted for new ones).
    Removed(Vec<BlockHash>),
    /// Nothing is cached any more (the engine stopped).
    Cleared,
}

/// Whether a newly cached block is told to routers, and as whose child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// The block follows `parent` (`None`: first block of a prompt).
    After(Option<BlockHash>),
    /// Private: a salted prefix (`cache_salt`, an encoder input), which a router that
    /// sees only token ids would mistake for a plain one.
    No,
}

#[derive(Debug, Clone)]
struct Cached {
    hash: BlockHash,
    tokens: Box<[u32]>,
    announce: Announce,
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set while the block is findable in the prefix cache.
    cached: Option<Cached>,
    /// Key in `free` while `ref_count == 0`.
    free_stamp: u64,
}

#[derive(Debug, Clone)]
pub struct BlockPool {
    meta: Vec<BlockMeta>,
    /// Unreferenced blocks in eviction order (smallest stamp first).
    free: BTreeMap<u64, BlockId>,
    next_stamp: u64,
    /// Prefix cache: block contents -> block.
    by_hash: HashMap<BlockHash, BlockId>,
    prefix_queries: u64,
    prefix_hits: u64,
    /// The event log, while someone listens (`record_events`).
    events: Option<Vec<KvEvent>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks <= u32::MAX as usize, "block ids are u32");
        let mut pool = BlockPool {
            meta: vec![BlockMeta::default(); num_blocks],
            free: BTreeMap::new(),
            next_stamp: 0,
            by_hash: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
            events: None,
        };
        for b in 0..num_blocks as u32 {
            pool.push_free(BlockId(b));
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks no sequence holds (some may still serve prefix-cache hits).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.meta[block.0 as usize].ref_count
    }

    /// (lookups, hits) of the prefix cache so far.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    fn push_free(&mut self, block: BlockId) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.meta[block.0 as usize].free_stamp = stamp;
        self.free.insert(stamp, block);
    }

    /// Takes `n` blocks (each with one reference), evicting the least recently freed
    /// cached blocks; `None` (and nothing taken) when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, block) = self.free.pop_first().expect("counted above");
            let meta = &mut self.meta[block.0 as usize];
            if let Some(cached) = meta.cached.take() {
                if self.by_hash.get(&cached.hash) == Some(&block) {
                    self.by_hash.remove(&cached.hash);
                }
                if let (Some(events), Announce::After(_)) = (&mut self.events, cached.announce) {
                    match events.last_mut() {
                        Some(KvEvent::Removed(hashes)) => hashes.push(cached.hash),
                        _ => events.push(KvEvent::Removed(vec![cached.hash])),
                    }
                }
            }
            meta.ref_count = 1;
            out.push(block);
        }
        Some(out)
    }

    /// One more holder for each block (a forked sequence sharing them).
    pub fn share(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let meta = &mut self.meta[b.0 as usize];
            assert!(meta.ref_count > 0, "share of free block {b:?}");
            meta.ref_count += 1;
        }
    }

    /// Drops one reference from each block, tail first; a block nobody holds becomes
    /// free (and, if cached, stays findable until it is reused).
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let meta = &mut self.meta[b.0 as usize];
            assert!(meta.ref_count > 0, "double free of block {b:?}");
            meta.ref_count -= 1;
            if meta.ref_count == 0 {
                self.push_free(b);
            }
        }
    }

    /// The cached block holding exactly `tokens` after `hash`'s parent, now with one more
    /// reference; `None` on a miss.
    pub fn lookup(&mut self, hash: BlockHash, tokens: &[u32]) -> Option<BlockId> {
        self.prefix_queries += 1;
        let block = *self.by_hash.get(&hash)?;
        let meta = &mut self.meta[block.0 as usize];
        match &meta.cached {
            Some(c) if c.hash == hash && *c.tokens == *tokens => {}
            _ => return None, // a hash collision: treat as a miss
        }
        if meta.ref_count == 0 {
            let stamp = meta.free_stamp;
            self.free.remove(&stamp);
        }
        meta.ref_count += 1;
        self.prefix_hits += 1;
        Some(block)
    }

    /// Makes a full, computed block findable by its contents. If another block already
    /// holds the same contents, that one stays the cached copy.
    ///
    /// One exception: when that copy is free (nobody holds it, so it is next in line for
    /// eviction) and this block is held, the entry moves to this block, unannounced: the
    /// contents stay cached while a sequence builds on them, and a router never hears of
    /// a child whose parent was evicted under it.
    pub fn register(&mut self, block: BlockId, hash: BlockHash, tokens: &[u32], announce: Announce) {
        if self.meta[block.0 as usize].cached.is_some() {
            return;
        }
        if let Some(&old) = self.by_hash.get(&hash) {
            let held = self.meta[block.0 as usize].ref_count > 0;
            if held && old != block && self.meta[old.0 as usize].ref_count == 0 {
                let entry = self.meta[old.0 as usize].cached.take();
                self.meta[block.0 as usize].cached = entry;
                self.by_hash.insert(hash, block);
            }
            return;
        }
        self.meta[block.0 as usize].cached = Some(Cached {
            hash,
            tokens: tokens.into(),
            announce,
        });
        self.by_hash.insert(hash, block);
        if let (Some(events), Announce::After(parent)) = (&mut self.events, announce) {
            match events.last_mut() {
                // The next block of the chain just logged: one event for both.
                Some(KvEvent::Stored { blocks, .. }) if blocks.last().map(|b| b.0) == parent && parent.is_some() => {
                    blocks.push((hash, tokens.into()))
                }
                _ => events.push(KvEvent::Stored {
                    parent,
                    blocks: vec![(hash, tokens.into())],
                }),
            }
        }
    }

    /// Starts (or stops) logging `KvEvent`s. Starting returns what is cached now as
    /// `Stored` events, parents before children, so that a new listener starts whole.
    pub fn record_events(&mut self, on: bool) -> Vec<KvEvent> {
        if !on {
            self.events = None;
            return Vec::new();
        }
        self.events.get_or_insert_with(Vec::new);
        // Depth of each announced block: its chain of cached ancestors.
        let announced: HashMap<BlockHash, (Option<BlockHash>, &[u32])> = self
            .meta
            .iter()
            .filter_map(|m| m.cached.as_ref())
            .filter(|c| self.by_hash.contains_key(&c.hash))
            .filter_map(|c| match c.announce {
                Announce::After(parent) => Some((c.hash, (parent, &c.tokens[..]))),
                Announce::No => None,
            })
            .collect();
        let depth = |mut hash: BlockHash| {
            let mut d = 0usize;
            while let Some((Some(parent), _)) = announced.get(&hash) {
                if d > announced.len() {
                    break; // a cycle cannot happen (hashes chain), but never spin
                }
                d += 1;
                hash = *parent;
            }
            d
        };
        let mut order: Vec<(usize, BlockHash)> = announced.keys().map(|&h| (depth(h), h)).collect();
        order.sort_unstable_by_key(|&(d, h)| (d, h.0));
        order
            .into_iter()
            .map(|(_, hash)| {
                let (parent, tokens) = announced[&hash];
                KvEvent::Stored {
                    parent,
                    blocks: vec![(hash, tokens.into())],
                }
            })
            .collect()
    }

    /// The events logged since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Consistency of the bookkeeping (tests and debug builds).
    pub fn check_invariants(&self) {
        for (i, meta) in self.meta.iter().enumerate() {
            let in_free = self.free.get(&meta.free_stamp) == Some(&BlockId(i as u32));
            assert_eq!(
                meta.ref_count == 0,
                in_free,
                "block {i}: ref {} but in_free {in_free}",
                meta.ref_count
            );
        }
        assert!(self.free.values().all(|b| self.meta[b.0 as usize].ref_count == 0));
        for (hash, block) in &self.by_hash {
            let cached = self.meta[block.0 as usize].cached.as_ref().map(|c| &c.hash);
            assert_eq!(cached, Some(hash), "prefix entry for {block:?} is stale");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_returns_none_when_pool_is_exhausted_and_takes_nothing() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap();
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        pool.release(&a);
        assert_eq!(pool.num_free(), 4);
        pool.check_invariants();
    }

    #[test]
    fn a_released_cached_block_is_found_until_it_is_reused() {
        let mut pool = BlockPool::new(2);
        let tokens = [1, 2, 3, 4];
        let hash = hash_block(None, &tokens);
        let b = pool.allocate(1).unwrap()[0];
        pool.register(b, hash, &tokens, Announce::After(None));
        pool.release(&[b]);
        assert_eq!(pool.lookup(hash, &tokens), Some(b));
        assert_eq!(
            pool.lookup(hash, &[9, 9, 9, 9]),
            None,
            "same hash, other tokens: a miss"
        );
        pool.release(&[b]);
        // Two allocations: the other free block first, then the cached one is evicted.
        let taken = pool.allocate(2).unwrap();
        assert!(taken.contains(&b));
        assert_eq!(pool.lookup(hash, &tokens), None);
        pool.release(&taken);
        pool.check_invariants();
    }

    #[test]
    fn blocks_are_freed_tail_first_so_prefixes_are_evicted_last() {
        let mut pool = BlockPool::new(3);
        let seq = pool.allocate(3).unwrap();
        pool.release(&seq);
        assert_eq!(pool.allocate(1).unwrap(), vec![seq[2]]);
    }

    #[test]
    fn events_log_chains_evictions_and_a_snapshot_parents_first() {
        let mut pool = BlockPool::new(3);
        let (t1, t2) = ([1, 2], [3, 4]);
        let h1 = hash_block(None, &t1);
        let h2 = hash_block(Some(h1), &t2);
        let blocks = pool.allocate(3).unwrap();
        // Nothing is logged until someone listens.
        pool.register(blocks[0], h1, &t1, Announce::After(None));
        assert!(pool.take_events().is_empty());
        let snapshot = pool.record_events(true);
        assert_eq!(
            snapshot,
            vec![KvEvent::Stored {
                parent: None,
                blocks: vec![(h1, t1.into())]
            }]
        );
        pool.register(blocks[1], h2, &t2, Announce::After(Some(h1)));
        let salted = hash_block(Some(BlockHash(7)), &t1);
        pool.register(blocks[2], salted, &t1, Announce::No);
        assert_eq!(
            pool.take_events(),
            vec![KvEvent::Stored {
                parent: Some(h1),
                blocks: vec![(h2, t2.into())]
            }],
            "a salted block is not announced"
        );
        // A later snapshot lists the parent before its child, whatever the block order.
        let again = pool.record_events(true);
        let order: Vec<_> = again
            .iter()
            .map(|e| match e {
                KvEvent::Stored { blocks, .. } => blocks[0].0,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order, vec![h1, h2]);
        pool.release(&blocks);
        // Evicting all three: the two announced ones are removed in one event.
        let taken = pool.allocate(3).unwrap();
        assert_eq!(pool.take_events(), vec![KvEvent::Removed(vec![h2, h1])]);
        pool.release(&taken);
        pool.record_events(false);
        pool.check_invariants();
    }

    #[test]
    fn a_held_copy_takes_over_the_cache_entry_of_a_free_one_silently() {
        let mut pool = BlockPool::new(2);
        pool.record_events(true);
        let tokens = [1, 2];
        let hash = hash_block(None, &tokens);
        let first = pool.allocate(1).unwrap();
        pool.register(first[0], hash, &tokens, Announce::After(None));
        // A second sequence computed the same block before it could share the first.
        let second = pool.allocate(1).unwrap();
        pool.release(&first);
        pool.register(second[0], hash, &tokens, Announce::After(None));
        assert_eq!(pool.take_events().len(), 1, "one store, and no more events");
        // The free copy is evicted first: the cached contents survive it.
        let taken = pool.allocate(1).unwrap();
        assert_eq!(taken, first);
        assert!(pool.take_events().is_empty());
        assert_eq!(pool.lookup(hash, &tokens), Some(second[0]));
        pool.check_invariants();
    }
}
