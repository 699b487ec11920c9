//! Making policy edits ([`super::edit`]): which rules of a newer version of a policy are rules
//! of the older ([`Alignment`], over rule identities: what a rule allows, not where it stands),
//! and from that the edit of any part of the older policy into any part of the newer.
//!
//! The alignment is a shortest script found by the O((N+M)·D) greedy algorithm of Myers ("An
//! O(ND) difference algorithm", 1986) after the common head and tail are set aside; past
//! [`MAX_STEPS`] drops and adds (rules moved about wholesale), the longest run in the same
//! order of the rules that occur once on each side instead (patience), found in O(n log n).
//! A coordinator aligns a network's policy once per change and then makes the edit of each
//! node's part (the rules that concern it) in one pass over the two parts
//! ([`Alignment::edit`]): many distinct parts cost one alignment, not one search per pair of
//! parts.

use std::collections::HashMap;

use super::edit::digest_of;
use super::{EditOp, Policy, PolicyEdit, Rule};

/// Which rules of a newer version of a policy are rules of an older one, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alignment {
    /// For each rule of the newer policy, the index of the older policy's rule it is, if it
    /// is one; increasing over the rules that are.
    old_of_new: Vec<Option<usize>>,
}

impl Alignment {
    /// A policy aligned with itself: every rule is itself.
    pub fn same(policy: &Policy) -> Alignment {
        Alignment {
            old_of_new: (0..policy.rules.len()).map(Some).collect(),
        }
    }

    /// The edit from the part `old_part` (indices of rules, increasing) of `old` to the part
    /// `new_part` of `newer`, the two policies this alignment was made of, whose result has
    /// the digest `digest` ([`Policy::part_digest`] of `new_part`, which the caller computes
    /// once per part). `None` when an edit would not be smaller than the new part whole (as
    /// [`Policy::edit_to`]), or when the parts are not increasing indices of the two policies.
    pub fn edit(
        &self,
        old: &Policy,
        old_part: &[usize],
        newer: &Policy,
        new_part: &[usize],
        digest: u64,
    ) -> Option<PolicyEdit> {
        let increasing = |part: &[usize], len: usize| {
            part.windows(2).all(|w| w[0] < w[1]) && part.last().is_none_or(|&i| i < len)
        };
        if !increasing(old_part, old.rules.len())
            || !increasing(new_part, newer.rules.len())
            || self.old_of_new.len() != newer.rules.len()
        {
            return None;
        }
        let mut script = Script::default();
        let mut next = 0usize;
        for &j in new_part {
            let rule = &newer.rules[j];
            // The old rule this one is, if it is in the old part and not passed yet: the rules
            // of the old part before it go. (Matches increase, so those never match later.)
            let kept = self.old_of_new[j]
                .and_then(|i| old_part[next..].binary_search(&i).ok().map(|at| (i, at)));
            match kept {
                Some((i, at)) => {
                    script.drop(at);
                    script.keep(i64::from(rule.line) - i64::from(old.rules[i].line));
                    next += at + 1;
                }
                None => script.add(rule),
            }
        }
        script.drop(old_part.len() - next);
        if 2 * script.added > new_part.len() || script.ops.len() > new_part.len().max(8) {
            return None;
        }
        Some(PolicyEdit {
            base: old.version,
            version: newer.version,
            digest,
            ops: script.ops,
        })
    }
}

/// An edit's ops as they are found, runs merged.
#[derive(Default)]
struct Script {
    ops: Vec<EditOp>,
    added: usize,
}

impl Script {
    fn keep(&mut self, shift: i64) {
        match self.ops.last_mut() {
            Some(EditOp::Keep { count, shift: s }) if *s == shift => *count += 1,
            _ => self.ops.push(EditOp::Keep { count: 1, shift }),
        }
    }

    fn drop(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        // A part has at most MAX_RULES rules.
        let n = n as u32;
        match self.ops.last_mut() {
            Some(EditOp::Drop { count }) => *count += n,
            _ => self.ops.push(EditOp::Drop { count: n }),
        }
    }

