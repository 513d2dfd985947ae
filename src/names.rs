//! Instance names: derived from the user id alone, so every retry, every overlapping run and
//! every re-created queue row asks the server for the same name, and a taken name can only be
//! this user's own instance. Only `[A-Za-z0-9_-]`, well under the 64-character limit.

use uuid::Uuid;

pub const PREFIX: &str = "evoq_";

pub fn instance_name(user_id: Uuid) -> String {
    format!("{PREFIX}{}", user_id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_safe() {
        let id = Uuid::parse_str("0f8fad5b-d9cb-469f-a165-70867728950e").unwrap();
        let name = instance_name(id);
        assert_eq!(name, "evoq_0f8fad5bd9cb469fa16570867728950e");
        assert_eq!(name, instance_name(id));
        assert!(name.len() <= 64);
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        assert_ne!(name, instance_name(Uuid::new_v4()));
    }
}
