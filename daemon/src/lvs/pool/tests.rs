//! Pool layout, create/import, superblock redundancy, and the volume table through the
//! journal, on real reactors and a malloc device.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::bdev::mem::MallocDevice;
use crate::bdev::BlockDevice;
use crate::lvs::journal::Journal;
use crate::reactor::{Errno, Reactor, ReactorConfig, ReactorSet};

const DEV: u64 = 96 << 20;

fn reactors() -> ReactorSet {
    ReactorSet::start(
        &[0],
        &ReactorConfig {
            pin: false,
            buf_count: 4,
            ..ReactorConfig::default()
        },
    )
    .expect("reactor")
}

fn meta(id: u32, name: &str, size_bytes: u64) -> VolumeMeta {
    let mut labels = BTreeMap::new();
    labels.insert(
        "csi.storage.k8s.io/pvc/name".to_string(),
        format!("pvc-{name}"),
    );
    labels.insert(
        "csi.storage.k8s.io/pvc/namespace".to_string(),
        "db".to_string(),
    );
    VolumeMeta {
        id,
        uuid: [u8::try_from(id).unwrap_or(0); 16],
        name: name.to_string(),
        size_bytes,
        labels,
        thick: id.is_multiple_of(2),
        written: false,
    }
}

/// Appends `records` as one commit through a journal on the reactor; returns when acked.
fn commit(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    sb: &Superblock,
    next_seq: u64,
    records: Vec<VolumeRecord>,
) -> Result<u64, Errno> {
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    let (dev, sb) = (Arc::clone(dev), sb.clone());
    set.remotes()[0]
        .call(move |rx: &Reactor| {
            let ch = dev.open_channel(rx).expect("channel");
            let j: Rc<Journal> = Journal::new(ch, sb, next_seq);
            let j2 = Rc::clone(&j);
            j.append(
                rx,
                records.iter().map(VolumeRecord::encode).collect(),
                Box::new(move |_rx: &Reactor, res: Result<u64, Errno>| {
                    let _ = tx.send(res.map(|_| j2.next_seq()));
                }),
            );
        })
        .expect("call");
    rx_done
        .recv_timeout(Duration::from_secs(10))
        .expect("acked")
}

#[test]
fn layout_fits_every_area_and_refuses_tiny_devices() {
    for size in [64u64 << 20, 1 << 30, 100 << 30, 4 << 40] {
        for cluster in [4096u32, 65536, 1 << 20, 4 << 20] {
            match layout(size, cluster, [1; 16], 7) {
                Ok(sb) => {
                    sb.check().expect("valid layout");
                    assert!(sb.clusters >= 16);
                    assert!(
                        sb.ckpt_bytes >= sb.clusters * 12,
                        "checkpoint holds every mapping"
                    );
                    assert_eq!(sb.data_offset % u64::from(cluster), 0);
                }
                Err(PoolError::TooSmall { .. }) => assert!(size < 1 << 30, "{size} with {cluster}"),
                Err(e) => panic!("{size}/{cluster}: {e}"),
            }
        }
    }
    let e = layout(8 << 20, 65536, [1; 16], 7).expect_err("8 MiB");
    assert!(e.to_string().contains("too small"), "{e}");
    assert!(matches!(
        layout(1 << 30, 3000, [1; 16], 7),
        Err(PoolError::ClusterSize(3000))
    ));
}

#[test]
fn a_created_pool_imports_and_its_volume_table_survives_reimport() {
    let set = reactors();
    let dev: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV).expect("malloc"));
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone()).expect("client");
    let sb = create(&client, DEFAULT_CLUSTER_BYTES, [9; 16]).expect("create");
    let first = import(&client).expect("import");
    assert_eq!(first.sb, sb);
    assert!(first.table.volumes.is_empty());
    assert_eq!(first.next_seq, 1);
    assert!(first.damaged_copy.is_none());

    let next = commit(
        &set,
        &dev,
        &sb,
        first.next_seq,
        vec![
            VolumeRecord::Create(meta(1, "a", 1 << 30)),
            VolumeRecord::Create(meta(2, "b", 2 << 30)),
            VolumeRecord::Create(meta(3, "c", 4096)),
            VolumeRecord::Written { id: 1 },
        ],
    )
    .expect("commit");
    let next = commit(
        &set,
        &dev,
        &sb,
        next,
        vec![
            VolumeRecord::Delete { id: 2 },
            VolumeRecord::Resize {
                id: 3,
                size_bytes: 1 << 20,
            },
        ],
    )
    .expect("commit");
    let again = import(&client).expect("reimport");
    assert_eq!(again.next_seq, next);
    let mut want = VolumeTable::default();
    let mut a = meta(1, "a", 1 << 30);
    a.written = true;
    want.volumes.insert(1, a);
    let mut c = meta(3, "c", 4096);
    c.size_bytes = 1 << 20;
    want.volumes.insert(3, c);
    want.id_floor = 4;
    assert_eq!(again.table, want);
    assert_eq!(
        again.table.next_id(),
        4,
        "ids are never reused (a snapshot's lineage may name a deleted volume)"
    );
}

