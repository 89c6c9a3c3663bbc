//! Validation of the names and labels that clients give objects (pools, volumes,
//! snapshots), so every create checks them the same way and says the rule when it refuses.
//!
//! Owns: [`validate_name`], [`validate_labels`] and their limits. Must never: accept a
//! name a later layer could not store or a path could not carry (no `/`, no spaces, no
//! control characters).

use std::collections::HashMap;

use super::error::{Error, Result};

/// Longest object name, in bytes (a CSI name such as `pvc-<uuid>` is 40).
pub const MAX_NAME_BYTES: usize = 128;
/// Most labels on one object.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes (a Kubernetes qualified name: prefix/name).
pub const MAX_LABEL_KEY_BYTES: usize = 253;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;

/// The naming rule, in the words errors use.
pub const NAME_RULE: &str =
    "a name is 1 to 128 characters from A-Z a-z 0-9 . _ - and starts with a letter or a digit";

/// Checks an object name against [`NAME_RULE`]. `what` names the object in the error
/// (`"volume"`).
///
/// # Errors
/// [`Error::InvalidName`] quoting the rule.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    let shown: String = name.chars().take(MAX_NAME_BYTES + 8).collect();
    let rule = if name.len() > MAX_NAME_BYTES {
        format!("{NAME_RULE} (this one is {} bytes long)", name.len())
    } else {
        NAME_RULE.to_owned()
    };
    Err(Error::InvalidName {
        what,
        name: shown,
        rule,
    })
}

/// Checks a label map: at most [`MAX_LABELS`] labels, keys 1 to 253 printable ASCII
/// characters without spaces, values at most 1024 bytes without control characters.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the offending label and the rule.
pub fn validate_labels(labels: &HashMap<String, String>) -> Result<()> {
    let invalid = |reason: String| Error::InvalidArgument {
        field: "labels",
        reason,
    };
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "{} labels given; an object carries at most {MAX_LABELS}",
            labels.len()
        )));
    }
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_BYTES
            && key.bytes().all(|b| b.is_ascii_graphic());
        if !key_ok {
            let shown: String = key.chars().take(64).collect();
            return Err(invalid(format!(
                "label key {shown:?}: a key is 1 to {MAX_LABEL_KEY_BYTES} printable ASCII characters without spaces"
            )));
        }
        let value = &labels[key];
        if value.len() > MAX_LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
            return Err(invalid(format!(
                "value of label {key:?}: a value is at most {MAX_LABEL_VALUE_BYTES} bytes without control characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule_and_errors_quote_it() {
        for good in ["a", "pvc-0123", "Vol_1.snap", &"x".repeat(MAX_NAME_BYTES)] {
            validate_name("volume", good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "-lead",
            ".hidden",
            "a b",
            "a/b",
            "é",
            "tab\t",
            &"x".repeat(MAX_NAME_BYTES + 1),
        ] {
            let e = validate_name("volume", bad).expect_err(bad).to_string();
            assert!(e.starts_with("volume name "), "{e}");
            assert!(e.contains(NAME_RULE), "{e}");
        }
        let e = validate_name("pool", &"y".repeat(300)).expect_err("long");
        assert!(e.to_string().contains("300 bytes long"), "{e}");
    }

    #[test]
    fn labels_are_bounded() {
        let mut labels = HashMap::new();
        labels.insert("csi.storage.k8s.io/pvc/name".to_owned(), "data".to_owned());
        validate_labels(&labels).expect("ok");
        labels.insert("bad key".to_owned(), "v".to_owned());
        assert!(validate_labels(&labels).is_err());
        let many: HashMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(validate_labels(&many).is_err());
        let long: HashMap<String, String> =
            [("k".to_owned(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1))].into();
        assert!(validate_labels(&long).is_err());
    }
}
