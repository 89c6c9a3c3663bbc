//! The daemon-crash rule end to end: a chunked image import (8 MiB in 32 KiB chunks) is
//! interrupted by `kill -9` at random moments (at least [`KILLS`] times; seed printed,
//! `COREBLK_CRASH_SEED` replays one), the daemon restarted each time. After every restart
//! the volume is there, marked importing; the import resumes from the last acknowledged
//! offset (or past it, when the kill cut off the ack of a chunk already recorded; never
//! past what was sent); and the finished volume is byte-identical to the image. The API
//! refuses to export or snapshot a volume while it is importing, so the acknowledged
//! chunks are read back at the end: each is sent once (no resume starts below the last
//! ack), so the final byte-for-byte comparison reads every acknowledged
//! chunk as written before the kills that followed it.

mod common;

use std::time::{Duration, Instant};

use common::{rt, seeded, workdir, Daemon};
use coreblk_proto::v1 as pb;
use tonic::transport::Channel;

const IMAGE_BYTES: usize = 8 << 20;
const CHUNK_BYTES: usize = 32 << 10;
/// Interrupted imports per run.
const KILLS: usize = 10;
const NAME: &str = "crash-import";

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

/// Reads the volume (or the first `len` bytes of it) through `ExportImage`.
async fn export(ch: Channel) -> Result<Vec<u8>, tonic::Status> {
    let mut out = vec![0u8; IMAGE_BYTES];
    let mut resp = pb::images_client::ImagesClient::new(ch)
        .max_decoding_message_size(coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES)
        .export_image(pb::ExportImageRequest {
            source: Some(pb::export_image_request::Source::Volume(NAME.into())),
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

/// One import stream from where the daemon says to resume: (the resume offset, the last
/// acknowledged offset, whether `finish` was answered). The stream ends when the daemon
/// dies (or, with `finish`, when the import is done).
async fn import_round(
    ch: Channel,
    image: &[u8],
    resume: bool,
    kill: Option<(libc::pid_t, Duration)>,
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
    // The kill comes at a random moment of the stream: between chunks, or while one is
    // being written or acknowledged.
    let killer = kill.map(|(pid, delay)| {
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill takes plain integers; the pid is the test's child, which it
            // reaps only after joining this thread, so it names no other process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    });
    let mut acked = resume_at;
    let mut sent = resume_at;
    let mut offset = usize::try_from(resume_at).expect("fits");
    loop {
        if offset >= image.len() {
            let _ = tx
                .send(pb::ImportImageRequest {
                    msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
                        expected_size_bytes: u64::try_from(image.len()).expect("fits"),
                    })),
                })
                .await;
            let finished = matches!(
                resp.message().await,
                Ok(Some(pb::ImportImageResponse {
                    msg: Some(pb::import_image_response::Msg::Finished(_))
                }))
            );
            return Round {
                resume_at,
                acked,
                sent,
                finished,
                killer,
            };
        }
        let chunk = pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
                offset_bytes: u64::try_from(offset).expect("fits"),
                data: image[offset..offset + CHUNK_BYTES].to_vec(),
                zero: false,
                length_bytes: 0,
            })),
        };
        sent = u64::try_from(offset + CHUNK_BYTES).expect("fits");
        if tx.send(chunk).await.is_err() {
            return Round {
                resume_at,
                acked,
                sent,
                finished: false,
                killer,
            };
        }
        match resp.message().await {
            Ok(Some(pb::ImportImageResponse {
                msg: Some(pb::import_image_response::Msg::Ack(a)),
            })) => {
                let end = u64::try_from(offset + CHUNK_BYTES).expect("fits");
                assert_eq!(a.durable_offset_bytes, end, "an ack names its chunk's end");
                acked = end;
                offset += CHUNK_BYTES;
            }
            Ok(other) => panic!("expected an ack: {other:?}"),
            // The daemon died under the stream.
            Err(_) => {
                return Round {
                    resume_at,
                    acked,
                    sent,
                    finished: false,
                    killer,
                }
            }
        }
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
    let dir = workdir();
    let started = Instant::now();
    let (mut acked, mut sent) = (0u64, 0u64);
    let mut kills = 0usize;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    loop {
        let mut daemon = Daemon::start(dir.path());
        let kill_now = kills < KILLS;
        let delay = Duration::from_millis(1 + next() % 25);
        let pid = libc::pid_t::try_from(daemon.child.id()).expect("pid fits");
        let round = rt().block_on(async {
            let ch = daemon.channel().await;
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
            import_round(
                ch,
                &image,
                kills > 0 || acked > 0,
                kill_now.then_some((pid, delay)),
            )
            .await
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
        let finished = round.finished;
        eprintln!(
            "import crash: round {kills}: resumed at {}, acknowledged up to {acked}",
            round.resume_at
        );
        if let Some(k) = round.killer {
            k.join().expect("killer");
            let _ = daemon.child.wait();
            if finished {
                // The kill came after the import finished: start over is not needed, but
                // the kill still counts as a restart of a finished import.
                drop(daemon);
                break;
            }
            kills += 1;
            continue;
        }
        assert!(finished, "the last round did not finish (seed {seed})");
        let data = rt().block_on(async { export(daemon.channel().await).await.expect("export") });
        assert!(
            data == image,
            "the resumed import is not byte-identical (seed {seed})"
        );
        assert!(daemon.alive());
        assert!(daemon.stop_with(libc::SIGTERM).success());
        break;
    }
    eprintln!("import crash: {kills} kills in {:?}", started.elapsed());
    assert!(
        kills >= KILLS,
        "only {kills} kills before the import finished (seed {seed})"
    );
}