    fn add(&mut self, rule: &Rule) {
        match self.ops.last_mut() {
            Some(EditOp::Add { rules }) => rules.push(rule.clone()),
            _ => self.ops.push(EditOp::Add {
                rules: vec![rule.clone()],
            }),
        }
        self.added += 1;
    }
}

impl Policy {
    /// Which rules of `newer` are rules of this policy (see [`Alignment`]).
    pub fn align(&self, newer: &Policy) -> Alignment {
        let a: Vec<u64> = self.rules.iter().map(Rule::identity).collect();
        let b: Vec<u64> = newer.rules.iter().map(Rule::identity).collect();
        align_identities(&a, &b)
    }

    /// [`Policy::digest`] of the policy node parts are made of: this version with the rules at
    /// `part` (increasing indices).
    ///
    /// # Panics
    /// When an index is out of range.
    pub fn part_digest(&self, part: &[usize]) -> u64 {
        digest_of(self.version, part.iter().map(|&i| &self.rules[i]))
    }

    /// The edit from this policy to `newer`, or `None` when an edit would not be smaller than
    /// `newer` whole: it adds more than half as many rules as `newer` has (a rule whole is
    /// some hundred bytes of JSON, an op some twenty), or the script would be long (many
    /// rules moved about).
    pub fn edit_to(&self, newer: &Policy) -> Option<PolicyEdit> {
        let a: Vec<u64> = self.rules.iter().map(Rule::identity).collect();
        let b: Vec<u64> = newer.rules.iter().map(Rule::identity).collect();
        if 2 * missing_from(&b, &a) > newer.rules.len() {
            return None;
        }
        let all = |p: &Policy| (0..p.rules.len()).collect::<Vec<_>>();
        align_identities(&a, &b).edit(self, &all(self), newer, &all(newer), newer.digest())
    }
}

/// [`Policy::align`] over the rules' identities.
fn align_identities(a: &[u64], b: &[u64]) -> Alignment {
    let mut old_of_new = vec![None; b.len()];
    // Reordered rules make the script longer than the two counts; past this many steps it is
    // not worth finding (and the search keeps MAX_STEPS² / 2 words).
    let max_d =
        (missing_from(b, a) + missing_from(a, b) + 64 + (a.len() + b.len()) / 8).min(MAX_STEPS);
    match script(a, b, max_d) {
        Some(steps) => {
            let (mut i, mut j) = (0, 0);
            for step in steps {
                match step {
                    Step::Keep => {
                        old_of_new[j] = Some(i);
                        i += 1;
                        j += 1;
                    }
                    Step::Drop => i += 1,
                    Step::Add => j += 1,
                }
            }
        }
        None => patience(a, b, &mut old_of_new),
    }
    Alignment { old_of_new }
}

/// Matches the entries that occur once in `a` and once in `b` (the rules that stand for
/// themselves), keeping the largest set of them whose order is the same on both sides: a
/// longest increasing subsequence of their positions in `a` taken in `b`'s order (patience
/// sorting, O(n log n)). Repeated rules stay unmatched.
fn patience(a: &[u64], b: &[u64], old_of_new: &mut [Option<usize>]) {
    let mut count: HashMap<u64, (u32, u32, usize)> = HashMap::new();
    for (i, &x) in a.iter().enumerate() {
        let e = count.entry(x).or_default();
        e.0 += 1;
        e.2 = i;
    }
    for &x in b {
        if let Some(e) = count.get_mut(&x) {
            e.1 += 1;
        }
    }
    // (j, i) of the rules once on each side, in b's order.
    let pairs: Vec<(usize, usize)> = b
        .iter()
        .enumerate()
        .filter_map(|(j, x)| match count.get(x) {
            Some(&(1, 1, i)) => Some((j, i)),
            _ => None,
        })
        .collect();
    // tails[k]: the index in `pairs` of the smallest last i of an increasing run of k + 1;
    // prev: each pair's predecessor in its run.
    let mut tails: Vec<usize> = Vec::new();
    let mut prev: Vec<Option<usize>> = vec![None; pairs.len()];
    for (p, &(_, i)) in pairs.iter().enumerate() {
        let k = tails.partition_point(|&t| pairs[t].1 < i);
        prev[p] = k.checked_sub(1).map(|k| tails[k]);
        if k == tails.len() {
            tails.push(p);
        } else {
            tails[k] = p;
        }
    }
    let mut at = tails.last().copied();
    while let Some(p) = at {
        let (j, i) = pairs[p];
        old_of_new[j] = Some(i);
        at = prev[p];
    }
}

