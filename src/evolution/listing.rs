//! `GET /instance/fetchInstances` with no filter: every instance a server holds, for the
//! reconciler. The reply is big (about 940 bytes per instance on a real 2.3.6: each row carries
//! its settings, relations, message counts and token), so it is read as a stream and only the
//! name and state of each instance are kept; the rest (the tokens included) is skipped without
//! being held. Memory is then about the names, not the reply.
//!
//! Shapes (docs/evolution-api.md, section 3.6):
//! - v2: an array of database rows `{"name", "connectionStatus", ...}`;
//! - v1.8: an array of `{"instance": {"instanceName", "status", ...}}`.

use serde::Deserialize;
use std::io::Read;

/// The most a listing may be: 64 MiB, about 70 000 instances at 940 bytes each, far beyond the
/// 80-100 live sessions one server holds well. What is kept of it is about 100 bytes an instance.
pub const MAX_LISTING_BYTES: u64 = 64 * 1024 * 1024;
/// `MAX_LISTING_BYTES` as messages say it.
pub const MAX_LISTING_LABEL: &str = "64 MiB";
/// Longer names are no instance name of evoq's (its own are at most 50 characters); such an item
/// is kept with its name cut, so it can never match a row.
const MAX_NAME_CHARS: usize = 128;

/// One instance as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedInstance {
    pub name: String,
    /// `open`, `connecting` or `close` (the server's database: it lags the live state, which
    /// connectionState tells); None when the item has none.
    pub state: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    name: Option<String>,
    #[serde(rename = "connectionStatus")]
    connection_status: Option<String>,
    instance: Option<V1Item>,
}

#[derive(Deserialize)]
struct V1Item {
    #[serde(rename = "instanceName")]
    instance_name: Option<String>,
    status: Option<String>,
}

fn known_state(s: Option<String>) -> Option<String> {
    s.filter(|s| matches!(s.as_str(), "open" | "connecting" | "close"))
}

impl Item {
    fn listed(self) -> Option<ListedInstance> {
        let (name, state) = match (self.name, self.instance) {
            (Some(name), _) => (name, self.connection_status),
            (None, Some(v1)) => (v1.instance_name?, v1.status),
            (None, None) => return None,
        };
        let name = if name.chars().count() > MAX_NAME_CHARS {
            name.chars().take(MAX_NAME_CHARS).collect()
        } else {
            name
        };
        Some(ListedInstance {
            name,
            state: known_state(state),
        })
    }
}

/// Counts what passes, so a reply cut at the limit is told from a malformed one.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Why a listing could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ListingError {
    /// Over `MAX_LISTING_BYTES`.
    TooLarge,
    /// Not an array of instances; the parser's words (never the reply's content).
    Malformed(String),
}

/// Reads a listing from `reader`, at most `MAX_LISTING_BYTES` (pass a reader limited to one byte
/// more). Items that name no instance are skipped.
pub fn read_listing(reader: impl Read) -> Result<Vec<ListedInstance>, ListingError> {
    read_listing_capped(reader, MAX_LISTING_BYTES)
}