#[test]
fn one_damaged_superblock_copy_is_tolerated_two_are_reported() {
    let set = reactors();
    let dev: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV).expect("malloc"));
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone()).expect("client");
    let sb = create(&client, DEFAULT_CLUSTER_BYTES, [9; 16]).expect("create");
    // Tear the newer copy (generation 2 lives in slot 0).
    let slot0 = sb.slot_offset(0);
    let mut b = client.read(slot0, BLOCK_BYTES).expect("read");
    b[200] ^= 0xff;
    client.write(slot0, &b, false).expect("write");
    let imp = import(&client).expect("import from the other copy");
    assert_eq!(imp.sb.generation, 1);
    assert!(matches!(
        imp.damaged_copy,
        Some(DecodeError::Checksum { .. })
    ));
    client
        .write(sb.slot_offset(1), &[0u8; BLOCK_BYTES], false)
        .expect("wipe");
    let e = import(&client).expect_err("no copy left");
    let msg = e.to_string();
    assert!(
        msg.contains("no valid pool superblock")
            && msg.contains("checksum")
            && msg.contains("bad magic"),
        "{msg}"
    );
}

#[test]
fn a_contradictory_record_is_refused_at_import_with_its_position() {
    let set = reactors();
    let dev: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV).expect("malloc"));
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone()).expect("client");
    let sb = create(&client, DEFAULT_CLUSTER_BYTES, [9; 16]).expect("create");
    commit(&set, &dev, &sb, 1, vec![VolumeRecord::Delete { id: 42 }]).expect("commit");
    let e = import(&client).expect_err("delete of an unknown volume");
    assert!(
        e.to_string().contains("block 1") && e.to_string().contains("unknown id 42"),
        "{e}"
    );
}

#[test]
fn volume_records_round_trip_and_limits_hold() {
    for r in [
        VolumeRecord::Create(meta(7, "vol-7", 10 << 30)),
        VolumeRecord::Delete { id: 7 },
        VolumeRecord::Resize {
            id: 7,
            size_bytes: 20 << 30,
        },
        VolumeRecord::Written { id: 7 },
    ] {
        assert_eq!(VolumeRecord::decode(&r.encode()).expect("decode"), Some(r));
    }
    // The largest allowed create still fits one journal block.
    let mut labels = BTreeMap::new();
    for i in 0..MAX_LABELS {
        labels.insert(format!("{i:0>96}"), "v".repeat(MAX_LABEL_BYTES));
    }
    let name = "n".repeat(MAX_NAME_BYTES);
    validate_meta(&name, &labels).expect("at the limits");
    let big = VolumeRecord::Create(VolumeMeta {
        labels: labels.clone(),
        name: name.clone(),
        ..meta(1, "x", 1)
    });
    assert!(big.encode().encoded_len() <= crate::lvs::format::JOURNAL_PAYLOAD_BYTES);
    assert!(validate_meta("", &labels).is_err());
    assert!(validate_meta(&"n".repeat(MAX_NAME_BYTES + 1), &BTreeMap::new()).is_err());
    labels.insert("one-too-many".into(), String::new());
    assert!(validate_meta("ok", &labels)
        .expect_err("refused")
        .contains("at most"));
    assert_eq!(
        VolumeRecord::decode(&Record::Map {
            vol: 1,
            lc: 2,
            pc: 3,
            epoch: 0
        })
        .expect("other owner"),
        None
    );
    let truncated = Record::Blob {
        kind: 3,
        body: vec![1, 2, 3],
    };
    assert!(VolumeRecord::decode(&truncated)
        .expect_err("refused")
        .contains("truncated"));
}
