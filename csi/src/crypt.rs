//! Encryption at rest: LUKS2 through `cryptsetup` and the kernel's dm-crypt (no cipher of
//! our own). A volume labelled `csi.coreblk.io/encryption=luks2` (fsopts.rs) is formatted
//! LUKS2 by NodeStageVolume only when the store reports it never written and it has no
//! content source, opened as the mapping `coreblk-<volume uuid>`, and the filesystem (or
//! the raw block device) lives on the mapping; NodeUnstageVolume closes it.
//!
//! The passphrase comes from the node-stage secret (key [`SECRET_KEY`]); it goes to
//! cryptsetup on stdin (`--key-file=-`), never on a command line, in a log, an error, a
//! metric or the daemon's metadata ([`Passphrase`] prints as `<redacted>`).
//!
//! Owns: [`Passphrase`], [`format`], [`open`], [`close`], [`mapped`], [`configure`]. Must
//! never: format a volume the caller has not found blank by the store's word; read the
//! volume's bytes to decide anything (a wrong passphrase is cryptsetup's exit code 2,
//! nothing else is guessed).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use crate::fsopts::{ENCRYPTION_LUKS2, PARAM_ENCRYPTION};
use crate::mounts::{self, RunError};

/// The key of the node-stage secret that holds the passphrase.
pub const SECRET_KEY: &str = "passphrase";
/// The prefix of every mapping this driver opens (`coreblk-<uuid>`).
pub const MAPPING_PREFIX: &str = "coreblk-";
/// Deadline of luksFormat and open (the key derivation is slow on purpose).
const CRYPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// cryptsetup's exit code for "no key slot opened with this passphrase".
const EXIT_WRONG_KEY: i32 = 2;
/// cryptsetup's exit code for "the device is busy (in use)".
const EXIT_BUSY: i32 = 5;
/// Longest passphrase taken (cryptsetup reads at most 8 MiB of a key file; a
/// passphrase is far less).
const MAX_PASSPHRASE_BYTES: usize = 4096;

/// Format settings of the driver (flags of `coreblk-csi`); `None`: cryptsetup's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// `--pbkdf-memory` (KiB) of argon2id at luksFormat.
    pub pbkdf_memory_kib: Option<u32>,
    /// `--iter-time` (ms) of the key derivation at luksFormat.
    pub iter_time_ms: Option<u32>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the format settings once, at start-up (later calls change nothing).
pub fn configure(s: Settings) {
    let _ = SETTINGS.set(s);
}

/// A passphrase: printed as `<redacted>`, overwritten when dropped.
pub struct Passphrase(Vec<u8>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        self.0.fill(0);
    }
}

/// Whether volume labels mark the volume LUKS2-encrypted.
pub fn encrypted(labels: &HashMap<String, String>) -> bool {
    labels.get(PARAM_ENCRYPTION).map(String::as_str) == Some(ENCRYPTION_LUKS2)
}

/// The passphrase in a node-stage secret.
///
/// # Errors
/// A sentence saying what is missing and where it comes from (not the secret's values).
pub fn passphrase(secrets: &HashMap<String, String>) -> Result<Passphrase, String> {
    let hint = "the StorageClass must name a Secret with \
                csi.storage.k8s.io/node-stage-secret-name and -namespace, holding the key";
    match secrets.get(SECRET_KEY) {
        None => Err(format!(
            "the volume is LUKS2-encrypted and the request carries no passphrase (secret key \
             {SECRET_KEY:?}{}); {hint} {SECRET_KEY:?}",
            if secrets.is_empty() {
                String::new()
            } else {
                let mut keys: Vec<&str> = secrets.keys().map(String::as_str).collect();
                keys.sort_unstable();
                format!("; the secret has keys {}", keys.join(", "))
            }
        )),
        Some(p) if p.is_empty() => Err(format!(
            "the volume is LUKS2-encrypted and the passphrase (secret key {SECRET_KEY:?}) is \
             empty; {hint} {SECRET_KEY:?} with a non-empty value"
        )),
        Some(p) if p.len() > MAX_PASSPHRASE_BYTES => Err(format!(
            "the passphrase (secret key {SECRET_KEY:?}) is {} bytes; at most \
             {MAX_PASSPHRASE_BYTES}",
            p.len()
        )),
        Some(p) => Ok(Passphrase(p.as_bytes().to_vec())),
    }
}

/// The mapping name of volume `uuid`.
pub fn mapping_name(uuid: &str) -> String {
    format!("{MAPPING_PREFIX}{uuid}")
}

/// The kernel name (`dm-3`) of the open dm mapping `name`, from sysfs; `None` when no
/// such mapping is open.
pub fn mapped(name: &str) -> Option<String> {
    let dir = std::fs::read_dir("/sys/block").ok()?;
    dir.filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dm-"))
        .find(|n| {
            std::fs::read_to_string(format!("/sys/block/{n}/dm/name"))
                .is_ok_and(|m| m.trim() == name)
        })
}

