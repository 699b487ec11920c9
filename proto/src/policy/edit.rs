//! Policy edits: a new version of a (node's) policy as the change from the version its
//! holder has, so that an operator's edit of a few rules of a large policy costs each agent
//! those rules, not the whole file.
//!
//! An edit is a script over the base's rules, in order ([`EditOp`]): keep the next rules
//! (their lines moved by a shift, as when a rule above them was added or removed), drop the
//! next rules, or add rules. Run to the end, it accounts for every rule of the base, so order,
//! repeated rules and line numbers come out exactly as the coordinator's. It names its base
//! by version and its result by version and digest ([`Policy::digest`]): a holder whose
//! policy is another version, or whose result would not be the coordinator's, refuses the
//! edit (changing nothing) and asks for a whole map ([`EditError`]). The result's digest is
//! the whole check: a base with other rules than the coordinator assumed either does not fit
//! the script's counts or yields another result, unless it differs only in rules the edit
//! drops, and then the result is the coordinator's anyway. The holder checks the edit in one
//! pass over its rules without copying any ([`Policy::check_edit`]), then applies it by
//! moving its rules, so an edit of a few rules of a large policy costs it one pass of hashing
//! and the new rules, not a copy of the policy.
//!
//! The coordinator makes an edit ([`Policy::edit_to`], or [`super::Alignment::edit`] for parts
//! of a policy) from an alignment of the two versions' rule identities ([`Rule::identity`]:
//! what the rule allows, not where it stands; see `align.rs`), and only when it is
//! smaller than the new rules whole.
//!
//! # Security
//! An edit comes from the network. Applying one never panics and allocates at most the
//! result's rules: counts past the base's end, lines out of range, more than [`MAX_RULES`]
//! rules, and a result that is not the announced one are errors. The digests are not
//! cryptographic: they catch a holder whose policy is not the one the coordinator assumes (a
//! missed message, a bug), not a forger; the coordinator that sends the edit is authenticated
//! and decides the policy anyway.

use serde::{Deserialize, Serialize};

use super::{Policy, Ports, Rule, Selector, MAX_RULES};

/// The change from one version of a policy to another, applied with [`Policy::apply_edit`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEdit {
    /// The version of the policy this edit applies to.
    pub base: u64,
    /// The version after it.
    pub version: u64,
    /// [`Policy::digest`] of the policy after it.
    pub digest: u64,
    /// The script, over the base's rules in order.
    pub ops: Vec<EditOp>,
}

/// One step of a [`PolicyEdit`]'s script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditOp {
    /// The base's next `count` rules stay, their lines moved by `shift`.
    Keep {
        /// How many.
        count: u32,
        /// Added to each one's line. Absent: 0.
        #[serde(default, skip_serializing_if = "is_zero")]
        shift: i64,
    },
    /// The base's next `count` rules go.
    Drop {
        /// How many.
        count: u32,
    },
    /// These rules come next, new.
    Add {
        /// The rules, whole.
        rules: Vec<Rule>,
    },
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Why an edit does not apply to a policy. Every case leaves the policy as it was; the holder
/// asks for a whole map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// The holder's policy is not the edit's base (another version, or none).
    #[error("the edit applies to policy version {base}, this node has {have}")]
    BaseVersion {
        /// The edit's `base`.
        base: u64,
        /// The holder's version, or "none".
        have: String,
    },
    /// An op keeps or drops past the base's last rule.
    #[error("ops[{op}] takes {count} rules where {left} are left")]
    PastEnd {
        /// The op's index.
        op: usize,
        /// Its count.
        count: u32,
        /// The base's rules not yet taken.
        left: usize,
    },
    /// The script ends before the base's last rule.
    #[error("the ops leave {left} rules of the base unaccounted for")]
    Unconsumed {
        /// The base's rules not taken.
        left: usize,
    },
    /// A kept rule's line moves out of range.
    #[error("ops[{op}].shift moves line {line} out of range")]
    Line {
        /// The op's index.
        op: usize,
        /// The rule's line in the base.
        line: u32,
    },
    /// The result would have more than [`MAX_RULES`] rules.
    #[error("the result would have more than {MAX_RULES} rules")]
    TooManyRules,
    /// The result is not the policy the edit announces.
    #[error("the result's digest is not the edit's digest")]
    Digest,
}