/// How many entries of `of` (counted with repeats) `from` lacks.
fn missing_from(of: &[u64], from: &[u64]) -> usize {
    let mut have: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for &x in from {
        *have.entry(x).or_default() += 1;
    }
    of.iter()
        .filter(|x| match have.get_mut(x) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .count()
}

/// One step of a script turning `a` into `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `a`'s next entry is `b`'s next entry.
    Keep,
    /// `a`'s next entry goes.
    Drop,
    /// `b`'s next entry comes.
    Add,
}

/// The most drops and adds [`Policy::align`] searches for (past them, it matches by
/// patience): the search keeps the frontier of every step, some 16 MiB at this bound.
const MAX_STEPS: usize = 2048;

/// A shortest script turning `a` into `b` (Myers), or `None` when it takes more than `max_d`
/// drops and adds. The common head and tail are kept without search.
fn script(a: &[u64], b: &[u64], max_d: usize) -> Option<Vec<Step>> {
    let head = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a_mid, b_mid) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let mut steps = vec![Step::Keep; head];
    steps.extend(myers(a_mid, b_mid, max_d)?);
    steps.extend(std::iter::repeat_n(Step::Keep, tail));
    Some(steps)
}

/// Myers' greedy forward search with the frontier of every round kept for the way back.
fn myers(a: &[u64], b: &[u64], max_d: usize) -> Option<Vec<Step>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max_d = max_d.min(a.len() + b.len()) as isize;
    // v[k + off]: the furthest x reached on diagonal k (y = x - k).
    let off = max_d + 1;
    let mut v = vec![0isize; (2 * off + 1) as usize];
    // trace[d][k + d]: v on diagonals -d..=d at the start of round d (positions fit in an
    // i32: a policy has at most MAX_RULES rules).
    let mut trace: Vec<Vec<i32>> = Vec::new();
    let mut found = None;
    'rounds: for d in 0..=max_d {
        trace.push(
            v[(off - d) as usize..=(off + d) as usize]
                .iter()
                .map(|&x| x as i32)
                .collect(),
        );
        let mut k = -d;
        while k <= d {
            let down = k == -d || (k != d && v[(off + k - 1) as usize] < v[(off + k + 1) as usize]);
            let mut x = if down {
                v[(off + k + 1) as usize]
            } else {
                v[(off + k - 1) as usize] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[(off + k) as usize] = x;
            if x >= n && y >= m {
                found = Some(d);
                break 'rounds;
            }
            k += 2;
        }
    }
    let d_end = found?;
    let (mut x, mut y) = (n, m);
    let mut back = Vec::new();
    for d in (1..=d_end).rev() {
        let v = &trace[d as usize];
        let at = |k: isize| v[(k + d) as usize] as isize;
        let k = x - y;
        let down = k == -d || (k != d && at(k - 1) < at(k + 1));
        let prev_k = if down { k + 1 } else { k - 1 };
        let prev_x = at(prev_k);
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            back.push(Step::Keep);
            x -= 1;
            y -= 1;
        }
        back.push(if down { Step::Add } else { Step::Drop });
        x = prev_x;
        y = prev_y;
    }
    while x > 0 && y > 0 {
        back.push(Step::Keep);
        x -= 1;
        y -= 1;
    }
    back.reverse();
    Some(back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testkit::{policy, Lcg};

    /// A random increasing part of `len` rules.
    fn part(rng: &mut Lcg, len: usize) -> Vec<usize> {
        let keep = 1 + rng.below(4);
        (0..len).filter(|_| rng.below(4) < keep).collect()
    }

    /// Checks that the edit of `old_part` to `new_part`, when there is one, turns the one
    /// into the other exactly.
    fn check(
        old: &Policy,
        new: &Policy,
        alignment: &Alignment,
        op: &[usize],
        np: &[usize],
    ) -> bool {
        let before = old.subset(op);
        let after = new.subset(np);
        let Some(edit) = alignment.edit(old, op, new, np, new.part_digest(np)) else {
            return false;
        };
        let mut got = before.clone();
        got.apply_edit(&edit)
            .unwrap_or_else(|e| panic!("{e}: {edit:?} of {op:?} -> {np:?}"));
        assert_eq!(got, after, "{edit:?}");
        true
    }

    #[test]
    fn the_edit_of_any_part_to_any_part_is_exact() {
        let mut rng = Lcg(7);
        let mut edits = 0;
        for round in 0..300 {
            let n = 1 + rng.below(60);
            let old: Vec<u16> = (0..n).map(|_| rng.below(40) as u16).collect();
            let mut new = old.clone();
            for _ in 0..rng.below(8) {
                match rng.below(3) {
                    0 if !new.is_empty() => {
                        new.remove(rng.below(new.len()));
                    }
                    1 => new.insert(rng.below(new.len() + 1), rng.below(40) as u16),
                    _ if !new.is_empty() => {
                        let i = rng.below(new.len());
                        new[i] = rng.below(40) as u16;
                    }
                    _ => {}
                }
            }
            let (old, new) = (policy(round, &old), policy(round + 1, &new));
            let alignment = old.align(&new);
            for _ in 0..5 {
                let (op, np) = (
                    part(&mut rng, old.rules.len()),
                    part(&mut rng, new.rules.len()),
                );
                edits += usize::from(check(&old, &new, &alignment, &op, &np));
            }
            // The whole policy, and a part of the policy to itself (tags changed, not rules).
            let all = |p: &Policy| (0..p.rules.len()).collect::<Vec<_>>();
            edits += usize::from(check(&old, &new, &alignment, &all(&old), &all(&new)));
            let same = Alignment::same(&new);
            let (a, b) = (
                part(&mut rng, new.rules.len()),
                part(&mut rng, new.rules.len()),
            );
            edits += usize::from(check(&new, &new, &same, &a, &b));
        }
        assert!(edits > 600, "most pairs make an edit ({edits})");
    }

    #[test]
    fn a_part_untouched_by_a_reordering_past_the_search_is_kept_whole() {
        // The first 2,000 of 4,000 rules reversed: past MAX_STEPS, matched by patience.
        let ports: Vec<u16> = (0..4000).collect();
        let mut moved = ports.clone();
        moved[..2000].reverse();
        let (old, new) = (policy(1, &ports), policy(2, &moved));
        assert!(script(
            &old.rules.iter().map(Rule::identity).collect::<Vec<_>>(),
            &new.rules.iter().map(Rule::identity).collect::<Vec<_>>(),
            MAX_STEPS
        )
        .is_none());
        let alignment = old.align(&new);
        // A node's part in the half that stayed: kept whole, one op.
        let part: Vec<usize> = (2500..2600).collect();
        let edit = alignment
            .edit(&old, &part, &new, &part, new.part_digest(&part))
            .unwrap();
        assert_eq!(
            edit.ops,
            vec![EditOp::Keep {
                count: 100,
                shift: 0
            }]
        );
        assert!(check(&old, &new, &alignment, &part, &part));
        // Across the reversed half: exact, whatever is kept.
        let op: Vec<usize> = (1900..2100).collect();
        let np: Vec<usize> = (0..50).chain(1990..2100).collect();
        let _ = check(&old, &new, &alignment, &op, &np);
    }

    #[test]
    fn parts_that_are_not_increasing_indices_make_no_edit() {
        let p = policy(1, &[1, 2, 3]);
        let same = Alignment::same(&p);
        let d = p.part_digest(&[0, 1]);
        assert!(same.edit(&p, &[1, 0], &p, &[0, 1], d).is_none());
        assert!(same.edit(&p, &[0, 3], &p, &[0, 1], d).is_none());
        assert!(same.edit(&p, &[0, 1], &p, &[0, 0], d).is_none());
        assert!(same.edit(&p, &[0, 1], &p, &[0, 1], d).is_some());
    }
}
