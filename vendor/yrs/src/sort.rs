//! A stable sort with little code, for the WebAssembly build: the standard library's stable
//! sort adds a few kilobytes of code for every element type and comparator it sorts with.

use std::cmp::Ordering;

/// Slices up to this long are sorted by insertion to the end, comparing each item with the one
/// before it exactly as the standard library's stable sort does at this length (so the same
/// order even for a comparator that is not a total order).
const SMALL: usize = 20;

/// Sorts `items` by `compare`, keeping equal items in their order (as `slice::sort_by` does).
/// By insertion first: the whole of a short slice, and a longer one as long as it stays cheap
/// (two swaps an item in all), so that a slice sorted but for a few items, what
/// `Update::merge_updates` sorts again after every run of blocks it writes, takes O(n). Past
/// that, O(n log n): a heap sort of the positions, ties broken by position, then the
/// permutation applied in place by swaps.
pub(crate) fn stable_sort_by<T, F>(items: &mut [T], mut compare: F)
where
    F: FnMut(&T, &T) -> Ordering,
{
    let len = items.len();
    let budget = if len <= SMALL { usize::MAX } else { 2 * len };
    let mut swaps = 0;
    let mut sorted = true;
    for i in 1..len {
        let mut j = i;
        while j > 0 && compare(&items[j], &items[j - 1]).is_lt() {
            items.swap(j - 1, j);
            j -= 1;
            swaps += 1;
        }
        if swaps > budget {
            sorted = false;
            break;
        }
    }
    if sorted {
        return;
    }
    // Insertion keeps equal items in their order, so breaking ties by position still does.
    let mut order: Vec<usize> = (0..len).collect();
    {
        let mut less = |a: usize, b: usize| compare(&items[a], &items[b]).then(a.cmp(&b)).is_lt();
        let mut sift_down = |order: &mut [usize], mut root: usize, end: usize| loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && less(order[child], order[child + 1]) {
                child += 1;
            }
            if !less(order[root], order[child]) {
                return;
            }
            order.swap(root, child);
            root = child;
        };
        for root in (0..len / 2).rev() {
            sift_down(&mut order, root, len);
        }
        for end in (1..len).rev() {
            order.swap(0, end);
            sift_down(&mut order, 0, end);
        }
    }
    // Position `i` takes the item at `order[i]`: follow each cycle, marking positions done.
    for start in 0..len {
        let mut current = start;
        loop {
            let next = order[current];
            order[current] = current;
            if next == start || next == current {
                break;
            }
            items.swap(current, next);
            current = next;
        }
    }
}

/// [`stable_sort_by`] with the items' own order.
pub(crate) fn stable_sort<T: Ord>(items: &mut [T]) {
    stable_sort_by(items, T::cmp)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn sorts_stably_as_the_standard_library_does() {
        for len in 0..200u64 {
            // Pairs whose first halves repeat: a stable sort keeps the second halves in order.
            let items: Vec<(u64, u64)> = (0..len).map(|i| ((i * 7919 + 13) % 17, i)).collect();
            let mut ours = items.clone();
            let mut expected = items.clone();
            stable_sort_by(&mut ours, |a, b| a.0.cmp(&b.0));
            expected.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(ours, expected);
            stable_sort_by(&mut ours, |a, b| b.0.cmp(&a.0));
            expected.sort_by(|a, b| b.0.cmp(&a.0));
            assert_eq!(ours, expected);
            let mut keys: Vec<u64> = items.iter().map(|i| i.0).collect();
            let mut expected: Vec<u64> = keys.clone();
            stable_sort(&mut keys);
            expected.sort();
            assert_eq!(keys, expected);
            // Sorted but for one item moved, as merge_updates sorts its decoders again.
            for from in [0, len / 2, len.saturating_sub(1)] {
                let mut items = expected.clone();
                if !items.is_empty() {
                    let moved = items.remove(from as usize);
                    items.insert(((from * 31 + 5) % len) as usize, moved + 1);
                }
                let mut sorted = items.clone();
                let mut ours = items;
                stable_sort(&mut ours);
                sorted.sort();
                assert_eq!(ours, sorted);
            }
        }
    }
}
