//! StorageClass parameters that reach the node: `csi.coreblk.io/mkfs-options` (checked
//! against an allow-list per filesystem and turned into the mkfs argument list) and
//! `csi.coreblk.io/encryption` (LUKS2 at rest). Both are kept as labels of the volume
//! at CreateVolume, so NodeStageVolume reads them from the daemon's volume (a clone or
//! restore inherits the encryption label from its source).
//!
//! Owns: [`mkfs_args`], [`check_class_param`], the parameter/label names. Must never: pass
//! anything through a shell (the arguments go to the tool one by one), or accept an
//! option it does not know (a class could otherwise ask mkfs to discard, to write a
//! different device, or to take its input from a file).

/// Parameter and volume label: extra options for mkfs, e.g. `-E lazy_itable_init=0 -m 0`.
pub const PARAM_MKFS_OPTIONS: &str = "csi.coreblk.io/mkfs-options";
/// Parameter and volume label: `luks2` encrypts the volume at rest (dm-crypt).
pub const PARAM_ENCRYPTION: &str = "csi.coreblk.io/encryption";
/// The one encryption format.
pub const ENCRYPTION_LUKS2: &str = "luks2";
/// The prefix of this driver's own parameters and labels: a class's `labels` parameter
/// may not set them (they decide how the node treats the volume).
pub const COREBLK_PREFIX: &str = "csi.coreblk.io/";
/// Longest mkfs-options text.
const MAX_OPTIONS_BYTES: usize = 512;

/// Checks a StorageClass parameter of this module: `None` when `key` is not one.
pub fn check_class_param(key: &str, value: &str) -> Option<Result<(), String>> {
    match key {
        PARAM_MKFS_OPTIONS => Some(if value.len() > MAX_OPTIONS_BYTES {
            Err(format!(
                "parameter {PARAM_MKFS_OPTIONS} is {} bytes; at most {MAX_OPTIONS_BYTES}",
                value.len()
            ))
        } else {
            // The filesystem is known only with the capability: checked again then.
            Ok(())
        }),
        PARAM_ENCRYPTION => Some(match value {
            ENCRYPTION_LUKS2 => Ok(()),
            other => Err(format!(
                "parameter {PARAM_ENCRYPTION} is {other:?}: write \"{ENCRYPTION_LUKS2}\" \
                 (LUKS2, passphrase from the node-stage secret) or leave it out (not encrypted)"
            )),
        }),
        _ => None,
    }
}

