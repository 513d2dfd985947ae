//! Instance names: derived from the deployment's namespace and the user id alone, so every
//! retry, every overlapping run and every re-created queue row asks the server for the same name,
//! a taken name can only be this deployment's own instance of that user, and two databases
//! pointed at one server (production and a staging copy) never share one. Only `[a-z0-9_]`,
//! at most 50 characters (the recommended limit is 64).
//!
//! 0.1.0 named instances `evoq_<hex>`, with no namespace. Those instances keep their names: the
//! name is stored in the queue and instance rows, and a stored name always wins over a derived one.

use uuid::Uuid;

pub const PREFIX: &str = "evoq_";

/// `evoq_<namespace>_<32 hex digits>`.
pub fn instance_name(namespace: &str, user_id: Uuid) -> String {
    format!("{PREFIX}{namespace}_{}", user_id.simple())
}

/// The 0.1.0 name, for instances created before namespaces existed.
pub fn legacy_instance_name(user_id: Uuid) -> String {
    format!("{PREFIX}{}", user_id.simple())
}

/// Whether a stored name is this deployment's to use: its own namespace's, or a 0.1.0 name
/// (no namespace) when this database is the one that was upgraded from 0.1.0. A name of another
/// namespace (rows a copy inherited from the original) is not: the row gets a new name instead,
/// so the copy never adopts the original's instance.
pub fn is_ours(name: &str, namespace: &str, owns_legacy_names: bool) -> bool {
    match name.strip_prefix(PREFIX) {
        Some(rest) if rest.contains('_') => rest
            .strip_prefix(namespace)
            .is_some_and(|r| r.starts_with('_')),
        Some(_) => owns_legacy_names,
        None => false,
    }
}

/// The user whose instance `name` is, when it is exactly a name this deployment makes:
/// `evoq_<namespace>_<32 hex digits>`, or the 0.1.0 `evoq_<32 hex digits>` where this database
/// owns those. Anything else (another namespace, another app's instance, a name evoq never
/// makes) is None: the reconciler never touches it.
pub fn user_of(name: &str, namespace: &str, owns_legacy_names: bool) -> Option<Uuid> {
    let rest = name.strip_prefix(PREFIX)?;
    let hex = match rest
        .strip_prefix(namespace)
        .and_then(|r| r.strip_prefix('_'))
    {
        Some(hex) => hex,
        None if owns_legacy_names => rest,
        None => return None,
    };
    let valid = hex.len() == 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then(|| Uuid::parse_str(hex).ok()).flatten()
}

/// A namespace is 1 to 12 lower-case letters or digits.
pub fn valid_namespace(namespace: &str) -> bool {
    (1..=12).contains(&namespace.len())
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Uuid {
        Uuid::parse_str("0f8fad5b-d9cb-469f-a165-70867728950e").unwrap()
    }

    #[test]
    fn user_of_takes_only_names_this_deployment_makes() {
        let u = id();
        assert_eq!(user_of(&instance_name("ns1", u), "ns1", false), Some(u));
        assert_eq!(user_of(&legacy_instance_name(u), "ns1", true), Some(u));
        assert_eq!(user_of(&legacy_instance_name(u), "ns1", false), None);
        assert_eq!(user_of(&instance_name("ns2", u), "ns1", false), None);
        assert_eq!(user_of(&instance_name("ns2", u), "ns1", true), None);
        assert_eq!(user_of(&instance_name("ns1", u), "ns", false), None);
        for other in [
            "evoq_ns1_",
            "evoq_ns1_xyz",
            "evoq_ns1_0F8FAD5BD9CB469FA16570867728950E",
            "myapp_user_1",
            "evoq_ns1_0f8fad5bd9cb469fa16570867728950e0",
            "evoq_ns1_0f8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            assert_eq!(user_of(other, "ns1", true), None, "{other}");
        }
    }

    #[test]
    fn deterministic_safe_and_namespaced() {
        let name = instance_name("a1b2c3d4", id());
        assert_eq!(name, "evoq_a1b2c3d4_0f8fad5bd9cb469fa16570867728950e");
        assert_ne!(name, instance_name("staging", id()));
        assert_ne!(name, instance_name("a1b2c3d4", Uuid::new_v4()));
        let longest = instance_name("abcdefghijkl", id());
        assert!(longest.len() <= 50, "{longest}");
        assert!(longest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    }

    #[test]
    fn legacy_names_are_those_of_0_1_0() {
        assert_eq!(
            legacy_instance_name(id()),
            "evoq_0f8fad5bd9cb469fa16570867728950e"
        );
    }

    #[test]
    fn namespaces_are_short_lowercase_alphanumerics() {
        assert!(valid_namespace("prod"));
        assert!(valid_namespace("a1b2c3d4e5f6"));
        for bad in [
            "",
            "Prod",
            "a_b",
            "a-b",
            "abcdefghijklm",
            "ü",
            "a b",
            "x'; --",
        ] {
            assert!(!valid_namespace(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_this_deployments_names_are_used() {
        let ours = instance_name("prod", id());
        assert!(is_ours(&ours, "prod", false));
        assert!(!is_ours(&instance_name("staging", id()), "prod", true));
        // "prod" must not match a namespace that merely starts with it.
        assert!(!is_ours(&instance_name("prod2", id()), "prod", true));
        let legacy = legacy_instance_name(id());
        assert!(is_ours(&legacy, "prod", true));
        assert!(!is_ours(&legacy, "prod", false));
        assert!(!is_ours("someone_else", "prod", true));
    }
}
