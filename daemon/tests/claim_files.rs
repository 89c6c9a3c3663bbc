//! Claiming regular files end to end, through the public `bdev::{claim, discover, label}`
//! API, with the real `blkid`, `mkfs.ext4` and `mkswap` where the host has them.
//! (Block devices need root and real disks: the VM suite covers them.)

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use coreblk_daemon::bdev::claim::{claim, claim_with, read_label, render_table, ClaimError};
use coreblk_daemon::bdev::discover::{self, Prober, RefuseReason, MIN_DEVICE_BYTES};
use coreblk_daemon::bdev::label::{self, Label, Uuid};
use coreblk_daemon::bdev::sysfs::SysRoot;

const SIZE: u64 = 80 << 20;

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    fs::File::create(&path)
        .expect("create")
        .set_len(size)
        .expect("set_len");
    path
}

fn pool() -> Uuid {
    Uuid::random().expect("urandom")
}

fn reasons(err: ClaimError) -> Vec<RefuseReason> {
    match err {
        ClaimError::Refused { reasons, .. } => reasons,
        other => panic!("expected a refusal, got {other}"),
    }
}

fn have(tool: &str) -> bool {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).is_file());
    if !found {
        eprintln!("note: {tool} not installed; skipping this test");
    }
    found
}

#[test]
fn blank_file_is_claimed_labelled_and_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "pool.img", SIZE);
    let root = SysRoot::host();
    let pool = pool();

    let device = claim(&root, &path, pool, false).expect("claim a blank file");
    assert!(device.newly_labelled());
    assert!(device.overridden().is_empty());
    assert_eq!(device.size_bytes(), SIZE);
    assert_eq!(device.logical_block_size(), 4096);
    assert_eq!(device.label().pool_uuid, pool);
    assert_eq!(device.label().device_size_bytes, SIZE);
    let device_uuid = device.label().device_uuid;
    assert_eq!(
        read_label(&path).expect("read").map(|l| l.pool_uuid),
        Some(pool)
    );
    device.release(false).expect("release");

    // Same pool again (a restarted daemon): opened, not relabelled.
    let again = claim(&root, &path, pool, false).expect("reclaim by the same pool");
    assert!(!again.newly_labelled());
    assert_eq!(again.label().device_uuid, device_uuid);
    again.release(true).expect("release and wipe");
    assert_eq!(read_label(&path).expect("read"), None);
}

#[test]
fn second_claim_of_a_held_file_is_refused_by_the_ofd_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "pool.img", SIZE);
    let root = SysRoot::host();
    let pool = pool();
    let held = claim(&root, &path, pool, false).expect("first claim");

    let err = claim(&root, &path, pool, true).expect_err("second claim while held");
    let message = err.to_string();
    assert!(message.contains("OFD"), "{message}");
    assert!(matches!(reasons(err)[..], [RefuseReason::InUse { .. }]));

    drop(held);
    claim(&root, &path, pool, false).expect("claim after the holder let go");
}

#[test]
fn ext4_is_refused_by_name_and_taken_with_force() {
    if !have("mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "ext4.img", SIZE);
    let status = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&path)
        .status()
        .expect("run mkfs.ext4");
    assert!(status.success());
    let root = SysRoot::host();

    let err = claim(&root, &path, pool(), false).expect_err("ext4 must be refused");
    let message = err.to_string();
    assert_eq!(
        message,
        format!(
            "device {} has an ext4 filesystem; refusing to claim it (use --force to overwrite)",
            path.display()
        )
    );

    let device = claim(&root, &path, pool(), true).expect("forced claim");
    assert!(matches!(
        device.overridden(),
        [RefuseReason::Signature { kind, .. }] if kind == "ext4"
    ));
    assert!(
        device.residual_signatures().is_empty(),
        "{:?}",
        device.residual_signatures()
    );
    drop(device);
    let listed = discover::discover(&root, std::slice::from_ref(&path));
    let me = listed.iter().find(|c| c.path == path).expect("listed");
    assert!(me.signatures.is_empty(), "the ext4 superblock must be gone");
}

#[test]
fn swap_signature_is_refused() {
    if !have("mkswap") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "swap.img", SIZE);
    let status = Command::new("mkswap")
        .arg("-q")
        .arg(&path)
        .status()
        .expect("run mkswap");
    assert!(status.success());
    let err = claim(&SysRoot::host(), &path, pool(), false).expect_err("swap must be refused");
    assert!(err.to_string().contains("has a swap signature"), "{err}");
    claim(&SysRoot::host(), &path, pool(), true).expect("forced claim");
}

#[test]
fn another_pools_label_is_refused_and_taken_with_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "other.img", SIZE);
    let theirs = pool();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    label::write_to(&file, SIZE, &Label::new(theirs, pool(), SIZE)).expect("label");
    drop(file);
    let root = SysRoot::host();
    let ours = pool();

    let err = claim(&root, &path, ours, false).expect_err("other pool's device");
    assert!(err
        .to_string()
        .contains(&format!("carries the label of coreblk pool {theirs}")));
    assert_eq!(
        reasons(err),
        [RefuseReason::OtherPoolLabel { pool_uuid: theirs }]
    );

    let device = claim(&root, &path, ours, true).expect("forced claim");
    assert_eq!(device.label().pool_uuid, ours);
    assert!(device.newly_labelled());
}

