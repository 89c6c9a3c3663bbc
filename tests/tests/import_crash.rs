//! The daemon-crash rule end to end: a chunked image import (8 MiB in 16 KiB chunks) is
//! interrupted by `kill -9` at random moments, exactly [`KILLS`] times, each while the
//! import runs: after a random number of the round's chunks (bounded so that the import
//! cannot finish first) plus a random delay of up to 0.5 ms, so the kill lands between
//! chunks or while they are written, recorded or acknowledged. Each round sends 1 to
//! [`MAX_WINDOW`] chunks ahead of their acks (lockstep, or batches the daemon records
//! and acknowledges together). Seed printed; `COREBLK_CRASH_SEED` replays one. The daemon
//! is restarted after each kill, and then every object is there (a bystander volume with
//! labels and data, and its snapshot, made before the first kill, read back byte for
//! byte), the import's volume is marked importing, and the import resumes from the last
//! acknowledged offset (or past it, when the kill cut off acks of chunks already
//! recorded; never past what was sent). The finished volume is byte-identical to the
//! image. The API refuses to export or snapshot a volume while it is importing, so the
//! acknowledged chunks are read back at the end: none is sent again (no resume starts
//! below the last ack), so the final byte-for-byte comparison reads every acknowledged
//! chunk as written before the kills that followed it.

mod common;

use std::time::{Duration, Instant};

use common::{rt, seeded, workdir, Daemon};
use coreblk_proto::v1 as pb;
use tonic::transport::Channel;

const IMAGE_BYTES: usize = 8 << 20;
const CHUNK_BYTES: usize = 16 << 10;
/// Most chunks a round sends ahead of their acks (each round picks 1 to this).
const MAX_WINDOW: usize = 8;
/// Interrupted imports per run.
const KILLS: usize = 10;
const NAME: &str = "crash-import";
/// A volume (and its snapshot) made before the kills that each restart must bring back.
const BYSTANDER: &str = "bystander";
const BYSTANDER_SNAPSHOT: &str = "bystander-s1";
const BYSTANDER_BYTES: usize = 256 << 10;

fn start_msg(resume: bool) -> pb::ImportImageRequest {
    pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
            pool: "default".into(),
            volume_name: NAME.into(),
            size_bytes: u64::try_from(IMAGE_BYTES).expect("fits"),
            resume,
            ..Default::default()
        })),
    }
}