fn read_listing_capped(reader: impl Read, cap: u64) -> Result<Vec<ListedInstance>, ListingError> {
    let mut counted = Counted {
        inner: std::io::BufReader::new(reader).take(cap + 1),
        read: 0,
    };
    let items: Result<Vec<Item>, serde_json::Error> = serde_json::from_reader(&mut counted);
    if counted.read > cap {
        return Err(ListingError::TooLarge);
    }
    match items {
        // An item that names no instance is no server's: a reply of another shape would
        // otherwise read as a server that holds nothing, and every row would look lost.
        Ok(items) => {
            let total = items.len();
            let listed: Vec<ListedInstance> = items.into_iter().filter_map(Item::listed).collect();
            if listed.len() < total {
                return Err(ListingError::Malformed(format!(
                    "{} of {total} items name no instance",
                    total - listed.len()
                )));
            }
            Ok(listed)
        }
        Err(e) => Err(ListingError::Malformed(format!(
            "{} at line {} column {}",
            match e.classify() {
                serde_json::error::Category::Io => "the reply broke off",
                serde_json::error::Category::Eof => "the reply ended early",
                serde_json::error::Category::Syntax => "the reply is not JSON",
                serde_json::error::Category::Data => "the reply is not an array of instances",
            },
            e.line(),
            e.column()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_item(name: &str, state: &str) -> String {
        // A real 2.3.6 row, token and relations included (docs/evolution-api.md, 3.6).
        format!(
            r#"{{"id":"f6de79f3-0000","name":"{name}","connectionStatus":"{state}","ownerJid":null,"profileName":null,
            "profilePicUrl":null,"integration":"WHATSAPP-BAILEYS","number":null,"businessId":null,
            "token":"4BE17E02-SECRET","clientName":"evolution","disconnectionReasonCode":null,
            "disconnectionObject":null,"disconnectionAt":null,"createdAt":"2026-01-01T00:00:00.000Z",
            "updatedAt":"2026-01-01T00:00:00.000Z","Chatwoot":null,"Proxy":null,"Rabbitmq":null,"Nats":null,
            "Sqs":null,"Websocket":null,"Setting":{{"id":"x","rejectCall":true,"msgCall":"","groupsIgnore":true}},
            "_count":{{"Message":0,"Contact":0,"Chat":0}}}}"#
        )
    }

    #[test]
    fn a_v2_listing_gives_names_and_states_and_keeps_no_token() {
        let body = format!("[{},{}]", v2_item("a", "open"), v2_item("b", "close"));
        let listed = read_listing(body.as_bytes()).unwrap();
        assert_eq!(
            listed,
            vec![
                ListedInstance {
                    name: "a".into(),
                    state: Some("open".into())
                },
                ListedInstance {
                    name: "b".into(),
                    state: Some("close".into())
                },
            ]
        );
        assert!(!format!("{listed:?}").contains("SECRET"));
    }

    #[test]
    fn a_v1_listing_gives_names_and_states() {
        let body = r#"[{"instance":{"instanceName":"a","instanceId":"1","status":"open","owner":"x@s.whatsapp.net"}},
                       {"instance":{"instanceName":"b","status":"weird"}}]"#;
        let listed = read_listing(body.as_bytes()).unwrap();
        assert_eq!(
            listed,
            vec![
                ListedInstance {
                    name: "a".into(),
                    state: Some("open".into())
                },
                ListedInstance {
                    name: "b".into(),
                    state: None
                },
            ]
        );
    }

    /// A reply of another shape must not read as a server that holds nothing.
    #[test]
    fn items_that_name_no_instance_make_the_listing_malformed() {
        for body in [
            r#"[{"instance":{"instanceName":"a"}},{"instance":{}}]"#,
            r#"[{"other":1}]"#,
            r#"[{"instanceName":"a","state":"open"}]"#,
        ] {
            assert!(
                matches!(
                    read_listing(body.as_bytes()),
                    Err(ListingError::Malformed(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn an_empty_server_lists_nothing() {
        assert_eq!(read_listing(&b"[]"[..]).unwrap(), vec![]);
    }

    #[test]
    fn what_is_not_a_listing_is_malformed_and_not_quoted() {
        for body in [
            &b"{\"error\":\"token-secret\"}"[..],
            b"<html>",
            b"[{\"name\":\"a\"",
            b"",
        ] {
            match read_listing(body) {
                Err(ListingError::Malformed(m)) => assert!(!m.contains("secret"), "{m}"),
                other => panic!("{other:?} for {:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn a_listing_over_the_cap_is_too_large_not_malformed() {
        let body = format!(
            "[{}]",
            (0..100)
                .map(|i| v2_item(&format!("n{i}"), "open"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(
            read_listing_capped(body.as_bytes(), 10_000),
            Err(ListingError::TooLarge)
        );
        assert_eq!(
            read_listing_capped(body.as_bytes(), body.len() as u64)
                .unwrap()
                .len(),
            100
        );
    }

    #[test]
    fn an_overlong_name_is_cut() {
        let long = "x".repeat(10_000);
        let listed = read_listing(format!("[{}]", v2_item(&long, "open")).as_bytes()).unwrap();
        assert_eq!(listed[0].name.len(), MAX_NAME_CHARS);
    }

    /// 5 000 instances as a real server lists them (about 4.7 MB) are read into about 100
    /// bytes an instance: what is kept is the names, not the reply.
    #[test]
    fn five_thousand_instances_keep_only_their_names() {
        let body = format!(
            "[{}]",
            (0..5000)
                .map(|i| v2_item(&format!("evoq_ns_{i:032x}"), "open"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(body.len() > 3_000_000, "{}", body.len());
        let listed = read_listing(body.as_bytes()).unwrap();
        assert_eq!(listed.len(), 5000);
        let kept: usize = listed
            .iter()
            .map(|l| l.name.capacity() + l.state.as_ref().map_or(0, String::capacity))
            .sum();
        assert!(kept < 5000 * 100, "{kept}");
    }
}
