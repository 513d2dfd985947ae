//! Which function a request calls, decided as PostgREST's `findProc` decides it, from the
//! catalog, inside the request's own psql session.
//!
//! The rules (PostgREST docs, "Functions as RPC", and `findProc` in PostgREST's Plan.hs):
//! * Candidates: the functions (`prokind = 'f'`) of that name in the exposed schema.
//! * An overload matches a JSON object body when every key names one of its input parameters
//!   and every parameter without a default is given ("Each key/value of the object will become
//!   an argument"); a function without parameters matches only `{}`.
//! * If none matches, a function with a single UNNAMED `json` or `jsonb` parameter takes the
//!   raw body, whatever its keys (PostgREST 9, made for webhooks). A single NAMED json/jsonb
//!   parameter does not: `f(payload jsonb)` is reached only by `{"payload": ...}`.
//! * One match: called. None: 404 PGRST202. More than one: 300 PGRST203.
//!
//! The lookup and the call share one psql process and one transaction, so the stand-in
//! costs one connection per request as before: the lookup query `\gset`s whether exactly one
//! function matched and a `PREPARE` for it, built server-side with `format('%I')` (names and
//! types come from the catalog, never from the request), `\echo`s its verdict as the first line
//! of output for the stand-in to read, and `\if` it matched runs the `PREPARE` with `\gexec` and
//! then `EXECUTE pgrst_call(:'body')`. The body only ever travels as a psql variable.
//!
//! Arguments are converted the way PostgREST converts them: `json_to_record(body)` with a
//! column per given parameter, typed as the parameter (so a `text` parameter gets a JSON
//! string's contents, `json`/`jsonb` the key's JSON, other types the JSON scalar's text cast
//! to the type), passed by name: `f("a" := pgrst_args."a")`. Parameters not in the body are
//! left out so their defaults apply. `bit`/`character` columns are widened to `bit varying`/
//! `character varying` as PostgREST does (the bare types would mean a length of 1).

use serde::Deserialize;
use serde_json::{json, Value};

/// The lookup, after `SET LOCAL ROLE` (pg_proc is readable by every role; EXECUTE rights are
/// checked by the call itself, which answers 42501 as PostgREST does). psql variables:
/// `schema`, `function`, `keys` (the body's keys as a JSON array, or `null` for a body that
/// is not an object) and `body`.
pub const LOOKUP_AND_CALL: &str = r#"WITH request AS (
  SELECT json_typeof(:'keys'::json) = 'array' AS is_object,
         ARRAY(SELECT json_array_elements_text(CASE json_typeof(:'keys'::json)
                                               WHEN 'array' THEN :'keys'::json ELSE '[]' END)) AS keys
), overloads AS (
  SELECT p.oid, n.nspname, p.proname,
         coalesce(array_agg(a.name ORDER BY a.ord) FILTER (WHERE a.ord IS NOT NULL), '{}') AS names,
         coalesce(array_agg(a.type ORDER BY a.ord) FILTER (WHERE a.ord IS NOT NULL), '{}') AS types,
         coalesce(array_agg(a.mode ORDER BY a.ord) FILTER (WHERE a.ord IS NOT NULL), '{}') AS modes,
         coalesce(array_agg(a.name ORDER BY a.ord) FILTER (WHERE a.required), '{}') AS required
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  LEFT JOIN LATERAL (
    SELECT coalesce(u.name, '') AS name, coalesce(u.mode, 'i') AS mode,
           CASE u.typ WHEN 'bit'::regtype THEN 'bit varying'
                      WHEN 'bit[]'::regtype THEN 'bit varying[]'
                      WHEN 'character'::regtype THEN 'character varying'
                      WHEN 'character[]'::regtype THEN 'character varying[]'
                      ELSE u.typ::regtype::text END AS type,
           row_number() OVER (ORDER BY u.ord) AS ord,
           row_number() OVER (ORDER BY u.ord) <= p.pronargs - p.pronargdefaults AS required
    FROM unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]), p.proargmodes, p.proargnames)
         WITH ORDINALITY AS u(typ, mode, name, ord)
    WHERE coalesce(u.mode, 'i') IN ('i', 'b', 'v')
  ) a ON true
  WHERE n.nspname = :'schema' AND p.proname = :'function' AND p.prokind = 'f'
  GROUP BY p.oid, n.nspname, p.proname
), judged AS (
  SELECT o.*, r.keys,
         r.is_object AND CASE WHEN cardinality(o.names) = 0 THEN cardinality(r.keys) = 0
                              ELSE r.keys <@ o.names AND o.required <@ r.keys END AS by_name,
         cardinality(o.names) = 1 AND o.names[1] = '' AND o.types[1] IN ('json', 'jsonb') AS takes_body
  FROM overloads o, request r
), chosen AS (
  SELECT * FROM judged
  WHERE by_name OR (takes_body AND NOT EXISTS (SELECT FROM judged WHERE by_name))
)
SELECT count(*) = 1 AS found,
       CASE WHEN count(*) <> 1 THEN ''
            -- One unnamed parameter is passed by position, the raw body cast to its type.
            WHEN bool_and(cardinality(names) = 1 AND names[1] = '') THEN
              (SELECT format('PREPARE pgrst_call(text) AS SELECT %I.%I($1::%s)', nspname, proname, types[1])
               FROM chosen)
            ELSE
              (SELECT CASE WHEN count(a.name) = 0
                           THEN format('PREPARE pgrst_call(text) AS SELECT %I.%I()', c.nspname, c.proname)
                           ELSE format('PREPARE pgrst_call(text) AS SELECT %I.%I(%s) FROM json_to_record($1::json) AS pgrst_args(%s)',
                                       c.nspname, c.proname,
                                       string_agg(format('%s%I := pgrst_args.%I',
                                                         CASE a.mode WHEN 'v' THEN 'VARIADIC ' ELSE '' END, a.name, a.name),
                                                  ', ' ORDER BY a.ord) FILTER (WHERE a.name IS NOT NULL),
                                       string_agg(format('%I %s', a.name, a.type), ', ' ORDER BY a.ord)
                                         FILTER (WHERE a.name IS NOT NULL)) END
               FROM chosen c
               LEFT JOIN LATERAL unnest(c.names, c.types, c.modes) WITH ORDINALITY AS a(name, type, mode, ord)
                      ON a.name = ANY (c.keys)
               GROUP BY c.nspname, c.proname)
       END AS prepare,
       json_build_object(
         'matches', count(*),
         'chosen', coalesce(json_agg(json_build_object('names', names, 'types', types) ORDER BY oid), '[]'),
         'overloads', (SELECT coalesce(json_agg(json_build_object('names', names, 'types', types) ORDER BY oid), '[]')
                       FROM judged)) AS lookup
