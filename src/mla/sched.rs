//! The split-KV scheduler: a pure function from sequence lengths to per-CTA work lists.
//!
//! The batch's KV pages are cut into about one piece per CTA, balanced by pages (so by tokens), not by sequences: a
//! long sequence is spread over many CTAs and many short ones share a CTA. Each piece of a sequence is a *split*;
//! the decode kernel writes one fp32 partial output + partial lse per split, and the combine kernel merges a
//! sequence's splits in split order (fixed, so results are deterministic).
//!
//! In batch-invariant mode a sequence is cut into fixed-size chunks that depend only on its own length, one chunk per
//! CTA, so its splits (and therefore its bits) are the same whatever it is batched with.

use crate::error::to_i32;
use crate::error::{Error, Result};

/// One contiguous piece of one sequence's pages: blocks `start_block .. end_block` of sequence `seq`, which is split
/// number `split` of that sequence. `#[repr(C)]` as the kernels read it (an `int4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct WorkItem {
    /// Sequence index in the batch.
    pub seq: i32,
    /// First block-table column of the piece.
    pub start_block: i32,
    /// One past the last block-table column.
    pub end_block: i32,
    /// Index of this piece among its sequence's splits.
    pub split: i32,
}

/// How to cut the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitMode {
    /// About `target_ctas` CTAs (use the SM count), each with at most `ceil(total_pages / target_ctas)` pages.
    Balanced {
        /// Upper bound on the number of CTAs.
        target_ctas: usize,
    },
    /// Every sequence cut into chunks of `chunk_blocks` pages, one CTA per chunk: a sequence's split depends only on
    /// its own length.
    BatchInvariant {
        /// Pages per chunk.
        chunk_blocks: usize,
    },
}

/// The schedule for one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// All pieces, grouped by CTA.
    pub items: Vec<WorkItem>,
    /// CTA `c` processes `items[cta_offsets[c] .. cta_offsets[c + 1]]`; length = CTAs + 1.
    pub cta_offsets: Vec<i32>,
    /// The splits of sequence `b` are partial slots `split_offsets[b] .. split_offsets[b + 1]`; length = batch + 1.
    pub split_offsets: Vec<i32>,
    /// The sequence lengths the plan was made for.
    pub seqlens: Vec<i32>,
    /// Tokens per page.
    pub page_size: usize,
}

impl SplitPlan {
    /// Number of CTAs (grid x of the decode kernel).
    pub fn num_ctas(&self) -> usize {
        self.cta_offsets.len() - 1
    }
    /// Total partial slots (splits over all sequences).
    pub fn total_splits(&self) -> usize {
        *self.split_offsets.last().unwrap_or(&0) as usize
    }
    /// Number of splits of sequence `b`.
    pub fn num_splits(&self, b: usize) -> usize {
        (self.split_offsets[b + 1] - self.split_offsets[b]) as usize
    }
    /// Pages processed by CTA `c`.
    pub fn cta_blocks(&self, c: usize) -> usize {
        let r = self.cta_offsets[c] as usize..self.cta_offsets[c + 1] as usize;
        self.items[r].iter().map(|it| (it.end_block - it.start_block) as usize).sum()
    }
    /// The batch size.
    pub fn batch(&self) -> usize {
        self.seqlens.len()
    }
}