/// Whether the mapping `dm` (`dm-3`) sits on block device `below` (`ublkb2`).
pub fn maps_onto(dm: &str, below: &str) -> bool {
    std::path::Path::new(&format!("/sys/block/{dm}/slaves/{below}")).exists()
}

/// Why a LUKS2 step failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// The passphrase opens no key slot.
    #[error("the passphrase does not open the volume's LUKS2 header (no key slot matches)")]
    WrongPassphrase,
    /// The mapping is in use (close).
    #[error("the mapping {0} is still in use (mounted or open); unmount it first")]
    Busy(String),
    /// cryptsetup failed otherwise.
    #[error(transparent)]
    Tool(#[from] RunError),
}

/// Common cryptsetup flags: no udev (the plugin makes no assumptions about one; dm nodes
/// appear in devtmpfs as /dev/dm-N, which is what the driver uses).
fn base_args() -> Vec<String> {
    vec!["--batch-mode".into(), "--disable-external-tokens".into()]
}

/// `cryptsetup luksFormat --type luks2` on `device` with `pass`: only for a volume the
/// store reports never written and without a content source (the caller's check).
///
/// # Errors
/// [`CryptError::Tool`] with cryptsetup's output.
pub async fn format(device: &str, pass: &Passphrase) -> Result<(), CryptError> {
    let s = SETTINGS.get().copied().unwrap_or_default();
    let mut args = base_args();
    args.extend(
        [
            "luksFormat",
            "--type",
            "luks2",
            "--pbkdf",
            "argon2id",
            "--key-file=-",
        ]
        .map(str::to_owned),
    );
    if let Some(m) = s.pbkdf_memory_kib {
        args.extend(["--pbkdf-memory".to_owned(), m.to_string()]);
    }
    if let Some(t) = s.iter_time_ms {
        args.extend(["--iter-time".to_owned(), t.to_string()]);
    }
    args.push(device.to_owned());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    mounts::run_with_input("cryptsetup", &a, Some(&pass.0), CRYPT_TIMEOUT).await?;
    Ok(())
}

/// `cryptsetup open --type luks2` of `device` as mapping `name`.
///
/// # Errors
/// [`CryptError::WrongPassphrase`] (exit code 2), else [`CryptError::Tool`].
pub async fn open(device: &str, name: &str, pass: &Passphrase) -> Result<(), CryptError> {
    let mut args = base_args();
    args.extend(["open", "--type", "luks2", "--key-file=-", device, name].map(str::to_owned));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match mounts::run_with_input("cryptsetup", &a, Some(&pass.0), CRYPT_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(RunError::Failed {
            code: Some(EXIT_WRONG_KEY),
            ..
        }) => Err(CryptError::WrongPassphrase),
        Err(e) => Err(e.into()),
    }
}

/// `cryptsetup close name`; a mapping that is not open is closed already.
///
/// # Errors
/// [`CryptError::Busy`] while something holds it, else [`CryptError::Tool`].
pub async fn close(name: &str) -> Result<(), CryptError> {
    if mapped(name).is_none() {
        return Ok(());
    }
    let mut args = base_args();
    args.extend(["close", name].map(str::to_owned));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match mounts::run("cryptsetup", &a, CLOSE_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(_) if mapped(name).is_none() => Ok(()),
        Err(RunError::Failed {
            code: Some(EXIT_BUSY),
            ..
        }) => Err(CryptError::Busy(name.to_owned())),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrases_come_from_the_secret_and_never_print() {
        let s = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let p = passphrase(&s(&[("passphrase", "hunter2")])).expect("ok");
        assert_eq!(format!("{p:?}"), "<redacted>");
        assert_eq!(p.0, b"hunter2");
        let e = passphrase(&s(&[])).expect_err("missing");
        assert!(e.contains("node-stage-secret-name"), "{e}");
        let e = passphrase(&s(&[("key", "hunter2")])).expect_err("wrong key");
        assert!(e.contains("keys key") && !e.contains("hunter2"), "{e}");
        let e = passphrase(&s(&[("passphrase", "")])).expect_err("empty");
        assert!(e.contains("empty"), "{e}");
        let long = "x".repeat(MAX_PASSPHRASE_BYTES + 1);
        let e = passphrase(&s(&[("passphrase", &long)])).expect_err("long");
        assert!(!e.contains(&long), "{e}");
        assert!(encrypted(&s(&[("csi.coreblk.io/encryption", "luks2")])));
        assert!(!encrypted(&s(&[("csi.coreblk.io/encryption", "no")])));
        assert_eq!(mapping_name("abc"), "coreblk-abc");
    }
}
