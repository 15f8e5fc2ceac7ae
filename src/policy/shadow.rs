//! Finding the allow rules that a deny rule makes dead, without comparing every pair.
//!
//! A policy of 100,000 rules with one deny in ten would need nine hundred million
//! [`Rule::is_covered_by`] checks if every allow were held against every deny. Flow:
//! [`DenyIndex::new`] files each deny rule under every `from` entry it names (a trust
//! domain's `/*`, a prefix, an exact ID); [`DenyIndex::shadowing`] takes an allow's first
//! `from` entry and looks up only the entries that could cover it (its trust domain's
//! `/*`, the entry itself, and each prefix above its path), then checks those few denies
//! fully, in file order, so the deny reported is the first one that covers the allow, as
//! a check of every pair would find.

use crate::policy::{Action, IdMatcher, Rule};
use std::collections::HashMap;

/// Which `from` entries of one trust domain a deny rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Entry<'r> {
    /// `spiffe://td/*`
    Domain,
    /// `spiffe://td/prefix/*`, the prefix without its `/*`.
    Prefix(&'r str),
    /// `spiffe://td/path`
    Exact(&'r str),
}

/// The deny rules of one policy, filed by the `from` entries they name.
pub struct DenyIndex<'r> {
    rules: &'r [Rule],
    /// Indices into `rules` of the denies naming each (trust domain, entry), in file order.
    filed: HashMap<(&'r str, Entry<'r>), Vec<usize>>,
}

impl<'r> DenyIndex<'r> {
    pub fn new(rules: &'r [Rule]) -> DenyIndex<'r> {
        let mut filed: HashMap<(&str, Entry), Vec<usize>> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            if rule.action != Action::Deny {
                continue;
            }
            for m in &rule.from {
                let entry = match m {
                    IdMatcher::Domain { .. } => Entry::Domain,
                    IdMatcher::Prefix { prefix, .. } => Entry::Prefix(prefix),
                    IdMatcher::Exact { path, .. } => Entry::Exact(path),
                };
                let denies = filed.entry((m.trust_domain(), entry)).or_default();
                if denies.last() != Some(&i) {
                    denies.push(i);
                }
            }
        }
        DenyIndex { rules, filed }
    }

    /// The first deny rule (in file order) that covers every request `allow` allows.
    pub fn shadowing(&self, allow: &Rule) -> Option<&'r Rule> {
        // A deny covering the allow covers each of its `from` entries, the first one too.
        let first = allow.from.first()?;
        let td = first.trust_domain();
        let (own, path) = match first {
            IdMatcher::Domain { .. } => (Entry::Domain, ""),
            IdMatcher::Prefix { prefix, .. } => (Entry::Prefix(prefix), prefix.as_str()),
            IdMatcher::Exact { path, .. } => (Entry::Exact(path), path.as_str()),
        };
        let above = path
            .match_indices('/')
            .filter(|(at, _)| *at > 0)
            .map(|(at, _)| Entry::Prefix(&path[..at]));
        let mut candidates: Vec<usize> = [Entry::Domain, own]
            .into_iter()
            .chain(above)
            .filter_map(|e| self.filed.get(&(td, e)))
            .flatten()
            .copied()
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .map(|i| &self.rules[i])
            .find(|deny| allow.is_covered_by(deny))
    }
}
