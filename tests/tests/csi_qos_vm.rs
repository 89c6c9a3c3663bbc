//! Per-volume QoS through CSI on a real ublk device, measured by fio (issue 15): a volume
//! from a class with `maxIops`, staged and published in block mode as kubelet does, read
//! by fio at a queue depth that would go far faster; then ControllerModifyVolume on the
//! node plugin raises the cap and fio, on the same published device (no unstage, no
//! remount), sees the new rate.
//!
//! Needs `/dev/ublk-control`, a device for the pool (`COREBLK_CSI_VM_DEVICE`) and fio:
//! `scripts/vm/guest/csi-qos-test` in the VM harness. Elsewhere it says it was skipped and
//! checks nothing. Under TCG the rates are kept small (the guest's CPU must exceed them
//! easily); the tolerance is ±10% (the host bench checks ±5% on a pinned core).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{rt, wait_for, Csi, Daemon, START_DEADLINE};
use coreblk_proto::csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume};

const NODE: &str = "vm-node";
const DEVICE_ENV: &str = "COREBLK_CSI_VM_DEVICE";
/// The cap from the class, and the one a VolumeAttributesClass change asks for.
const CAP_FIRST: f64 = 150.0;
const CAP_RAISED: f64 = 450.0;

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

fn start_daemon(dir: &Path, device: &str) -> Daemon {
    let socket = dir.join("api.sock");
    let log = dir.join("coreblkd.log");
    let child = Command::new(coreblk_tests::bin("coreblkd"))
        .args([
            "--device",
            device,
            "--cores",
            "0",
            "--metrics-address",
            "off",
        ])
        .arg("--var-dir")
        .arg(dir.join("var"))
        .arg("--socket")
        .arg(&socket)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn coreblkd");
    let d = Daemon { child, socket, log };
    let ready = wait_for(START_DEADLINE * 4, || {
        std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
            && d.log_text().contains("pool import finished")
    });
    assert!(ready, "coreblkd did not start:\n{}", d.log_text());
    d
}

/// fio 4 KiB random reads on `dev` at queue depth 16 for `secs`: the IOPS it measured.
fn fio_iops(dev: &str, secs: u32) -> f64 {
    let out = Command::new("fio")
        .args([
            "--name=qos",
            &format!("--filename={dev}"),
            "--direct=1",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=libaio",
            "--iodepth=16",
            "--time_based",
            &format!("--runtime={secs}"),
            "--ramp_time=1",
            "--output-format=json",
        ])
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    j["jobs"][0]["read"]["iops"].as_f64().expect("read iops")
}

fn within(got: f64, want: f64, pct: f64) -> bool {
    (got - want).abs() / want * 100.0 <= pct
}

#[test]
fn qos_caps_a_published_block_volume_and_a_modify_reaches_fio() {
    let device = std::env::var(DEVICE_ENV).unwrap_or_default();
    let fio = Command::new("fio").arg("--version").output().is_ok();
    if !Path::new("/dev/ublk-control").exists() || device.is_empty() || !fio {
        eprintln!(
            "SKIPPED: needs /dev/ublk-control, {DEVICE_ENV} (a device for the pool) and fio: \
             run scripts/vm/guest/csi-qos-test in the VM harness; nothing was checked"
        );
        return;
    }
    let dir = match std::env::var_os("COREBLK_CSI_VM_WORK") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let daemon = start_daemon(dir.path(), &device);
    let plugin = Csi::node_with(dir.path(), "csi", &daemon, NODE, &["--kubelet-dir", &k]);
    let staging = format!("{k}/plugins/kubernetes.io/csi/csi.coreblk.io/pv-qos/globalmount");
    let target = format!("{k}/pods/pod-1/volumes/kubernetes.io~csi/pv-qos/mount");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt().block_on(async {
            let ch = plugin.channel().await;
            let mut ctl = csi::controller_client::ControllerClient::new(ch.clone());
            let mut node = csi::node_client::NodeClient::new(ch);
            eprintln!("... create_volume pvc-qos maxIops={CAP_FIRST}");
            let id = ctl
                .create_volume(csi::CreateVolumeRequest {
                    name: "pvc-qos".to_owned(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 64 << 20,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![block_cap()],
                    parameters: HashMap::from([("maxIops".to_owned(), format!("{CAP_FIRST}"))]),
                    ..Default::default()
                })
                .await
                .expect("CreateVolume")
                .into_inner()
                .volume
                .expect("volume")
                .volume_id;
            eprintln!("... node_stage_volume + node_publish_volume (block)");
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await
            .expect("NodePublishVolume");
            let first = fio_iops(&target, 6);
            eprintln!("fio at maxIops {CAP_FIRST}: {first:.1} IOPS");
            assert!(
                within(first, CAP_FIRST, 10.0),
                "fio saw {first:.1} IOPS under a cap of {CAP_FIRST}"
            );
            eprintln!("PASS: fio sees the class's cap ({first:.1} IOPS at maxIops {CAP_FIRST})");
            eprintln!("... controller_modify_volume maxIops={CAP_RAISED}");
            ctl.controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
                mutable_parameters: HashMap::from([(
                    "maxIops".to_owned(),
                    format!("{CAP_RAISED}"),
                )]),
            })
            .await
            .expect("ControllerModifyVolume");
            let raised = fio_iops(&target, 6);
            eprintln!("fio at maxIops {CAP_RAISED}: {raised:.1} IOPS");
            assert!(
                within(raised, CAP_RAISED, 10.0),
                "fio saw {raised:.1} IOPS after raising the cap to {CAP_RAISED}"
            );
            eprintln!(
                "PASS: after ControllerModifyVolume fio on the same published device sees \
                 {raised:.1} IOPS at maxIops {CAP_RAISED} (no unstage, no remount)"
            );
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.clone(),
            })
            .await
            .expect("NodeUnpublishVolume");
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .await
            .expect("NodeUnstageVolume");
            eprintln!("PASS: unpublished and unstaged");
        });
    }));
    if let Err(e) = result {
        // Unmount what is left while the daemon still serves it (else its IO, and the
        // guest's shutdown, would wait forever).
        for p in [&target, &staging] {
            let _ = Command::new("umount").arg(p).status();
        }
        eprintln!(
            "--- coreblk-csi log:\n{}\n--- coreblkd log (end):\n{}",
            plugin.log_text(),
            daemon.log_text()
        );
        std::panic::resume_unwind(e);
    }
}
