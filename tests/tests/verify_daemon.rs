//! `VerifyPool` / `coreblk pool verify` against a real `coreblkd`: the default pool
//! verifies clean again and again while an image is imported into it (the live checker
//! on a pool that keeps journalling), `check_data` is refused, and a pool whose checkpoint
//! was damaged while the daemon was stopped comes back FAILED and verify names the damage
//! (the CLI exits non-zero).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{rt, seeded, workdir, Daemon};
use coreblk_daemon::bdev::label;
use coreblk_daemon::lvs::format::{Superblock, NO_CHECKPOINT};
use coreblk_proto::v1 as pb;

const MIB: usize = 1 << 20;

fn coreblk(socket: &Path, args: &[&str]) -> Output {
    Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run coreblk")
}

async fn verify(
    channel: tonic::transport::Channel,
    pool: &str,
    check_data: bool,
) -> Result<pb::VerifyPoolResponse, tonic::Status> {
    pb::pools_client::PoolsClient::new(channel)
        .verify_pool(pb::VerifyPoolRequest {
            pool: pool.into(),
            check_data,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[test]
fn a_busy_pool_verifies_clean_and_check_data_is_refused() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let image = dir.path().join("image.raw");
    std::fs::write(&image, seeded(96 * MIB, 7)).expect("image");
    let mut import = Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["image", "import"])
        .arg(&image)
        .args(["--name", "busy"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn import");
    let rt = rt();
    let channel = rt.block_on(daemon.channel());
    let mut during_import = 0;
    let mut checks = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = matches!(import.try_wait(), Ok(None));
        let r = rt
            .block_on(verify(channel.clone(), "default", false))
            .expect("verify answers");
        assert!(
            r.ok && r.problems.is_empty(),
            "check {checks} (import running: {running}): {r:?}"
        );
        assert!(r.checked_bytes > 0, "{r:?}");
        checks += 1;
        if running && matches!(import.try_wait(), Ok(None)) {
            during_import += 1;
        }
        if !running {
            break;
        }
        assert!(Instant::now() < deadline, "the import did not finish");
    }
    let out = import.wait_with_output().expect("import");
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        during_import >= 2,
        "only {during_import} of {checks} checks ran wholly while the import wrote"
    );
    println!("{checks} checks, {during_import} of them during the import");

    // Data checksums do not exist: refused, not faked.
    let e = rt
        .block_on(verify(channel.clone(), "default", true))
        .expect_err("check_data refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("no checksums"), "{}", e.message());
    let e = rt
        .block_on(verify(channel, "no-such-pool", false))
        .expect_err("unknown pool");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    // The CLI: a table, JSON, status 0.
    let out = coreblk(&daemon.socket, &["pool", "verify", "default"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("ok ("), "{text}");
    let out = coreblk(&daemon.socket, &["-o", "json", "pool", "verify", "default"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checked_bytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    let out = coreblk(
        &daemon.socket,
        &["pool", "verify", "default", "--check-data"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no checksums"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The client's connections close with its runtime (an idle one would hold a stop up to
    // the grace period).
    drop(rt);
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

/// Flips one byte of the active checkpoint of the pool on the (stopped daemon's) file;
/// returns the area's name.
fn damage_checkpoint(file: &Path) -> &'static str {
    let mut bytes = std::fs::read(file).expect("read pool file");
    let region = label::data_region(bytes.len() as u64);
    let start = usize::try_from(region.start).expect("fits");
    let sb = (0..2u32)
        .filter_map(|copy| {
            let at = start + copy as usize * 4096;
            Superblock::decode(&bytes[at..at + 4096], copy).ok()
        })
        .max_by_key(|sb| sb.generation)
        .expect("a valid superblock");
    assert_ne!(sb.active_ckpt, NO_CHECKPOINT, "a clean stop checkpoints");
    let area = sb.region_start + sb.ckpt_offsets[sb.active_ckpt as usize];
    let at = usize::try_from(area).expect("fits") + 100;
    bytes[at] ^= 0x20;
    std::fs::write(file, &bytes).expect("write pool file");
    if sb.active_ckpt == 0 {
        "A"
    } else {
        "B"
    }
}

#[test]
fn damaged_metadata_fails_the_pool_and_verify_names_it() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let image = dir.path().join("image.raw");
    std::fs::write(&image, seeded(4 * MIB, 3)).expect("image");
    let out = coreblk(
        &daemon.socket,
        &[
            "image",
            "import",
            image.to_str().expect("utf-8"),
            "--name",
            "v",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.stop_with(libc::SIGTERM).success());

    let area = damage_checkpoint(&dir.path().join("var/default-pool.img"));
    let daemon = Daemon::start(dir.path());
    let rt = rt();
    let channel = rt.block_on(daemon.channel());
    let pool = rt
        .block_on(
            pb::pools_client::PoolsClient::new(channel.clone()).get_pool(pb::GetPoolRequest {
                pool: "default".into(),
            }),
        )
        .expect("get pool")
        .into_inner();
    assert_eq!(pool.state(), pb::PoolState::Failed, "{pool:?}");
    let r = rt
        .block_on(verify(channel, "default", false))
        .expect("verify answers");
    assert!(!r.ok, "{r:?}");
    let object = format!("damaged: checkpoint area {area}");
    assert!(
        r.problems.iter().any(|p| p.starts_with(&object)),
        "no problem names {object}: {r:?}"
    );
    let out = coreblk(&daemon.socket, &["pool", "verify", "default"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&object), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("problem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(rt);
    assert!(daemon.stop_with(libc::SIGTERM).success());
}