/// Reads the first `len` bytes of `source` through `ExportImage`.
async fn export(
    ch: Channel,
    source: pb::export_image_request::Source,
    len: usize,
) -> Result<Vec<u8>, tonic::Status> {
    let mut out = vec![0u8; len];
    let mut resp = pb::images_client::ImagesClient::new(ch)
        .max_decoding_message_size(coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES)
        .export_image(pb::ExportImageRequest {
            source: Some(source),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(m) = resp.message().await? {
        if let Some(pb::export_image_response::Msg::Chunk(c)) = m.msg {
            let at = usize::try_from(c.offset_bytes).expect("fits");
            if c.zero {
                let n = usize::try_from(c.length_bytes).expect("fits");
                out[at..at + n].fill(0);
            } else {
                out[at..at + c.data.len()].copy_from_slice(&c.data);
            }
        }
    }
    Ok(out)
}

/// When a round kills the daemon.
#[derive(Clone, Copy)]
struct Kill {
    pid: libc::pid_t,
    /// After this many of the round's chunks went out...
    after_chunks: usize,
    /// ...and this long.
    delay: Duration,
}

/// What one import stream did.
struct Round {
    /// Where the daemon said to resume.
    resume_at: u64,
    /// The last acknowledged offset.
    acked: u64,
    /// The end of the last chunk sent.
    sent: u64,
    /// `finish` was answered.
    finished: bool,
    /// The thread that kills the daemon, if this round has one.
    killer: Option<std::thread::JoinHandle<()>>,
}

/// One import stream from where the daemon says to resume, with up to `window` chunks sent
/// ahead of their acks (1: lockstep; more: the daemon writes the chunks that have arrived
/// before it records and acknowledges them together). The stream ends when the daemon dies
/// (or, with `finish`, when the import is done).
async fn import_round(
    ch: Channel,
    image: &[u8],
    resume: bool,
    window: usize,
    kill: Option<Kill>,
) -> Round {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(start_msg(resume)).await.expect("send start");
    let mut resp = match pb::images_client::ImagesClient::new(ch)
        .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => panic!("import start: {e}"),
    };
    let Ok(Some(pb::ImportImageResponse {
        msg: Some(pb::import_image_response::Msg::Started(s)),
    })) = resp.message().await
    else {
        panic!("expected ImportStarted")
    };
    let resume_at = s.resume_offset_bytes;
    let mut round = Round {
        resume_at,
        acked: resume_at,
        sent: resume_at,
        finished: false,
        killer: None,
    };
    let mut chunks_sent = 0usize;
    // Ends of the chunks sent and not yet acknowledged, oldest first.
    let mut in_flight = std::collections::VecDeque::new();
    let mut offset = usize::try_from(resume_at).expect("fits");
    let mut finish_sent = false;
    loop {
        let next = (!finish_sent && in_flight.len() < window).then(|| {
            if offset < image.len() {
                pb::import_image_request::Msg::Chunk(pb::ImageChunk {
                    offset_bytes: u64::try_from(offset).expect("fits"),
                    data: image[offset..offset + CHUNK_BYTES].to_vec(),
                    zero: false,
                    length_bytes: 0,
                })
            } else {
                pb::import_image_request::Msg::Finish(pb::ImportFinish {
                    expected_size_bytes: u64::try_from(image.len()).expect("fits"),
                })
            }
        });
        let sending = next.is_some();
        tokio::select! {
            biased;
            answer = resp.message() => match answer {
                Ok(Some(pb::ImportImageResponse {
                    msg: Some(pb::import_image_response::Msg::Ack(a)),
                })) => {
                    let end = in_flight.pop_front().expect("an ack for a chunk sent");
                    assert_eq!(a.durable_offset_bytes, end, "an ack names its chunk's end");
                    round.acked = end;
                }
                Ok(Some(pb::ImportImageResponse {
                    msg: Some(pb::import_image_response::Msg::Finished(_)),
                })) => {
                    assert!(finish_sent && in_flight.is_empty(), "finished early");
                    round.finished = true;
                    return round;
                }
                Ok(other) => panic!("expected an ack: {other:?}"),
                // The daemon died under the stream.
                Err(_) => return round,
            },
            ok = tx.send(pb::ImportImageRequest { msg: next }), if sending => {
                if ok.is_err() {
                    return round;
                }
                if offset >= image.len() {
                    finish_sent = true;
                    continue;
                }
                offset += CHUNK_BYTES;
                let end = u64::try_from(offset).expect("fits");
                in_flight.push_back(end);
                round.sent = end;
                chunks_sent += 1;
                // The kill comes at a random moment after this round's `after_chunks`-th
                // chunk went out: between chunks, or while they are written, recorded or
                // acknowledged.
                if let Some(k) =
                    kill.filter(|k| round.killer.is_none() && chunks_sent == k.after_chunks)
                {
                    round.killer = Some(std::thread::spawn(move || {
                        std::thread::sleep(k.delay);
                        // The pid is the test's child, which it reaps only after joining
                        // this thread, so it names no other process.
                        // SAFETY: kill takes plain integers, and the pid is our child (above).
                        unsafe { libc::kill(k.pid, libc::SIGKILL) };
                    }));
                }
            }
        }
    }
}

/// Makes the bystander: a labelled volume with data (imported whole), and a snapshot of
/// it; their UUIDs.
async fn make_bystander(ch: Channel, data: &[u8]) -> (String, String) {
    let msgs = vec![
        pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                pool: "default".into(),
                volume_name: BYSTANDER.into(),
                size_bytes: u64::try_from(data.len()).expect("fits"),
                labels: [("app".to_owned(), "db".to_owned())].into(),
                ..Default::default()
            })),
        },
        pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
                offset_bytes: 0,
                data: data.to_vec(),
                zero: false,
                length_bytes: 0,
            })),
        },
        pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
                expected_size_bytes: u64::try_from(data.len()).expect("fits"),
            })),
        },
    ];
    let mut resp = pb::images_client::ImagesClient::new(ch.clone())
        .import_image(tokio_stream::iter(msgs))
        .await
        .expect("import the bystander")
        .into_inner();
    let mut volume = None;
    while let Some(m) = resp.message().await.expect("bystander import runs") {
        if let Some(pb::import_image_response::Msg::Finished(v)) = m.msg {
            volume = Some(v);
        }
    }
    let volume = volume.expect("the bystander import finished");
    let snap = pb::snapshots_client::SnapshotsClient::new(ch)
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: BYSTANDER.into(),
            name: BYSTANDER_SNAPSHOT.into(),
            ..Default::default()
        })
        .await
        .expect("snapshot the bystander")
        .into_inner();
    (volume.uuid, snap.uuid)
}

/// After a restart: the bystander volume and its snapshot are there as made, byte for
/// byte, and the pool holds exactly the two volumes and one snapshot.
async fn check_bystander(ch: Channel, uuids: &(String, String), data: &[u8], kill: usize) {
    let v = pb::volumes_client::VolumesClient::new(ch.clone())
        .get_volume(pb::GetVolumeRequest {
            volume: BYSTANDER.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("kill {kill}: the bystander volume is gone: {e}"))
        .into_inner();
    assert_eq!(v.uuid, uuids.0, "kill {kill}");
    assert_eq!(v.state(), pb::VolumeState::Ready, "kill {kill}");
    assert_eq!(v.size_bytes, u64::try_from(data.len()).expect("fits"));
    assert_eq!(
        v.labels.get("app").map(String::as_str),
        Some("db"),
        "kill {kill}"
    );
    let s = pb::snapshots_client::SnapshotsClient::new(ch.clone())
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot: BYSTANDER_SNAPSHOT.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("kill {kill}: the bystander snapshot is gone: {e}"))
        .into_inner();
    assert_eq!(s.uuid, uuids.1, "kill {kill}");
    let pool = pb::pools_client::PoolsClient::new(ch.clone())
        .get_pool(pb::GetPoolRequest {
            pool: "default".into(),
        })
        .await
        .expect("the default pool")
        .into_inner();
    assert_eq!(
        (pool.volume_count, pool.snapshot_count),
        (2, 1),
        "kill {kill}"
    );
    for source in [
        pb::export_image_request::Source::Volume(BYSTANDER.into()),
        pb::export_image_request::Source::Snapshot(BYSTANDER_SNAPSHOT.into()),
    ] {
        let got = export(ch.clone(), source.clone(), data.len())
            .await
            .unwrap_or_else(|e| panic!("kill {kill}: export {source:?}: {e}"));
        assert!(
            got == data,
            "kill {kill}: {source:?} differs from what was imported"
        );
    }
}

