//! The access policy: which services may read which Swarm secrets. Deny by default: a
//! request is allowed only by a rule that matches it, and no rule (no `swarm.policy`)
//! denies everything.

use std::collections::HashMap;

use super::config::Rule;

/// What the policy decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `swarm.policy[index]`.
    Allow {
        /// The rule's index in the file.
        rule: usize,
    },
    /// No rule matched.
    Deny {
        /// Why, for the log and the driver's `Err` (names the key to change).
        reason: String,
    },
}

impl Decision {
    /// `allow` or `deny`, the metric's and the event's label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow",
            Decision::Deny { .. } => "deny",
        }
    }

    /// The rule, as the log and the event name it (`swarm.policy[0]`, or `none`).
    pub fn rule(&self) -> String {
        match self {
            Decision::Allow { rule } => format!("swarm.policy[{rule}]"),
            Decision::Deny { .. } => "none".to_owned(),
        }
    }
}

/// Decides whether service `service` (with `labels`) may read Swarm secret `secret` (its
/// base name: the same for every version dso creates).
pub fn decide(policy: &[Rule], secret: &str, service: &str, labels: &HashMap<String, String>) -> Decision {
    if policy.is_empty() {
        return Decision::Deny {
            reason: "the agent's config has no swarm.policy rule, so every request is denied; add one that allows this service".to_owned(),
        };
    }
    for (i, rule) in policy.iter().enumerate() {
        let secret_ok = rule.secrets.iter().any(|p| glob(p, secret));
        let name_ok = rule.services.is_empty() || rule.services.iter().any(|p| glob(p, service));
        let labels_ok = rule.service_labels.iter().all(|(k, v)| labels.get(k) == Some(v));
        if secret_ok && name_ok && labels_ok {
            return Decision::Allow { rule: i };
        }
    }
    Decision::Deny {
        reason: format!("no swarm.policy rule allows service {service} to read secret {secret}"),
    }
}

/// `*` matches any run of characters (none included); everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn rule(secrets: &[&str], services: &[&str], labels: &[(&str, &str)]) -> Rule {
        Rule {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            services: services.iter().map(|s| s.to_string()).collect(),
            service_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn globs() {
        assert!(glob("db", "db"));
        assert!(!glob("db", "dbx"));
        assert!(glob("db-*", "db-prod"));
        assert!(glob("db-*", "db-"));
        assert!(!glob("db-*", "web-db"));
        assert!(glob("*", ""));
        assert!(glob("*-api-*", "prod-api-1"));
        assert!(!glob("a*a", "a"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxcyyb"));
    }

    #[test]
    fn no_policy_denies_and_says_which_key() {
        let d = decide(&[], "db", "api", &HashMap::new());
        assert_eq!(d.as_str(), "deny");
        let Decision::Deny { reason } = d else { panic!() };
        assert!(reason.contains("swarm.policy"), "{reason}");
    }

    #[test]
    fn the_first_matching_rule_allows_and_names_and_labels_both_hold() {
        let policy = vec![
            rule(&["db*"], &["api"], &[("team", "pay")]),
            rule(&["web-*"], &["*"], &[]),
            rule(&["token"], &[], &[("tier", "back")]),
        ];
        let pay: HashMap<String, String> = [("team".to_owned(), "pay".to_owned())].into();
        let back: HashMap<String, String> = [("tier".to_owned(), "back".to_owned())].into();
        assert_eq!(decide(&policy, "db", "api", &pay), Decision::Allow { rule: 0 });
        // The name matches but the label is missing: denied.
        assert_eq!(decide(&policy, "db", "api", &HashMap::new()).as_str(), "deny");
        // Another service with the label: denied.
        assert_eq!(decide(&policy, "db", "worker", &pay).as_str(), "deny");
        assert_eq!(
            decide(&policy, "web-cert", "anything", &HashMap::new()),
            Decision::Allow { rule: 1 }
        );
        assert_eq!(decide(&policy, "token", "x", &back), Decision::Allow { rule: 2 });
        assert_eq!(decide(&policy, "token", "x", &pay).as_str(), "deny");
        assert_eq!(decide(&policy, "other", "api", &pay).rule(), "none");
    }
}
