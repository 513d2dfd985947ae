//! The deployment: which Evolution instances are this database's. New instance names carry a
//! namespace bound to the database's identity (system identifier and database oid), so a copy of
//! the database (a restore, a staging clone) is recognised and never takes over the original's
//! instances, and two deployments on one Evolution server never share a name.

use crate::errors::{EvoqError, SpiResult};
use pgrx::prelude::*;

/// The error for a database whose identity is not the one its namespace was bound to.
pub fn copied_database(namespace: Option<&str>) -> EvoqError {
    let keep = namespace.map_or(String::new(), |ns| {
        format!(" If it is the same deployment moved to a new server, keep its namespace: namespace => '{ns}'.")
    });
    EvoqError::NotReady {
        message: "this database is not the one evoq was configured in (a restored or moved copy), \
                  so evoq will not call the Evolution API from it"
            .into(),
        hint: format!(
            "A copy (staging, a test restore) must not take over the original's instances: give it a namespace \
             of its own with SELECT evoq_configure(api_url => ..., api_key => ..., namespace => 'staging').{keep}"
        ),
    }
}

/// The namespace to store: the one given, else the one this database already has, else one
/// derived from the database's identity. A copy must be given one.
pub fn choose_namespace(given: Option<&str>) -> String {
    if let Some(ns) = given {
        let ns = ns.trim();
        if !crate::names::valid_namespace(ns) {
            EvoqError::invalid(
                format!("namespace must be 1 to 12 lower-case letters or digits, got {ns:?}"),
                "It becomes part of every instance name (evoq_<namespace>_<user>), e.g. namespace => 'staging'.",
            )
            .raise();
        }
        return ns.to_string();
    }
    let existing = Spi::get_two::<String, bool>(
        "SELECT namespace, deployment_identity IS NOT DISTINCT FROM evoq._deployment_identity() FROM evoq.settings",
    )
    .or_internal("reading its settings");
    match existing {
        (Some(ns), Some(true)) => ns,
        (Some(ns), _) => copied_database(Some(&ns)).raise(),
        (None, _) => Spi::get_one::<String>("SELECT evoq._default_namespace()")
            .or_internal("reading its settings")
            .unwrap_or_else(|| {
                EvoqError::internal("could not derive a namespace", "no value").raise()
            }),
    }
}

/// The Evolution instance name evoq uses for a user: the one already stored for them (instances
/// created by 0.1.0 keep `evoq_<hex>`), else `evoq_<namespace>_<hex>` with this deployment's
/// namespace (derived from the database's identity until evoq_configure sets one).
#[pg_extern(stable, parallel_safe, security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_instance_name(user_id: pgrx::Uuid) -> String {
    let (stored, namespace) = Spi::get_two_with_args::<String, String>(
        "SELECT coalesce((SELECT instance_name FROM evolution_instances WHERE user_id = $1),
                         (SELECT instance_name FROM evolution_instance_creation_queue WHERE user_id = $1)),
                coalesce((SELECT namespace FROM evoq.settings), evoq._default_namespace())",
        &[user_id.into()],
    )
    .unwrap_or_else(|e| crate::errors::EvoqError::internal("failed", e).raise());
    stored.unwrap_or_else(|| {
        crate::names::instance_name(
            &namespace.unwrap_or_default(),
            uuid::Uuid::from_bytes(*user_id.as_bytes()),
        )
    })
}