/// Cuts the batch described by `seqlens` (tokens per sequence) into work items. Zero-length sequences get no split
/// (the combine kernel writes o = 0, lse = +inf for them).
pub fn plan_splits(seqlens: &[i32], page_size: usize, mode: SplitMode) -> Result<SplitPlan> {
    if page_size == 0 {
        return Err(Error::InvalidConfig("page_size must be positive".into()));
    }
    let mut blocks = Vec::with_capacity(seqlens.len());
    for (b, &len) in seqlens.iter().enumerate() {
        if len < 0 {
            return Err(Error::IndexOutOfRange {
                arg: "seqlens",
                position: b,
                value: len as i64,
                bound: i32::MAX as i64,
            });
        }
        blocks.push((len as usize).div_ceil(page_size));
    }
    let total: usize = blocks.iter().sum();
    let mut items = Vec::new();
    let mut cta_offsets = vec![0i32];
    let mut splits = vec![0usize; seqlens.len()];
    match mode {
        SplitMode::Balanced { target_ctas } => {
            if target_ctas == 0 {
                return Err(Error::InvalidConfig("target_ctas must be positive".into()));
            }
            let quota = total.div_ceil(target_ctas).max(1);
            let mut room = quota;
            for (b, &n) in blocks.iter().enumerate() {
                let mut start = 0;
                while start < n {
                    let take = room.min(n - start);
                    items.push(WorkItem {
                        seq: to_i32("batch", b)?,
                        start_block: to_i32("blocks", start)?,
                        end_block: to_i32("blocks", start + take)?,
                        split: to_i32("splits", splits[b])?,
                    });
                    splits[b] += 1;
                    start += take;
                    room -= take;
                    if room == 0 {
                        cta_offsets.push(to_i32("items", items.len())?);
                        room = quota;
                    }
                }
            }
            if room != quota {
                cta_offsets.push(to_i32("items", items.len())?);
            }
        }
        SplitMode::BatchInvariant { chunk_blocks } => {
            if chunk_blocks == 0 {
                return Err(Error::InvalidConfig("chunk_blocks must be positive".into()));
            }
            for (b, &n) in blocks.iter().enumerate() {
                let mut start = 0;
                while start < n {
                    let end = (start + chunk_blocks).min(n);
                    items.push(WorkItem {
                        seq: to_i32("batch", b)?,
                        start_block: to_i32("blocks", start)?,
                        end_block: to_i32("blocks", end)?,
                        split: to_i32("splits", splits[b])?,
                    });
                    splits[b] += 1;
                    start = end;
                    cta_offsets.push(to_i32("items", items.len())?);
                }
            }
        }
    }
    let mut split_offsets = Vec::with_capacity(seqlens.len() + 1);
    let mut acc = 0usize;
    split_offsets.push(0);
    for s in splits {
        acc += s;
        split_offsets.push(to_i32("splits", acc)?);
    }
    Ok(SplitPlan { items, cta_offsets, split_offsets, seqlens: seqlens.to_vec(), page_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(plan: &SplitPlan) {
        let page = plan.page_size;
        for (b, &len) in plan.seqlens.iter().enumerate() {
            let n = (len as usize).div_ceil(page);
            let mut hits = vec![0u32; n];
            let mut seen_splits = vec![];
            for it in plan.items.iter().filter(|it| it.seq as usize == b) {
                assert!(it.start_block < it.end_block, "empty item {it:?}");
                for blk in it.start_block..it.end_block {
                    hits[blk as usize] += 1;
                }
                seen_splits.push(it.split);
            }
            assert!(hits.iter().all(|&h| h == 1), "seq {b}: every block exactly once");
            seen_splits.sort();
            assert_eq!(seen_splits, (0..plan.num_splits(b) as i32).collect::<Vec<_>>());
            // Token coverage follows from block coverage: tokens 0..len lie in blocks 0..ceil(len/page).
            if len == 0 {
                assert_eq!(plan.num_splits(b), 0);
            }
        }
        assert_eq!(plan.items.len(), plan.total_splits());
        assert_eq!(*plan.cta_offsets.last().unwrap() as usize, plan.items.len());
        for c in 0..plan.num_ctas() {
            assert!(plan.cta_offsets[c] < plan.cta_offsets[c + 1], "CTA {c} has no work");
        }
    }

    fn pseudo_lens(n: usize, seed: u64, max: i32) -> Vec<i32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if i % 7 == 3 {
                    0
                } else {
                    ((s >> 33) % max as u64) as i32
                }
            })
            .collect()
    }

    #[test]
    fn balanced_covers_everything_once_and_is_balanced() {
        for (seed, batch, page, sms) in
            [(1, 1, 64, 132), (2, 6, 64, 132), (3, 128, 64, 132), (4, 64, 16, 78), (5, 3, 1, 4)]
        {
            let lens = pseudo_lens(batch, seed, 20_000);
            let plan = plan_splits(&lens, page, SplitMode::Balanced { target_ctas: sms }).unwrap();
            check_cover(&plan);
            let total: usize = lens.iter().map(|&l| (l as usize).div_ceil(page)).sum();
            let quota = total.div_ceil(sms).max(1);
            assert!(plan.num_ctas() <= sms);
            for c in 0..plan.num_ctas() {
                assert!(plan.cta_blocks(c) <= quota, "CTA {c}: {} > {quota}", plan.cta_blocks(c));
            }
            // All but the last CTA are full: the work is spread as evenly as pages allow.
            for c in 0..plan.num_ctas().saturating_sub(1) {
                assert_eq!(plan.cta_blocks(c), quota);
            }
        }
    }

    #[test]
    fn one_long_sequence_is_spread_over_all_ctas() {
        let plan = plan_splits(&[16384], 64, SplitMode::Balanced { target_ctas: 132 }).unwrap();
        check_cover(&plan);
        assert_eq!(plan.num_ctas(), 128); // 256 pages, 2 per CTA
        assert_eq!(plan.num_splits(0), 128);
    }

    #[test]
    fn zero_length_sequences() {
        let plan = plan_splits(&[0, 0, 0], 64, SplitMode::Balanced { target_ctas: 8 }).unwrap();
        assert_eq!(plan.num_ctas(), 0);
        assert_eq!(plan.split_offsets, vec![0, 0, 0, 0]);
        let plan = plan_splits(&[0, 5, 0, 130, 0], 64, SplitMode::Balanced { target_ctas: 2 }).unwrap();
        check_cover(&plan);
        assert_eq!(plan.num_splits(0), 0);
        let plan = plan_splits(&[], 64, SplitMode::BatchInvariant { chunk_blocks: 4 }).unwrap();
        assert_eq!(plan.num_ctas(), 0);
        assert_eq!(plan.total_splits(), 0);
    }

    #[test]
    fn bad_arguments() {
        assert!(plan_splits(&[1], 0, SplitMode::Balanced { target_ctas: 1 }).is_err());
        assert!(plan_splits(&[1], 64, SplitMode::Balanced { target_ctas: 0 }).is_err());
        assert!(plan_splits(&[1], 64, SplitMode::BatchInvariant { chunk_blocks: 0 }).is_err());
        assert!(plan_splits(&[-1], 64, SplitMode::Balanced { target_ctas: 1 }).is_err());
    }

    #[test]
    fn batch_invariant_split_depends_only_on_own_length() {
        let mode = SplitMode::BatchInvariant { chunk_blocks: 8 };
        let lens = pseudo_lens(40, 9, 5000);
        let plan = plan_splits(&lens, 64, mode).unwrap();
        check_cover(&plan);
        let pieces = |plan: &SplitPlan, b: usize| -> Vec<(i32, i32, i32)> {
            plan.items
                .iter()
                .filter(|it| it.seq as usize == b)
                .map(|it| (it.start_block, it.end_block, it.split))
                .collect()
        };
        for b in 0..lens.len() {
            let alone = plan_splits(&lens[b..b + 1], 64, mode).unwrap();
            assert_eq!(pieces(&plan, b), pieces(&alone, 0), "seq {b}");
            // Reversed batch order: same pieces again.
            let mut rev = lens.clone();
            rev.reverse();
            let rplan = plan_splits(&rev, 64, mode).unwrap();
            assert_eq!(pieces(&plan, b), pieces(&rplan, lens.len() - 1 - b));
        }
        // One chunk per CTA.
        assert!((0..plan.num_ctas()).all(|c| plan.cta_offsets[c + 1] - plan.cta_offsets[c] == 1));
    }
}