#[test]
fn kill_9_during_a_chunked_import_loses_no_acknowledged_chunk_and_resumes() {
    let seed: u64 = std::env::var("COREBLK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 7919 + 1);
    eprintln!("import crash: COREBLK_CRASH_SEED={seed}");
    let image = seeded(IMAGE_BYTES, seed);
    let bystander = seeded(BYSTANDER_BYTES, seed ^ 0x5eed);
    let dir = workdir();
    let started = Instant::now();
    let (mut acked, mut sent) = (0u64, 0u64);
    let mut kills = 0usize;
    let mut bystander_uuids = None;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    loop {
        let mut daemon = Daemon::start(dir.path());
        let pid = libc::pid_t::try_from(daemon.child.id()).expect("pid fits");
        // Each of the kills still to come gets at most an equal share of the chunks not
        // yet acknowledged, so none comes after the import finished.
        let kill = (kills < KILLS).then(|| {
            let left = (IMAGE_BYTES - usize::try_from(acked).expect("fits")) / CHUNK_BYTES;
            // Half an equal share of what is left, so that what the window and the delay
            // let through after the chosen chunk cannot finish the import first.
            let share = (left / (2 * (KILLS - kills + 1))).max(1);
            Kill {
                pid,
                after_chunks: 1 + usize::try_from(next()).unwrap_or(0) % share,
                delay: Duration::from_micros(next() % 500),
            }
        });
        let window = 1 + usize::try_from(next()).unwrap_or(0) % MAX_WINDOW;
        let round = rt().block_on(async {
            let ch = daemon.channel().await;
            match &bystander_uuids {
                None => bystander_uuids = Some(make_bystander(ch.clone(), &bystander).await),
                Some(uuids) => check_bystander(ch.clone(), uuids, &bystander, kills).await,
            }
            if kills > 0 {
                // The volume survived, still importing (an importing volume cannot be
                // exported or snapshotted: its acknowledged chunks are checked at the end,
                // see the module comment).
                let v = pb::volumes_client::VolumesClient::new(ch.clone())
                    .get_volume(pb::GetVolumeRequest {
                        volume: NAME.into(),
                    })
                    .await
                    .expect("the volume survives the kill")
                    .into_inner();
                assert_eq!(v.state(), pb::VolumeState::Importing);
            }
            import_round(ch, &image, kills > 0 || acked > 0, window, kill).await
        });
        // Never below the last ack (nothing acknowledged is lost), never past what was
        // sent; above the ack when the kill cut off the ack of a recorded chunk.
        assert!(
            round.resume_at >= acked && round.resume_at <= sent,
            "kill {kills}: the import resumed at {}, the last ack was {acked}, {sent} bytes were sent (seed {seed})",
            round.resume_at
        );
        assert!(round.acked >= round.resume_at);
        acked = round.acked;
        sent = round.sent;
        eprintln!(
            "import crash: round {kills} (window {window}): resumed at {}, acknowledged up to {acked}, sent up to {sent}",
            round.resume_at
        );
        if let Some(k) = round.killer {
            k.join().expect("killer");
            let _ = daemon.child.wait();
            assert!(
                !round.finished,
                "kill {kills} came after the import finished (seed {seed})"
            );
            kills += 1;
            continue;
        }
        assert!(kill.is_none(), "round {kills} sent no chunk to kill after");
        assert!(
            round.finished,
            "the last round did not finish (seed {seed})"
        );
        rt().block_on(async {
            let ch = daemon.channel().await;
            let uuids = bystander_uuids.as_ref().expect("made in the first round");
            check_bystander(ch.clone(), uuids, &bystander, kills).await;
            let data = export(
                ch,
                pb::export_image_request::Source::Volume(NAME.into()),
                IMAGE_BYTES,
            )
            .await
            .expect("export");
            assert!(
                data == image,
                "the resumed import is not byte-identical (seed {seed})"
            );
        });
        assert!(daemon.alive());
        assert!(daemon.stop_with(libc::SIGTERM).success());
        break;
    }
    eprintln!("import crash: {kills} kills in {:?}", started.elapsed());
    assert_eq!(kills, KILLS, "seed {seed}");
}
