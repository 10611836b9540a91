//! Property tests of the KV block pool and its prefix cache: random sequences of
//! allocate / share / release / register / lookup never double-free, leak, or hand one
//! block to two owners, and the event log a router replays always matches what the
//! prefix cache can serve.

use std::collections::HashSet;

use inferd::engine::kv_cache::{hash_block, Announce, BlockHash, BlockId, BlockPool, KvEvent};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Allocate(usize),
    /// Fork holder i (another holder of the same blocks).
    Share(usize),
    Release(usize),
    /// Register holder i's first block as holding `tokens[seed]`.
    Register(usize, u8),
    Lookup(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..6).prop_map(Op::Allocate),
        (0usize..32).prop_map(Op::Share),
        (0usize..32).prop_map(Op::Release),
        (0usize..32, 0u8..8).prop_map(|(i, t)| Op::Register(i, t)),
        (0u8..8).prop_map(Op::Lookup),
    ]
}

fn contents(seed: u8) -> Vec<u32> {
    (0..4).map(|i| seed as u32 * 10 + i).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_ownership_exact(ops in proptest::collection::vec(op(), 1..120)) {
        const NUM_BLOCKS: usize = 12;
        let mut pool = BlockPool::new(NUM_BLOCKS);
        // Each holder is one owner's list of blocks (a sequence, or a prefix hit).
        let mut holders: Vec<Vec<BlockId>> = Vec::new();
        // What a router that replays the events believes is cached.
        prop_assert!(pool.record_events(true).is_empty());
        let mut replayed: HashSet<BlockHash> = HashSet::new();
        for op in ops {
            match op {
                Op::Allocate(n) => {
                    let free = pool.num_free();
                    match pool.allocate(n) {
                        Some(blocks) => {
                            prop_assert_eq!(blocks.len(), n);
                            // Freshly allocated blocks belong to nobody else.
                            for b in &blocks {
                                prop_assert_eq!(pool.ref_count(*b), 1);
                            }
                            holders.push(blocks);
                        }
                        None => prop_assert!(free < n, "refused with {} free for {}", free, n),
                    }
                }
                Op::Share(i) if !holders.is_empty() => {
                    let blocks = holders[i % holders.len()].clone();
                    pool.share(&blocks);
                    holders.push(blocks);
                }
                Op::Release(i) if !holders.is_empty() => {
                    let blocks = holders.swap_remove(i % holders.len());
                    pool.release(&blocks);
                }
                Op::Register(i, seed) if !holders.is_empty() => {
                    if let Some(&b) = holders[i % holders.len()].first() {
                        let tokens = contents(seed);
                        // Odd contents stand for salted prefixes, never announced.
                        let announce = if seed % 2 == 0 { Announce::After(None) } else { Announce::No };
                        pool.register(b, hash_block(None, &tokens), &tokens, announce);
                    }
                }
                Op::Lookup(seed) => {
                    let tokens = contents(seed);
                    if let Some(b) = pool.lookup(hash_block(None, &tokens), &tokens) {
                        holders.push(vec![b]);
                    }
                }
                _ => {}
            }
            pool.check_invariants();
            for event in pool.take_events() {
                match event {
                    KvEvent::Stored { blocks, .. } => {
                        for (hash, _) in blocks {
                            prop_assert!(replayed.insert(hash), "stored twice: {:?}", hash);
                        }
                    }
                    KvEvent::Removed(hashes) => {
                        for hash in hashes {
                            prop_assert!(replayed.remove(&hash), "removed unknown: {:?}", hash);
                        }
                    }
                    KvEvent::Cleared => replayed.clear(),
                }
            }
            let now: HashSet<BlockHash> = pool
                .record_events(true)
                .into_iter()
                .flat_map(|e| match e {
                    KvEvent::Stored { blocks, .. } => blocks.into_iter().map(|(h, _)| h).collect(),
                    _ => Vec::new(),
                })
                .collect();
            prop_assert_eq!(&replayed, &now);
            // Reference counts are exactly the number of holders of each block.
            let mut refs = [0u32; NUM_BLOCKS];
            for h in &holders {
                for b in h {
                    refs[b.0 as usize] += 1;
                }
            }
            for (b, &r) in refs.iter().enumerate() {
                prop_assert_eq!(pool.ref_count(BlockId(b as u32)), r, "block {}", b);
            }
            prop_assert_eq!(pool.num_free(), refs.iter().filter(|&&r| r == 0).count());
        }
        for h in holders.drain(..) {
            pool.release(&h);
        }
        prop_assert_eq!(pool.num_free(), NUM_BLOCKS);
        pool.check_invariants();
    }
}