FROM chosen \gset pgrst_
\echo :pgrst_lookup
\if :pgrst_found
SELECT :'pgrst_prepare' \gexec
EXECUTE pgrst_call(:'body');
\endif
"#;

/// A function's input parameters as the lookup reports them ("" for an unnamed one).
#[derive(Debug, Deserialize, PartialEq)]
pub struct Signature {
    pub names: Vec<String>,
    pub types: Vec<String>,
}

/// The lookup's verdict, the first line psql prints.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Lookup {
    pub matches: u64,
    pub chosen: Vec<Signature>,
    pub overloads: Vec<Signature>,
}

/// What a request whose lookup found no single function answers: status and PostgREST's body.
pub fn refusal(
    lookup: &Lookup,
    schema: &str,
    function: &str,
    keys: Option<&[String]>,
) -> (u16, Value) {
    if lookup.matches > 1 {
        return (300, ambiguous(schema, function, &lookup.chosen));
    }
    match keys {
        Some(keys) => (404, not_found(schema, function, keys, &lookup.overloads)),
        // PostgREST would make a bulk call of an array of objects; the stand-in does not.
        None => (
            400,
            json!({
                "code": "PGRST102",
                "message": "postgrest-standin: a JSON body that is not an object reaches only a function \
                            with a single unnamed json or jsonb parameter (PostgREST's bulk calls with an \
                            array body are not imitated)",
                "details": null,
                "hint": null,
            }),
        ),
    }
}

/// PGRST202, worded as PostgREST words it (its Error.hs, `NoRpc`). `keys` sorted, as
/// PostgREST keeps them in a set.
fn not_found(schema: &str, function: &str, keys: &[String], overloads: &[Signature]) -> Value {
    let func = format!("{schema}.{function}");
    let listed = keys.join(", ");
    let (in_message, in_details) = if keys.is_empty() {
        (
            " without parameters".to_string(),
            " without parameters".to_string(),
        )
    } else {
        let plural = if keys.len() > 1 { "s" } else { "" };
        (
            format!("({listed})"),
            format!(" with parameter{plural} {listed}"),
        )
    };
    json!({
        "code": "PGRST202",
        "message": format!("Could not find the function {func}{in_message} in the schema cache"),
        "details": format!(
            "Searched for the function {func}{in_details} or with a single unnamed json/jsonb parameter, \
             but no matches were found in the schema cache."
        ),
        "hint": closest(overloads, keys)
            .map(|s| format!("Perhaps you meant to call the function {func}({})", s.names.join(", "))),
    })
}

