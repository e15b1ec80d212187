//! Which merge, per disk and child, by the data it moves. Pure: the layers' maps in, the
//! choice out.

use sendense_contract::manifest::MergeStrategy;

use crate::copy::ChangedArea;

/// What one child's file of the disk holds itself.
#[derive(Debug, Clone, Default)]
pub struct ChildLayer {
    /// Ranges present in the layer (data and zero clusters: both hide what lies below).
    pub present: Vec<ChangedArea>,
    /// Of which data.
    pub data: Vec<ChangedArea>,
}

/// The merge chosen for one child, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub strategy: MergeStrategy,
    /// Data the merge moves.
    pub bytes_to_move: u64,
    /// What the child's file grows by: the point's data the child does not hide (whichever
    /// the strategy, the child ends up holding it).
    pub growth: u64,
}

/// One choice per child of the disk. Commit-down (`commit_down_allowed`: the child's file can
/// take the point's place) moves the child's own data and only fits an only child; rebase-up
/// moves the point's data the child does not hide. The smaller wins; a tie goes to
/// commit-down, which writes into clusters the point already has.
pub fn choose(
    point_data: &[ChangedArea],
    children: &[ChildLayer],
    commit_down_allowed: bool,
) -> Vec<Choice> {
    let rebase: Vec<u64> = children
        .iter()
        .map(|c| minus(point_data, &c.present))
        .collect();
    if let ([only], [rebase_cost]) = (children, rebase.as_slice()) {
        let commit_cost = total(&only.data);
        if commit_down_allowed && commit_cost <= *rebase_cost {
            return vec![Choice {
                strategy: MergeStrategy::CommitDown,
                bytes_to_move: commit_cost,
                growth: *rebase_cost,
            }];
        }
    }
    rebase
        .into_iter()
        .map(|cost| Choice {
            strategy: MergeStrategy::RebaseUp,
            bytes_to_move: cost,
            growth: cost,
        })
        .collect()
}

pub fn total(areas: &[ChangedArea]) -> u64 {
    areas.iter().map(|a| a.length).sum()
}

/// Bytes of `a` not covered by `b` (both sorted, as `qemu-img map` lists them).
pub fn minus(a: &[ChangedArea], b: &[ChangedArea]) -> u64 {
    let mut left = 0;
    let mut j = 0;
    for x in a {
        let (mut start, end) = (x.start, x.start + x.length);
        while j < b.len() && b[j].start + b[j].length <= start {
            j += 1;
        }
        let mut k = j;
        while start < end && k < b.len() && b[k].start < end {
            let (bs, be) = (b[k].start, b[k].start + b[k].length);
            if bs > start {
                left += bs - start;
            }
            start = start.max(be);
            k += 1;
        }
        if start < end {
            left += end - start;
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn areas(list: &[(u64, u64)]) -> Vec<ChangedArea> {
        list.iter()
            .map(|&(start, length)| ChangedArea { start, length })
            .collect()
    }

    fn child(present: &[(u64, u64)], data: &[(u64, u64)]) -> ChildLayer {
        ChildLayer {
            present: areas(present),
            data: areas(data),
        }
    }

    #[test]
    fn bytes_of_one_layer_not_hidden_by_another() {
        let a = areas(&[(0, 100), (200, 100), (1000, 10)]);
        assert_eq!(minus(&a, &[]), 210);
        assert_eq!(minus(&a, &areas(&[(50, 200)])), 50 + 50 + 10);
        assert_eq!(minus(&a, &areas(&[(0, 2000)])), 0);
        assert_eq!(
            minus(&a, &areas(&[(10, 10), (30, 10), (250, 10), (900, 50)])),
            180
        );
        assert_eq!(minus(&[], &a), 0);
    }

    #[test]
    fn a_full_with_a_small_only_child_is_committed_down() {
        // The point is a full (60 MiB of data); its child changed 2 MiB.
        let full = areas(&[(0, 60 << 20)]);
        let c = child(&[(4 << 20, 2 << 20)], &[(4 << 20, 2 << 20)]);
        assert_eq!(
            choose(&full, std::slice::from_ref(&c), true),
            vec![Choice {
                strategy: MergeStrategy::CommitDown,
                bytes_to_move: 2 << 20,
                growth: 58 << 20,
            }]
        );
        // Where the child's file cannot take the point's place, it is rebased.
        assert_eq!(
            choose(&full, std::slice::from_ref(&c), false)[0].strategy,
            MergeStrategy::RebaseUp
        );
    }

    #[test]
    fn a_small_point_under_a_big_child_is_rebased_up() {
        let point = areas(&[(0, 1 << 20)]);
        let c = child(
            &[(0, 512 << 10), (8 << 20, 40 << 20)],
            &[(8 << 20, 40 << 20)],
        );
        assert_eq!(
            choose(&point, &[c], true),
            vec![Choice {
                strategy: MergeStrategy::RebaseUp,
                bytes_to_move: 512 << 10,
                growth: 512 << 10,
            }]
        );
    }

    #[test]
    fn zero_clusters_of_the_child_hide_the_point_but_move_nothing() {
        let point = areas(&[(0, 4 << 20)]);
        let c = child(&[(0, 4 << 20)], &[]);
        assert_eq!(
            choose(&point, &[c], true),
            vec![Choice {
                strategy: MergeStrategy::CommitDown,
                bytes_to_move: 0,
                growth: 0,
            }]
        );
    }

    #[test]
    fn several_children_are_each_rebased_up() {
        let point = areas(&[(0, 8 << 20)]);
        let small = child(&[(0, 1 << 20)], &[(0, 1 << 20)]);
        let none = ChildLayer::default();
        let choices = choose(&point, &[small, none], true);
        assert_eq!(
            choices
                .iter()
                .map(|c| (c.strategy, c.bytes_to_move))
                .collect::<Vec<_>>(),
            vec![
                (MergeStrategy::RebaseUp, 7 << 20),
                (MergeStrategy::RebaseUp, 8 << 20)
            ]
        );
    }
}