/// A 64-bit digest over a canonical encoding of 64-bit words: each word folded into the state
/// by a 64x64->128-bit multiply (the mixing step of wyhash), the result finished by the
/// splitmix64 finaliser. Defined here word by word, so it is the same on every platform and
/// in every build, and it costs about a nanosecond a word (a 1,000-rule policy in some
/// 20 microseconds).
struct Digester {
    state: u64,
    words: u64,
}

const MIX_A: u64 = 0xa076_1d64_78bd_642f;
const MIX_B: u64 = 0xe703_7ed1_a0b4_28db;

impl Digester {
    fn new() -> Self {
        Digester { state: 0, words: 0 }
    }

    fn u64(&mut self, w: u64) {
        let m = u128::from(self.state ^ w ^ MIX_A) * u128::from(MIX_B ^ self.words);
        self.state = (m as u64) ^ ((m >> 64) as u64);
        self.words += 1;
    }

    fn text(&mut self, s: &str) {
        self.u64(s.len() as u64);
        for chunk in s.as_bytes().chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.u64(u64::from_le_bytes(w));
        }
    }

    fn selector(&mut self, kind: u64, name: &str) {
        self.u64(kind);
        self.text(name);
    }

    fn selectors(&mut self, list: &[Selector]) {
        self.u64(list.len() as u64);
        for s in list {
            match s {
                Selector::Any => self.selector(0, ""),
                Selector::Tag(n) => self.selector(1, n),
                Selector::Node(n) => self.selector(2, n),
                Selector::Workload(n) => self.selector(3, n),
            }
        }
    }

    fn ports(&mut self, list: &[Ports]) {
        self.u64(list.len() as u64);
        for p in list {
            let (kind, a, b) = match *p {
                Ports::Any => (0, 0, 0),
                Ports::Icmp => (1, 0, 0),
                Ports::Tcp(a, b) => (2, a, b),
                Ports::Udp(a, b) => (3, a, b),
            };
            self.u64(kind | (u64::from(a) << 8) | (u64::from(b) << 24));
        }
    }

    /// What a rule allows: its selectors and ports, not its line.
    fn rule_body(&mut self, r: &Rule) {
        self.selectors(&r.from);
        self.selectors(&r.to);
        self.ports(&r.ports);
    }

    /// A rule as a policy's digest sees it: its line and what it allows.
    fn rule(&mut self, line: u32, r: &Rule) {
        self.u64(u64::from(line));
        self.rule_body(r);
    }

    fn finish(self) -> u64 {
        // splitmix64's finaliser.
        let mut z = self.state ^ self.words.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// [`Policy::digest`] of the policy of `version` with these rules, in order.
pub(super) fn digest_of<'a>(
    version: u64,
    rules: impl IntoIterator<Item = &'a Rule, IntoIter: ExactSizeIterator>,
) -> u64 {
    let rules = rules.into_iter();
    let len = rules.len();
    let mut d = Digester::new();
    d.u64(version);
    for r in rules {
        d.rule(r.line, r);
    }
    d.u64(len as u64);
    d.finish()
}

impl Rule {
    /// The rule's identity: a digest of what it allows (its selectors and ports, in order),
    /// the same wherever in the file it stands. Edits match rules by it.
    pub fn identity(&self) -> u64 {
        let mut d = Digester::new();
        d.rule_body(self);
        d.finish()
    }
}

impl Policy {
    /// A digest of the whole policy: its version and every rule (line included), in order.
    /// Equal policies have equal digests; an edit names its base and result by it.
    pub fn digest(&self) -> u64 {
        digest_of(self.version, &self.rules)
    }