/// The overload to suggest: PostgREST fuzzy-matches the argument lists; this takes the one
/// sharing the most names with the request, the first of equals. Without any overload of
/// that name PostgREST fuzzy-matches other function names; the stand-in gives no hint.
fn closest<'a>(overloads: &'a [Signature], keys: &[String]) -> Option<&'a Signature> {
    let shared = |s: &Signature| s.names.iter().filter(|n| keys.contains(n)).count();
    overloads
        .iter()
        .enumerate()
        .max_by_key(|(i, s)| (shared(s), std::cmp::Reverse(*i)))
        .map(|(_, s)| s)
}

/// PGRST203 (PostgREST's `AmbiguousRpc`).
fn ambiguous(schema: &str, function: &str, chosen: &[Signature]) -> Value {
    let candidates: Vec<String> = chosen
        .iter()
        .map(|s| {
            let params: Vec<String> = s
                .names
                .iter()
                .zip(&s.types)
                .map(|(n, t)| format!("{n} => {t}"))
                .collect();
            format!("{schema}.{function}({})", params.join(", "))
        })
        .collect();
    json!({
        "code": "PGRST203",
        "message": format!("Could not choose the best candidate function between: {}", candidates.join(", ")),
        "details": null,
        "hint": "Try renaming the parameters or the function itself in the database so function overloading can be resolved",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(names: &[&str], types: &[&str]) -> Signature {
        Signature {
            names: names.iter().map(|s| s.to_string()).collect(),
            types: types.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn not_found_reads_like_postgrest() {
        let lookup = Lookup {
            matches: 0,
            chosen: vec![],
            overloads: vec![sig(&["payload"], &["jsonb"])],
        };
        let (status, body) = refusal(
            &lookup,
            "public",
            "evoq_webhook",
            Some(&keys(&["data", "event", "instance"])),
        );
        assert_eq!(status, 404);
        assert_eq!(
            body,
            json!({
                "code": "PGRST202",
                "message": "Could not find the function public.evoq_webhook(data, event, instance) in the schema cache",
                "details": "Searched for the function public.evoq_webhook with parameters data, event, instance or with a single unnamed json/jsonb parameter, but no matches were found in the schema cache.",
                "hint": "Perhaps you meant to call the function public.evoq_webhook(payload)",
            })
        );
        let none = Lookup {
            matches: 0,
            chosen: vec![],
            overloads: vec![],
        };
        let (_, body) = refusal(&none, "api", "f", Some(&keys(&["a"])));
        assert_eq!(
            body["details"],
            "Searched for the function api.f with parameter a or with a single unnamed json/jsonb parameter, but no matches were found in the schema cache."
        );
        assert_eq!(body["hint"], Value::Null);
        let (_, body) = refusal(&none, "api", "f", Some(&[]));
        assert_eq!(
            body["message"],
            "Could not find the function api.f without parameters in the schema cache"
        );
        // A body that is not an object: not a bulk call here.
        assert_eq!(refusal(&none, "api", "f", None).0, 400);
    }

    #[test]
    fn suggests_the_closest_overload() {
        let overloads = [sig(&["x"], &["int"]), sig(&["a", "b"], &["int", "int"])];
        assert_eq!(closest(&overloads, &keys(&["a"])), Some(&overloads[1]));
        assert_eq!(closest(&overloads, &keys(&["q"])), Some(&overloads[0]));
        assert_eq!(closest(&[], &keys(&["q"])), None);
    }

    #[test]
    fn ambiguous_lists_the_candidates() {
        let lookup = Lookup {
            matches: 2,
            chosen: vec![sig(&["x"], &["integer"]), sig(&["x"], &["text"])],
            overloads: vec![],
        };
        let (status, body) = refusal(&lookup, "public", "ov", Some(&keys(&["x"])));
        assert_eq!(status, 300);
        assert_eq!(body["code"], "PGRST203");
        assert_eq!(
            body["message"],
            "Could not choose the best candidate function between: public.ov(x => integer), public.ov(x => text)"
        );
    }
}