/// How an option takes its value.
enum Value {
    /// A flag alone (`-K`).
    None,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A whole number in this range.
    Number(u64, u64),
    /// A comma list of `key` or `key=value` items, each allowed by [`Item`].
    List(&'static [Item]),
}

/// One allowed item of a comma list: its key and what its value may be.
struct Item(&'static str, ItemValue);

#[derive(Clone, Copy)]
enum ItemValue {
    /// No value (`nodiscard`).
    Flag,
    /// `0` or `1`.
    Bool,
    /// A whole number.
    Number,
    /// A whole number with an optional k/m/g suffix (xfs sizes).
    Size,
}

const ONOFF: ItemValue = ItemValue::Bool;

const EXT4_EXTENDED: &[Item] = &[
    Item("lazy_itable_init", ONOFF),
    Item("lazy_journal_init", ONOFF),
    Item("nodiscard", ItemValue::Flag),
    Item("stride", ItemValue::Number),
    Item("stripe_width", ItemValue::Number),
    Item("stripe-width", ItemValue::Number),
    Item("num_backup_sb", ItemValue::Number),
    Item("packed_meta_blocks", ONOFF),
];

/// ext4 features `-O` may turn on or (with `^`) off.
const EXT4_FEATURES: &[&str] = &[
    "64bit",
    "dir_index",
    "dir_nlink",
    "extent",
    "extra_isize",
    "flex_bg",
    "has_journal",
    "huge_file",
    "inline_data",
    "large_dir",
    "large_file",
    "metadata_csum",
    "metadata_csum_seed",
    "orphan_file",
    "project",
    "quota",
    "sparse_super",
    "sparse_super2",
    "uninit_bg",
];

const EXT4: &[(&str, Value)] = &[
    ("-b", Value::OneOf(&["1024", "2048", "4096"])),
    ("-i", Value::Number(1024, 1 << 26)),
    ("-I", Value::OneOf(&["128", "256", "512", "1024"])),
    ("-m", Value::Number(0, 50)),
    ("-N", Value::Number(1, u32::MAX as u64)),
    ("-J", Value::List(&[Item("size", ItemValue::Number)])),
    ("-E", Value::List(EXT4_EXTENDED)),
    // Checked against EXT4_FEATURES (with an optional ^) below.
    ("-O", Value::List(&[])),
    (
        "-T",
        Value::OneOf(&[
            "default",
            "small",
            "news",
            "largefile",
            "largefile4",
            "huge",
            "big",
        ]),
    ),
];

const XFS: &[(&str, Value)] = &[
    ("-b", Value::List(&[Item("size", ItemValue::Size)])),
    (
        "-i",
        Value::List(&[
            Item("size", ItemValue::Size),
            Item("maxpct", ItemValue::Number),
            Item("sparse", ONOFF),
            Item("nrext64", ONOFF),
        ]),
    ),
    (
        "-m",
        Value::List(&[
            Item("crc", ONOFF),
            Item("finobt", ONOFF),
            Item("reflink", ONOFF),
            Item("rmapbt", ONOFF),
            Item("bigtime", ONOFF),
            Item("inobtcount", ONOFF),
        ]),
    ),
    (
        "-l",
        Value::List(&[
            Item("size", ItemValue::Size),
            Item("lazy-count", ONOFF),
            Item("su", ItemValue::Size),
        ]),
    ),
    (
        "-n",
        Value::List(&[Item("size", ItemValue::Size), Item("ftype", ONOFF)]),
    ),
    (
        "-d",
        Value::List(&[
            Item("agcount", ItemValue::Number),
            Item("su", ItemValue::Size),
            Item("sw", ItemValue::Number),
        ]),
    ),
    ("-K", Value::None),
];

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_size(s: &str) -> bool {
    let digits = s.strip_suffix(['k', 'm', 'g', 'K', 'M', 'G']).unwrap_or(s);
    is_number(digits)
}

fn allowed_list(table: &[(&str, Value)]) -> String {
    table.iter().map(|(o, _)| *o).collect::<Vec<_>>().join(" ")
}

fn item_names(items: &[Item]) -> String {
    items.iter().map(|i| i.0).collect::<Vec<_>>().join(", ")
}

/// Checks one comma list value of option `opt`.
fn check_list(fs: &str, opt: &str, items: &[Item], value: &str) -> Result<(), String> {
    for part in value.split(',') {
        if fs == "ext4" && opt == "-O" {
            let name = part.strip_prefix('^').unwrap_or(part);
            if !EXT4_FEATURES.contains(&name) {
                return Err(format!(
                    "{PARAM_MKFS_OPTIONS}: ext4 feature {part:?} of -O is not allowed; \
                     allowed (each may start with ^ to turn it off): {}",
                    EXT4_FEATURES.join(", ")
                ));
            }
            continue;
        }
        let (key, val) = match part.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (part, None),
        };
        let bad = || {
            format!(
                "{PARAM_MKFS_OPTIONS}: {fs} option {opt} {part:?} is not allowed; {opt} takes \
                 {} (comma-separated, key=value)",
                item_names(items)
            )
        };
        let Some(item) = items.iter().find(|i| i.0 == key) else {
            return Err(bad());
        };
        let ok = match (item.1, val) {
            (ItemValue::Flag, None) => true,
            (ItemValue::Bool, Some(v)) => v == "0" || v == "1",
            (ItemValue::Number, Some(v)) => is_number(v),
            (ItemValue::Size, Some(v)) => is_size(v),
            _ => false,
        };
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// The arguments of `mkfs.<fs>` (before the device) for a never-written volume: this
/// driver's fixed ones (quiet, force, no discard: a never-written thin volume has nothing
/// to discard), then the class's `options` checked against the allow-list of `fs`.
/// `options` is split at whitespace; each option and its value are separate words
/// (`-b 4096`, `-m crc=1,reflink=1`). An ext4 `-E` list gets `nodiscard` added.
///
/// # Errors
/// A sentence naming the option that is not allowed and what is.
pub fn mkfs_args(fs: &str, options: &str) -> Result<Vec<String>, String> {
    let (table, mut args): (&[(&str, Value)], Vec<String>) = match fs {
        "ext4" => (EXT4, vec!["-q".into(), "-F".into()]),
        "xfs" => (XFS, vec!["-q".into(), "-f".into(), "-K".into()]),
        other => {
            return Err(format!(
                "{PARAM_MKFS_OPTIONS}: filesystem {other:?} is not one coreblk makes (ext4, xfs)"
            ))
        }
    };
    if options.len() > MAX_OPTIONS_BYTES {
        return Err(format!(
            "{PARAM_MKFS_OPTIONS} is {} bytes; at most {MAX_OPTIONS_BYTES}",
            options.len()
        ));
    }
    let mut extended: Option<String> = None;
    let mut words = options.split_whitespace();
    while let Some(opt) = words.next() {
        let Some((_, kind)) = table.iter().find(|(o, _)| *o == opt) else {
            return Err(format!(
                "{PARAM_MKFS_OPTIONS}: {fs} option {opt:?} is not allowed; allowed: {} (each \
                 option and its value are separate words, e.g. \"-b 4096\"); fix the \
                 StorageClass",
                allowed_list(table)
            ));
        };
        if matches!(kind, Value::None) {
            args.retain(|a| a != opt);
            args.push(opt.to_owned());
            continue;
        }
        let Some(value) = words.next() else {
            return Err(format!(
                "{PARAM_MKFS_OPTIONS}: {fs} option {opt} needs a value"
            ));
        };
        match kind {
            Value::None => {}
            Value::OneOf(words) => {
                if !words.contains(&value) {
                    return Err(format!(
                        "{PARAM_MKFS_OPTIONS}: {fs} option {opt} {value:?} is not allowed; \
                         give one of {}",
                        words.join(", ")
                    ));
                }
            }
            Value::Number(lo, hi) => {
                let n: Option<u64> = is_number(value).then(|| value.parse().ok()).flatten();
                if !n.is_some_and(|n| (*lo..=*hi).contains(&n)) {
                    return Err(format!(
                        "{PARAM_MKFS_OPTIONS}: {fs} option {opt} {value:?} is not a whole \
                         number from {lo} to {hi}"
                    ));
                }
            }
            Value::List(items) => check_list(fs, opt, items, value)?,
        }
        if fs == "ext4" && opt == "-E" {
            // mke2fs keeps only the last -E: one list, merged below.
            extended = Some(match extended {
                Some(e) => format!("{e},{value}"),
                None => value.to_owned(),
            });
            continue;
        }
        args.push(opt.to_owned());
        args.push(value.to_owned());
    }
    if fs == "ext4" {
        let mut e = extended.unwrap_or_default();
        if !e.split(',').any(|i| i == "nodiscard") {
            if !e.is_empty() {
                e.push(',');
            }
            e.push_str("nodiscard");
        }
        args.push("-E".to_owned());
        args.push(e);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[String]) -> String {
        v.join(" ")
    }

    #[test]
    fn defaults_without_options() {
        assert_eq!(
            words(&mkfs_args("ext4", "").expect("ok")),
            "-q -F -E nodiscard"
        );
        assert_eq!(words(&mkfs_args("xfs", "  ").expect("ok")), "-q -f -K");
    }

    #[test]
    fn allowed_options_pass_through_one_word_each() {
        assert_eq!(
            words(
                &mkfs_args("ext4", "-b 4096 -m 0 -E lazy_itable_init=0 -O ^has_journal,metadata_csum -J size=16")
                    .expect("ok")
            ),
            "-q -F -b 4096 -m 0 -O ^has_journal,metadata_csum -J size=16 -E lazy_itable_init=0,nodiscard"
        );
        assert_eq!(
            words(&mkfs_args("ext4", "-E nodiscard,stride=16 -E lazy_journal_init=1").expect("ok")),
            "-q -F -E nodiscard,stride=16,lazy_journal_init=1"
        );
        assert_eq!(
            words(
                &mkfs_args(
                    "xfs",
                    "-b size=4096 -m crc=1,reflink=0 -i size=512 -l size=64m -K"
                )
                .expect("ok")
            ),
            "-q -f -b size=4096 -m crc=1,reflink=0 -i size=512 -l size=64m -K"
        );
    }

    #[test]
    fn anything_else_is_refused_with_the_allowed_list() {
        for (fs, bad, says) in [
            ("ext4", "-E discard", "\"discard\""),
            ("ext4", "-b 8192", "1024, 2048, 4096"),
            ("ext4", "-m 99", "0 to 50"),
            ("ext4", "-m -1", "0 to 50"),
            ("ext4", "-O encrypt", "\"encrypt\""),
            ("ext4", "-d /etc", "\"-d\""),
            ("ext4", "-b", "needs a value"),
            ("ext4", "-b4096", "separate words"),
            ("ext4", "-L x; rm -rf /", "\"-L\""),
            ("xfs", "-K -b 4096", "size"),
            ("xfs", "-m crc=yes", "crc"),
            ("xfs", "-p /etc/protofile", "\"-p\""),
            ("xfs", "-f", "\"-f\""),
            ("btrfs", "", "not one coreblk makes"),
        ] {
            let e = mkfs_args(fs, bad).expect_err(bad);
            assert!(e.contains(says), "{fs} {bad:?}: {e}");
            assert!(e.contains(PARAM_MKFS_OPTIONS), "{e}");
        }
        let long = "-m 1 ".repeat(200);
        assert!(mkfs_args("ext4", &long).is_err());
    }

    #[test]
    fn class_params() {
        assert!(check_class_param("pool", "x").is_none());
        assert_eq!(check_class_param(PARAM_ENCRYPTION, "luks2"), Some(Ok(())));
        assert!(matches!(
            check_class_param(PARAM_ENCRYPTION, "true"),
            Some(Err(e)) if e.contains("luks2")
        ));
        assert_eq!(check_class_param(PARAM_MKFS_OPTIONS, "-m 0"), Some(Ok(())));
        assert!(matches!(
            check_class_param(PARAM_MKFS_OPTIONS, &"x".repeat(600)),
            Some(Err(_))
        ));
    }
}