    /// Checks that `edit` applies to this policy and yields the policy it announces, in one
    /// pass over the rules, copying none and changing nothing. Returns the number of rules
    /// of the result.
    ///
    /// # Errors
    /// [`EditError`] when this policy is not the edit's base, the script does not fit it,
    /// or the result is not the announced policy.
    pub fn check_edit(&self, edit: &PolicyEdit) -> Result<usize, EditError> {
        if self.version != edit.base {
            return Err(EditError::BaseVersion {
                base: edit.base,
                have: self.version.to_string(),
            });
        }
        // The result's digest, as the result would be built.
        let mut d = Digester::new();
        d.u64(edit.version);
        let (mut next, mut len) = (0usize, 0usize);
        for (op, step) in edit.ops.iter().enumerate() {
            let take = |count: u32| {
                let left = self.rules.len() - next;
                match usize::try_from(count) {
                    Ok(c) if c <= left => Ok(c),
                    _ => Err(EditError::PastEnd { op, count, left }),
                }
            };
            let more = match step {
                EditOp::Keep { count, shift } => {
                    let count = take(*count)?;
                    for r in &self.rules[next..next + count] {
                        let line = i64::from(r.line)
                            .checked_add(*shift)
                            .and_then(|l| u32::try_from(l).ok())
                            .ok_or(EditError::Line { op, line: r.line })?;
                        d.rule(line, r);
                    }
                    next += count;
                    count
                }
                EditOp::Drop { count } => {
                    next += take(*count)?;
                    0
                }
                EditOp::Add { rules } => {
                    for r in rules {
                        d.rule(r.line, r);
                    }
                    rules.len()
                }
            };
            len = len.saturating_add(more);
            if len > MAX_RULES {
                return Err(EditError::TooManyRules);
            }
        }
        if next != self.rules.len() {
            return Err(EditError::Unconsumed {
                left: self.rules.len() - next,
            });
        }
        d.u64(len as u64);
        if d.finish() != edit.digest {
            return Err(EditError::Digest);
        }
        Ok(len)
    }

