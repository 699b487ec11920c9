//! What the policy modules' tests share: a small deterministic generator and policies made of
//! ports.

use super::{Policy, Ports, Rule, Selector};

/// A 64-bit LCG, Knuth's MMIX constants.
pub(in crate::policy) struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next()).unwrap() % n.max(1)
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// A rule from `tag:web` to `tag:db-(port mod 7)` on TCP `port`, at `line`.
pub(in crate::policy) fn rule(line: u32, port: u16) -> Rule {
    Rule {
        line,
        from: vec![Selector::Tag("web".into())],
        to: vec![Selector::Tag(format!("db-{}", port % 7))],
        ports: vec![Ports::Tcp(port, port)],
    }
}

/// A policy of rules with these ports (repeats allowed), each rule on its own 4 lines.
pub(in crate::policy) fn policy(version: u64, ports: &[u16]) -> Policy {
    Policy {
        version,
        rules: ports
            .iter()
            .enumerate()
            .map(|(i, &p)| rule(1 + 4 * i as u32, p))
            .collect(),
    }
}
