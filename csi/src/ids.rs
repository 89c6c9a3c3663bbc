//! CSI volume and snapshot IDs: what routing needs, in the ID itself.
//!
//! Owns: [`CsiId`], its text form and [`validate_node_id`]. Must never: hold state; an ID
//! is everything the driver knows about an object between calls.
//!
//! Form: `vol:<node-id>:<volume-uuid>` and `snap:<node-id>:<snapshot-uuid>`.
//! - The node id says which node's daemon holds the object (volumes are node-local): a
//!   plugin given another node's ID answers with an error naming that node instead of
//!   looking it up in its own daemon.
//! - The UUID is the daemon's: unique in the daemon across pools, never reused, so it
//!   names the object without the pool (a pool is found from the object).
//! - The kind prefix keeps a snapshot ID from being taken for a volume ID and the other
//!   way round; a new form gets a new prefix.
//!
//! Sizes: a node id is at most 63 bytes (it is also a Kubernetes topology label value),
//! so an ID is at most `5 + 63 + 1 + 36` = 105 bytes, under the spec's 128.

use std::fmt;

/// Longest node id (a Kubernetes label value).
pub const MAX_NODE_ID_BYTES: usize = 63;

/// The text of a UUID: 8-4-4-4-12 hex digits.
const UUID_BYTES: usize = 36;

/// What an ID names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A volume (`vol:`).
    Volume,
    /// A snapshot (`snap:`).
    Snapshot,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Volume => "vol",
            Self::Snapshot => "snap",
        }
    }

    /// The word errors use.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Volume => "volume",
            Self::Snapshot => "snapshot",
        }
    }
}

/// A parsed volume or snapshot ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiId {
    /// Volume or snapshot.
    pub kind: Kind,
    /// The node whose daemon holds it.
    pub node_id: String,
    /// The daemon's UUID of the object (lower-case text form).
    pub uuid: String,
}

impl CsiId {
    /// The ID of `uuid` on `node_id`.
    pub fn new(kind: Kind, node_id: &str, uuid: &str) -> Self {
        Self {
            kind,
            node_id: node_id.to_owned(),
            uuid: uuid.to_ascii_lowercase(),
        }
    }

    /// Parses `text` as an ID of `kind`. `None` when it is not one: no object of this
    /// driver has that ID (CSI then answers NOT_FOUND, or OK for a delete).
    pub fn parse(kind: Kind, text: &str) -> Option<Self> {
        let rest = text.strip_prefix(kind.prefix())?.strip_prefix(':')?;
        let (node_id, uuid) = rest.rsplit_once(':')?;
        if validate_node_id(node_id).is_err() || !is_uuid(uuid) {
            return None;
        }
        Some(Self::new(kind, node_id, uuid))
    }
}

impl fmt::Display for CsiId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind.prefix(), self.node_id, self.uuid)
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == UUID_BYTES
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Checks a node id: 1 to 63 characters from `A-Z a-z 0-9 . _ -`, starting and ending with
/// a letter or digit (the daemon's rule, and a valid Kubernetes label value).
///
/// # Errors
/// A sentence saying what is wrong and the rule.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let ok_ends = id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if !id.is_empty() && id.len() <= MAX_NODE_ID_BYTES && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(format!(
            "invalid node id {id:?}: a node id is 1 to {MAX_NODE_ID_BYTES} characters from \
             A-Z a-z 0-9 . _ - starting and ending with a letter or digit (it becomes the \
             topology label topology.coreblk.io/node)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "0f8e5a2c-1b2d-4e3f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn round_trip() {
        let id = CsiId::new(Kind::Volume, "node-a.example", U);
        let text = id.to_string();
        assert_eq!(text, format!("vol:node-a.example:{U}"));
        assert_eq!(CsiId::parse(Kind::Volume, &text), Some(id));
        let longest = CsiId::new(Kind::Snapshot, &"n".repeat(MAX_NODE_ID_BYTES), U).to_string();
        assert!(longest.len() <= 128, "{}", longest.len());
    }

    #[test]
    fn kinds_do_not_mix_and_garbage_is_no_id() {
        let snap = CsiId::new(Kind::Snapshot, "n1", U).to_string();
        assert_eq!(CsiId::parse(Kind::Volume, &snap), None);
        for bad in [
            "",
            "vol",
            "vol:",
            "vol:n1",
            "vol::0f8e5a2c-1b2d-4e3f-8a9b-0c1d2e3f4a5b",
            "vol:n1:not-a-uuid",
            "vol:-n1:0f8e5a2c-1b2d-4e3f-8a9b-0c1d2e3f4a5b",
            "vol:n/1:0f8e5a2c-1b2d-4e3f-8a9b-0c1d2e3f4a5b",
            "vol:n1:0f8e5a2c-1b2d-4e3f-8a9b-0c1d2e3f4a5bX",
        ] {
            assert_eq!(CsiId::parse(Kind::Volume, bad), None, "{bad}");
        }
    }

    #[test]
    fn node_ids() {
        assert!(validate_node_id("worker-1.example.com").is_ok());
        assert!(validate_node_id("").is_err());
        assert!(validate_node_id("a:b").is_err());
        assert!(validate_node_id(&"a".repeat(64)).is_err());
        assert!(validate_node_id("a-").is_err());
    }
}