    /// Applies `edit` in place ([`Policy::check_edit`] first): this policy becomes the one the
    /// edit announces. The rules kept are moved, not copied.
    ///
    /// # Errors
    /// As [`Policy::check_edit`]; the policy is then unchanged.
    pub fn apply_edit(&mut self, edit: &PolicyEdit) -> Result<(), EditError> {
        let len = self.check_edit(edit)?;
        let mut base = std::mem::take(&mut self.rules).into_iter();
        let mut rules = Vec::with_capacity(len);
        for step in &edit.ops {
            match step {
                EditOp::Keep { count, shift } => {
                    rules.extend(base.by_ref().take(*count as usize).map(|mut r| {
                        // Checked above: the line stays in range.
                        r.line = (i64::from(r.line) + shift) as u32;
                        r
                    }))
                }
                EditOp::Drop { count } => base.by_ref().take(*count as usize).for_each(drop),
                EditOp::Add { rules: new } => rules.extend(new.iter().cloned()),
            }
        }
        self.rules = rules;
        self.version = edit.version;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testkit::{policy, rule, Lcg};

    /// `p` with `edit` applied, or why not; `p` itself unchanged when refused.
    fn edited(p: &Policy, edit: &PolicyEdit) -> Result<Policy, EditError> {
        let mut out = p.clone();
        let result = out.apply_edit(edit);
        if result.is_err() {
            assert_eq!(&out, p, "a refused edit changed the policy");
        }
        result.map(|()| out)
    }

    fn round_trip(old: &Policy, new: &Policy) -> Option<PolicyEdit> {
        let edit = old.edit_to(new)?;
        // Over the wire and back.
        let json = serde_json::to_string(&edit).unwrap();
        let edit: PolicyEdit = serde_json::from_str(&json).unwrap();
        assert_eq!(edited(old, &edit).as_ref(), Ok(new), "{edit:?}");
        Some(edit)
    }

    #[test]
    fn identity_ignores_the_line_and_digest_sees_everything() {
        let a = rule(3, 80);
        assert_eq!(a.identity(), rule(9, 80).identity());
        assert_ne!(a.identity(), rule(3, 81).identity());
        let mut swapped = a.clone();
        std::mem::swap(&mut swapped.from, &mut swapped.to);
        assert_ne!(a.identity(), swapped.identity());
        let p = policy(1, &[80, 81]);
        let mut q = p.clone();
        q.rules[1].line += 1;
        assert_ne!(p.digest(), q.digest(), "a line");
        q = p.clone();
        q.version = 2;
        assert_ne!(p.digest(), q.digest(), "the version");
        q = p.clone();
        q.rules.swap(0, 1);
        assert_ne!(p.digest(), q.digest(), "the order");
        assert_eq!(p.digest(), p.clone().digest());
    }

    #[test]
    fn a_few_changed_rules_travel_alone() {
        let ports: Vec<u16> = (1..=1000).collect();
        let old = policy(1, &ports);
        let mut changed = ports.clone();
        for i in [3, 500, 997] {
            changed[i] += 5000;
        }
        let new = policy(2, &changed);
        let edit = round_trip(&old, &new).unwrap();
        assert_eq!(added(&edit), 3);
        let whole = serde_json::to_vec(&new).unwrap().len();
        let small = serde_json::to_vec(&edit).unwrap().len();
        assert!(small * 50 < whole, "{small} bytes against {whole}");
    }

    #[test]
    fn lines_move_with_a_rule_removed_or_added_above_them() {
        let ports: Vec<u16> = (1..=50).collect();
        let old = policy(4, &ports);
        // Rule 10 removed: every later rule moves up 4 lines.
        let mut fewer = ports.clone();
        fewer.remove(10);
        let edit = round_trip(&old, &policy(5, &fewer)).unwrap();
        assert_eq!(
            edit.ops,
            vec![
                EditOp::Keep {
                    count: 10,
                    shift: 0
                },
                EditOp::Drop { count: 1 },
                EditOp::Keep {
                    count: 39,
                    shift: -4
                },
            ]
        );
        // One added at the top: everything moves down.
        let mut more = vec![999];
        more.extend(&ports);
        round_trip(&old, &policy(5, &more)).unwrap();
        // The same rules, only their lines moved: no rule travels.
        let mut moved = old.clone();
        moved.version = 5;
        moved.rules.iter_mut().for_each(|r| r.line += 2);
        let edit = round_trip(&old, &moved).unwrap();
        assert_eq!(
            edit.ops,
            vec![EditOp::Keep {
                count: 50,
                shift: 2
            }]
        );
    }

    #[test]
    fn order_and_repeated_rules_come_out_exactly() {
        let mut rng = Lcg(11);
        for round in 0..300 {
            let n = rng.below(40);
            // Few distinct ports: rules repeat.
            let ports: Vec<u16> = (0..n).map(|_| rng.below(6) as u16).collect();
            let old = policy(round, &ports);
            let mut new_ports = ports.clone();
            for _ in 0..rng.below(4) {
                match rng.below(4) {
                    0 if !new_ports.is_empty() => {
                        let i = rng.below(new_ports.len());
                        new_ports.remove(i);
                    }
                    1 => {
                        let i = rng.below(new_ports.len() + 1);
                        new_ports.insert(i, rng.below(9) as u16);
                    }
                    2 if new_ports.len() > 1 => {
                        let i = rng.below(new_ports.len());
                        let j = rng.below(new_ports.len());
                        new_ports.swap(i, j);
                    }
                    _ if !new_ports.is_empty() => {
                        let i = rng.below(new_ports.len());
                        new_ports[i] = 100 + rng.below(9) as u16;
                    }
                    _ => {}
                }
            }
            let new = policy(round + 1, &new_ports);
            let ids = |p: &Policy| p.rules.iter().map(Rule::identity).collect::<Vec<_>>();
            let shortest = new.rules.len() - lcs(&ids(&old), &ids(&new));
            match round_trip(&old, &new) {
                // A shortest script: as many adds as `new` has rules outside a longest
                // common subsequence.
                Some(edit) => assert_eq!(added(&edit), shortest, "round {round}"),
                // Refused only when adding would not be smaller than the whole.
                None => assert!(
                    2 * shortest > new.rules.len() || new.rules.len() < 16,
                    "round {round}"
                ),
            }
        }
    }

    fn added(edit: &PolicyEdit) -> usize {
        edit.ops
            .iter()
            .map(|op| match op {
                EditOp::Add { rules } => rules.len(),
                _ => 0,
            })
            .sum()
    }

    /// The length of a longest common subsequence, by the textbook table.
    fn lcs(a: &[u64], b: &[u64]) -> usize {
        let mut t = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                t[i][j] = if a[i - 1] == b[j - 1] {
                    t[i - 1][j - 1] + 1
                } else {
                    t[i - 1][j].max(t[i][j - 1])
                };
            }
        }
        t[a.len()][b.len()]
    }

    #[test]
    fn a_whole_replacement_is_not_an_edit() {
        let old = policy(1, &(1..=100).collect::<Vec<_>>());
        let new = policy(2, &(1001..=1100).collect::<Vec<_>>());
        assert_eq!(old.edit_to(&new), None);
        // Every rule moved (the largest policy, reversed): past the search's bound, whole.
        let ports: Vec<u16> = (0..MAX_RULES as u16).collect();
        let reversed: Vec<u16> = ports.iter().rev().copied().collect();
        assert_eq!(policy(1, &ports).edit_to(&policy(2, &reversed)), None);
        // One rule replaced in a one-rule policy: the whole policy is as small.
        assert_eq!(policy(1, &[1]).edit_to(&policy(2, &[2])), None);
    }

    #[test]
    fn an_edit_applies_to_its_base_only() {
        let old = policy(3, &[1, 2, 3, 4]);
        let new = policy(4, &[1, 2, 9, 4]);
        let edit = old.edit_to(&new).unwrap();
        assert!(matches!(
            edited(&policy(2, &[1, 2, 3, 4]), &edit),
            Err(EditError::BaseVersion { base: 3, .. })
        ));
        // The same version with other rules (a node whose rules changed in between): the
        // result is not the announced one.
        assert_eq!(
            edited(&policy(3, &[1, 2, 3, 5]), &edit),
            Err(EditError::Digest)
        );
        assert_eq!(
            edited(&policy(3, &[1, 2, 3]), &edit),
            Err(EditError::PastEnd {
                op: 3,
                count: 1,
                left: 0
            })
        );
        // Other rules only where the edit drops them: the result is the announced one.
        assert_eq!(edited(&policy(3, &[1, 2, 7, 4]), &edit), Ok(new));
    }

    #[test]
    fn untrusted_scripts_are_refused_not_obeyed() {
        let old = policy(3, &[1, 2, 3]);
        let base = |ops: Vec<EditOp>| PolicyEdit {
            base: 3,
            version: 4,
            digest: 0,
            ops,
        };
        let keep = |count, shift| EditOp::Keep { count, shift };
        assert_eq!(
            edited(&old, &base(vec![keep(2, 0), EditOp::Drop { count: 5 }])),
            Err(EditError::PastEnd {
                op: 1,
                count: 5,
                left: 1
            })
        );
        assert_eq!(
            edited(&old, &base(vec![keep(u32::MAX, 0)])),
            Err(EditError::PastEnd {
                op: 0,
                count: u32::MAX,
                left: 3
            })
        );
        assert_eq!(
            edited(&old, &base(vec![keep(2, 0)])),
            Err(EditError::Unconsumed { left: 1 })
        );
        assert_eq!(
            edited(&old, &base(vec![keep(3, -2)])),
            Err(EditError::Line { op: 0, line: 1 })
        );
        assert_eq!(
            edited(&old, &base(vec![keep(3, i64::MAX)])),
            Err(EditError::Line { op: 0, line: 1 })
        );
        // A script that fits but yields another policy than announced.
        assert_eq!(
            edited(&old, &base(vec![keep(3, 0)])),
            Err(EditError::Digest)
        );
        let flood = EditOp::Add {
            rules: vec![rule(1, 1); MAX_RULES / 2 + 1],
        };
        assert_eq!(
            edited(&old, &base(vec![keep(3, 0), flood.clone(), flood])),
            Err(EditError::TooManyRules)
        );
        // Malformed JSON is a decode error, not a panic.
        assert!(serde_json::from_str::<PolicyEdit>(
            r#"{"base":1,"version":2,"digest":1,"ops":[{"keep":{"count":-1}}]}"#
        )
        .is_err());
    }
}