#[test]
fn a_label_damaged_in_both_copies_is_unknown_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "damaged.img", SIZE);
    let root = SysRoot::host();
    claim(&root, &path, pool(), false)
        .expect("claim")
        .release(false)
        .expect("release");
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    let backup = label::backup_offset(SIZE).expect("backup offset");
    file.write_all_at(&[0xee; 8], 64).expect("corrupt primary");
    file.write_all_at(&[0xee; 8], backup + 64)
        .expect("corrupt backup");
    drop(file);

    assert!(matches!(
        reasons(read_label(&path).expect_err("damaged"))[..],
        [RefuseReason::DamagedLabel]
    ));
    let err = claim(&root, &path, pool(), false).expect_err("damaged label");
    assert_eq!(reasons(err), [RefuseReason::DamagedLabel]);
    claim(&root, &path, pool(), true).expect("forced claim over a damaged label");
}

#[test]
fn one_damaged_copy_is_repaired_on_reclaim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "repair.img", SIZE);
    let root = SysRoot::host();
    let pool = pool();
    claim(&root, &path, pool, false)
        .expect("claim")
        .release(false)
        .expect("release");
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.write_all_at(&[0xee; 8], 64).expect("corrupt primary");
    drop(file);

    let device = claim(&root, &path, pool, false).expect("reclaim");
    assert_eq!(device.label().generation, 2);
    drop(device);
    let file = fs::File::open(&path).expect("open");
    assert!(matches!(
        label::read_from(&file, SIZE).expect("read"),
        label::LabelStatus::Valid { damaged: None, .. }
    ));
}

#[test]
fn too_small_missing_directory_and_ublk_are_refused_even_with_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = SysRoot::host();
    let small = image(dir.path(), "small.img", MIN_DEVICE_BYTES - 4096);
    let missing = dir.path().join("missing.img");

    let err = claim(&root, &small, pool(), true).expect_err("too small");
    assert!(err.to_string().contains("is too small"), "{err}");
    assert!(matches!(reasons(err)[..], [RefuseReason::TooSmall { .. }]));

    let err = claim(&root, &missing, pool(), true).expect_err("missing");
    assert_eq!(
        err.to_string(),
        format!(
            "device {} does not exist; refusing to claim it (check the path (coreblkd devices list shows the candidates))",
            missing.display()
        )
    );

    let err = claim(&root, dir.path(), pool(), true).expect_err("directory");
    assert_eq!(
        reasons(err),
        [RefuseReason::NotBlockOrFile {
            file_type: "directory".into()
        }]
    );

    // Never even looked at, whether or not it exists.
    let err = claim(&root, Path::new("/dev/ublkb4093"), pool(), true).expect_err("ublk");
    assert_eq!(reasons(err), [RefuseReason::UblkDevice]);
    let err = read_label(Path::new("/dev/ublkb4093")).expect_err("ublk");
    assert_eq!(reasons(err), [RefuseReason::UblkDevice]);
}

#[test]
fn without_blkid_nothing_is_claimed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "pool.img", SIZE);
    let prober = Prober::with_binary(dir.path().join("no-blkid-here"));
    let err = claim_with(&SysRoot::host(), &path, pool(), true, &prober).expect_err("no blkid");
    assert!(
        err.to_string()
            .contains("blkid (util-linux) not found: apt-get install util-linux"),
        "{err}"
    );
    assert_eq!(
        read_label(&path).expect("read"),
        None,
        "nothing was written"
    );
}

#[test]
fn listing_shows_files_labels_and_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = SysRoot::host();
    let blank = image(dir.path(), "blank.img", SIZE);
    let labelled = image(dir.path(), "labelled.img", SIZE);
    let pool = pool();
    claim(&root, &labelled, pool, false)
        .expect("claim")
        .release(false)
        .expect("release");

    let listed = discover::discover(&root, &[blank.clone(), labelled.clone()]);
    let blank_c = listed
        .iter()
        .find(|c| c.path == blank)
        .expect("blank listed");
    assert!(blank_c.claimable, "{:?}", blank_c.reasons);
    let labelled_c = listed
        .iter()
        .find(|c| c.path == labelled)
        .expect("labelled listed");
    assert_eq!(labelled_c.label.map(|l| l.pool_uuid), Some(pool));
    assert!(!labelled_c.claimable && labelled_c.force_allowed);

    let pools = discover::pools_in(&listed);
    assert!(pools
        .iter()
        .any(|p| p.pool_uuid == pool && p.devices.len() == 1));

    let table = render_table(&listed);
    assert!(table.starts_with("PATH"), "{table}");
    assert!(
        table.contains(&format!("carries the label of coreblk pool {pool}")),
        "{table}"
    );
    let json = serde_json::to_string(&listed).expect("json");
    assert!(json.contains("\"code\":\"other_pool_label\""), "{json}");
}
