//! How a device's paged attention splits each row's keys across thread blocks (split-K,
//! as FlashDecoding does), so that a few long rows still fill the device. Two plans:
//!
//! - by context (the default): the number of splits and their length follow the longest
//!   row of the batch, so the grid depends on the data;
//! - fixed: the number of splits follows the grid alone (rows, head groups, the device's
//!   multiprocessors), and each row cuts its own keys into that many equal parts, rounded
//!   to the key chunk, on the device. The launch shape is then the same for every batch
//!   of a size, which a captured CUDA graph needs.
//!
//! Pure arithmetic, so that it is tested on every machine; the CUDA backend launches by
//! it (kernels/attention.cu computes [`split_range`] per row when the split length is 0).

use std::ops::Range;

/// Most splits of the fixed plan (its partial buffer is `splits` rows of partial
/// results per (row, head)).
pub const MAX_FIXED_SPLITS: usize = 16;

/// Splits and split length (keys, a multiple of `chunk`) by context: enough splits that
/// `blocks` blocks per split make two per multiprocessor, no more than the longest row
/// (`max_visible` keys) has pairs of chunks, then the fewest splits of that length.
pub fn splits_by_context(sm_count: usize, blocks: usize, max_visible: usize, chunk: usize) -> (usize, usize) {
    let max_visible = max_visible.max(1);
    let splits = splits_wanted(sm_count, blocks, max_visible, chunk);
    let split_len = max_visible.div_ceil(splits).next_multiple_of(chunk);
    (max_visible.div_ceil(split_len), split_len)
}

/// The splits [`splits_by_context`] starts from (before rounding their length to whole
/// chunks, which may leave fewer).
pub fn splits_wanted(sm_count: usize, blocks: usize, max_visible: usize, chunk: usize) -> usize {
    let want = (2 * sm_count).div_ceil(blocks.max(1));
    want.clamp(1, max_visible.max(1).div_ceil(2 * chunk).max(1))
}

/// Splits of the fixed plan: enough that `blocks` blocks per split make two per
/// multiprocessor, at most [`MAX_FIXED_SPLITS`]. It does not look at the rows' lengths.
pub fn fixed_splits(sm_count: usize, blocks: usize) -> usize {
    (2 * sm_count).div_ceil(blocks.max(1)).clamp(1, MAX_FIXED_SPLITS)
}

/// The keys split `split` of `splits` covers in a row of `visible` keys under the fixed
/// plan: equal parts rounded up to `chunk`, the last ones possibly empty.
pub fn split_range(visible: usize, splits: usize, split: usize, chunk: usize) -> Range<usize> {
    let len = visible.div_ceil(splits.max(1)).next_multiple_of(chunk).max(chunk);
    let begin = (split * len).min(visible);
    begin..((split + 1) * len).min(visible)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_splits_cover_each_row_once_in_chunk_multiples() {
        for chunk in [1, 64, 128] {
            for splits in 1..=MAX_FIXED_SPLITS {
                for visible in (1..3000).step_by(37).chain([1, 127, 128, 129, 8192, 32_768]) {
                    let ranges: Vec<Range<usize>> =
                        (0..splits).map(|s| split_range(visible, splits, s, chunk)).collect();
                    assert_eq!(ranges[0].start, 0);
                    assert_eq!(ranges[splits - 1].end, visible, "{visible} keys in {splits}");
                    for pair in ranges.windows(2) {
                        assert_eq!(pair[0].end, pair[1].start, "contiguous");
                    }
                    for r in &ranges {
                        assert!(r.start <= r.end);
                        // Every split but the row's last one with keys is whole chunks.
                        if r.end < visible {
                            assert_eq!(r.len() % chunk, 0, "{r:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_fixed_plan_depends_on_the_grid_alone_and_fills_the_device() {
        let sms = 132; // an H100 SXM
        assert_eq!(fixed_splits(sms, 2), MAX_FIXED_SPLITS, "batch 1, 2 KV heads: capped");
        assert_eq!(fixed_splits(sms, 28), 10, "batch 1, 28 heads: 280 blocks >= 264");
        assert_eq!(fixed_splits(sms, 64 * 2), 3);
        assert_eq!(fixed_splits(sms, 256 * 2), 1, "a full batch needs no split");
        for blocks in 1..2000 {
            let s = fixed_splits(sms, blocks);
            assert!(
                blocks * s >= 2 * sms || s == MAX_FIXED_SPLITS,
                "{blocks} blocks, {s} splits"
            );
            assert!(s == 1 || blocks * (s - 1) < 2 * sms, "no more splits than needed");
        }
    }

    #[test]
    fn splits_by_context_follow_the_longest_row() {
        // One row of 8k keys, 2 blocks per split on 132 multiprocessors: 32 splits of 256.
        assert_eq!(splits_by_context(132, 2, 8192, 128), (32, 256));
        // Short rows are not split.
        assert_eq!(splits_by_context(132, 2, 100, 128), (1, 128));
        // Many blocks: one split of the whole row.
        assert_eq!(splits_by_context(132, 1000, 5000, 128), (1, 5120));
        for max_visible in [1, 129, 1000, 4097, 32_768] {
            let (splits, len) = splits_by_context(132, 14, max_visible, 128);
            assert_eq!(len % 128, 0);
            assert!(splits * len >= max_visible && (splits - 1) * len < max_visible);
        }
    }
}
