//! The control plane's record of a volume or snapshot (the store's per-object control
//! record, FORMAT.md record type 8): what the control plane must find again after a
//! restart. It holds two independent parts — the export record (the export layer's JSON)
//! and the QoS limits — so either can change without the other (a read-modify-write on
//! the pool's owner reactor, [`crate::lvs::volume::PoolRt::update_control`]).
//!
//! Encoding: JSON `{"v":2,"export":{…},"qos":{…}}` with absent parts left out; no part at
//! all is the empty record (none kept). A record written before QoS existed is a bare
//! export record (it has no `"v"`) and reads as the export part alone. Why here and not a
//! new journal record type: the store already journals, checkpoints and deletes these
//! records with their object, durably (flushed) — exactly what limits need — so QoS needs
//! no on-disk format change.
//!
//! Must never: lose one part when the other changes, or read a record it does not
//! understand as "no limits" silently (a newer record is an error naming the version).

use serde_json::{Map, Value};

use crate::lvs::qos::QosLimits;

/// The version of the container this daemon writes.
const VERSION: u64 = 2;

/// The parts of a control record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectRecord {
    /// The export record's bytes (JSON), while the object is exported.
    pub export: Option<Vec<u8>>,
    /// QoS limits, when any are set.
    pub qos: Option<QosLimits>,
}

impl ObjectRecord {
    /// Reads a stored record (empty or absent: no parts).
    ///
    /// # Errors
    /// Not JSON, a newer version, or a part that does not parse; the message says which.
    pub fn decode(bytes: Option<&[u8]>) -> Result<Self, String> {
        let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
            return Ok(Self::default());
        };
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable control record: {e}"))?;
        let Value::Object(mut m) = v else {
            return Err("unreadable control record: not a JSON object".to_owned());
        };
        let Some(ver) = m.get("v") else {
            // Written before QoS: the export record alone.
            return Ok(Self {
                export: Some(bytes.to_vec()),
                qos: None,
            });
        };
        if ver.as_u64() != Some(VERSION) {
            return Err(format!(
                "control record version {ver} (this coreblkd reads {VERSION}); upgrade coreblkd"
            ));
        }
        let export = match m.remove("export") {
            None | Some(Value::Null) => None,
            Some(e) => {
                Some(serde_json::to_vec(&e).map_err(|e| format!("unreadable export part: {e}"))?)
            }
        };
        let qos = match m.remove("qos") {
            None | Some(Value::Null) => None,
            Some(q) => Some(
                serde_json::from_value::<QosLimits>(q)
                    .map_err(|e| format!("unreadable QoS part of a control record: {e}"))?,
            ),
        };
        Ok(Self { export, qos })
    }

    /// The bytes to store (empty: no record).
    ///
    /// # Errors
    /// The export part is not JSON.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let qos = self.qos.filter(|q| !q.is_unlimited());
        if self.export.is_none() && qos.is_none() {
            return Ok(Vec::new());
        }
        let mut m = Map::new();
        m.insert("v".to_owned(), Value::from(VERSION));
        if let Some(e) = &self.export {
            let e: Value = serde_json::from_slice(e)
                .map_err(|e| format!("an export record must be JSON: {e}"))?;
            m.insert("export".to_owned(), e);
        }
        if let Some(q) = qos {
            m.insert(
                "qos".to_owned(),
                serde_json::to_value(q).map_err(|e| format!("QoS limits: {e}"))?,
            );
        }
        serde_json::to_vec(&Value::Object(m)).map_err(|e| format!("control record: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_change_independently() {
        let export = br#"{"version":1,"dev_id":3}"#.to_vec();
        let qos = QosLimits {
            iops: 500,
            burst_ms: 20,
            ..QosLimits::default()
        };
        // A record from before QoS is the export part.
        let old = ObjectRecord::decode(Some(&export)).expect("legacy");
        assert_eq!(old.export.as_deref(), Some(export.as_slice()));
        assert_eq!(old.qos, None);
        // Add limits: the export part stays.
        let both = ObjectRecord {
            qos: Some(qos),
            ..old
        };
        let bytes = both.encode().expect("encode");
        let back = ObjectRecord::decode(Some(&bytes)).expect("decode");
        assert_eq!(back.qos, Some(qos));
        let e: Value =
            serde_json::from_slice(back.export.as_deref().expect("export")).expect("json");
        assert_eq!(e["dev_id"], 3);
        // Unexport: the limits stay; clear the limits too: no record at all.
        let q_only = ObjectRecord {
            export: None,
            ..back
        };
        let back = ObjectRecord::decode(Some(&q_only.encode().expect("encode"))).expect("decode");
        assert_eq!(
            back,
            ObjectRecord {
                export: None,
                qos: Some(qos)
            }
        );
        let none = ObjectRecord {
            qos: Some(QosLimits::default()),
            export: None,
        };
        assert!(none.encode().expect("encode").is_empty());
        assert_eq!(
            ObjectRecord::decode(None).expect("none"),
            ObjectRecord::default()
        );
        assert_eq!(
            ObjectRecord::decode(Some(b"")).expect("empty"),
            ObjectRecord::default()
        );
    }

    #[test]
    fn unknown_versions_and_garbage_are_errors() {
        let e = ObjectRecord::decode(Some(br#"{"v":3,"qos":{}}"#)).expect_err("newer");
        assert!(e.contains("version 3") && e.contains("upgrade"), "{e}");
        assert!(ObjectRecord::decode(Some(b"[1]")).is_err());
        assert!(ObjectRecord::decode(Some(b"{")).is_err());
        let e = ObjectRecord::decode(Some(br#"{"v":2,"qos":{"iops":"x"}}"#)).expect_err("bad qos");
        assert!(e.contains("QoS"), "{e}");
    }
}
