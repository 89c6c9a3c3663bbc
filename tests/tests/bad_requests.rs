//! Requests no well-behaved client sends, and calls made before the daemon is ready,
//! against a live `coreblkd`:
//!
//! - gRPC frames written by hand over raw HTTP/2 — a body that is not protobuf, a frame
//!   cut off before its declared length, a declared length far above the limit, a
//!   compressed frame nobody negotiated, no message at all, an unknown method, an import
//!   stream whose second frame is cut off: each is answered with a gRPC status (never a
//!   hang, never a dropped connection without one), and the daemon keeps serving with no
//!   panic in its log. (tonic decodes requests before the services see them and answers
//!   what it cannot decode INTERNAL, a message too long RESOURCE_EXHAUSTED);
//! - the start-up window: until the pools are imported the API answers UNAVAILABLE with a
//!   message that says so (the import is held back by the testing build's
//!   `COREBLK_TEST_IMPORT_DELAY_MS`, since it otherwise takes milliseconds), the node
//!   reports itself starting, and then serves.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{rt, wait_for, workdir, Daemon, START_DEADLINE};
use coreblk_proto::v1 as pb;
use prost::Message;

/// Longest one raw call may take before it counts as a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC length-prefixed frame: the compressed flag, a declared length, then `payload`
/// (which may be shorter or longer than declared).
fn frame(compressed: bool, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&declared_len.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A well-formed frame of `msg`.
fn message_frame(msg: &impl Message) -> Vec<u8> {
    let payload = msg.encode_to_vec();
    frame(
        false,
        u32::try_from(payload.len()).expect("small"),
        &payload,
    )
}

/// What came back for one raw call.
#[derive(Debug)]
struct Answer {
    http_status: u16,
    grpc_status: Option<i32>,
    grpc_message: String,
}

fn header_str(h: &http::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// POSTs `body` to `path` on its own HTTP/2 connection over the API socket, ends the
/// request stream, and reads the answer: `grpc-status` from the headers (a trailers-only
/// answer) or from the trailers.
async fn raw_call(socket: &std::path::Path, path: &str, body: Vec<u8>) -> Answer {
    let io = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.expect("h2 ready");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (resp, mut send) = client.send_request(req, false).expect("send request");
    send.send_data(Bytes::from(body), true).expect("send body");
    let resp = resp.await.expect("response headers");
    let (parts, mut body) = resp.into_parts();
    let mut answer = Answer {
        http_status: parts.status.as_u16(),
        grpc_status: header_str(&parts.headers, "grpc-status").and_then(|s| s.parse().ok()),
        grpc_message: header_str(&parts.headers, "grpc-message").unwrap_or_default(),
    };
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if let Some(t) = body.trailers().await.expect("trailers") {
        if answer.grpc_status.is_none() {
            answer.grpc_status = header_str(&t, "grpc-status").and_then(|s| s.parse().ok());
            answer.grpc_message = header_str(&t, "grpc-message").unwrap_or_default();
        }
    }
    drop(client);
    conn.abort();
    answer
}

#[test]
fn malformed_and_truncated_requests_get_a_status_and_the_daemon_survives() {
    let dir = workdir();
    let mut daemon = Daemon::start(dir.path());
    let socket = daemon.socket.clone();
    const GET_VOLUME: &str = "/coreblk.v1.Volumes/GetVolume";
    const IMPORT: &str = "/coreblk.v1.Images/ImportImage";
    let start = message_frame(&pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
            pool: "default".into(),
            volume_name: "raw-import".into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })),
    });
    let chunk = message_frame(&pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
            offset_bytes: 0,
            data: vec![7; 8192],
            zero: false,
            length_bytes: 0,
        })),
    });
    let mut cut_import = start.clone();
    cut_import.extend_from_slice(&chunk[..chunk.len() / 2]);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        // Not protobuf: field 0 is invalid, wire type 7 does not exist.
        (
            "garbage body",
            GET_VOLUME,
            frame(false, 3, &[0xff, 0xff, 0xff]),
        ),
        // A string field whose length runs past the message.
        ("bad length", GET_VOLUME, frame(false, 2, &[0x0a, 0x7f])),
        // Declares 100 bytes, sends 10, ends the stream.
        ("cut-off frame", GET_VOLUME, frame(false, 100, &[0x0a; 10])),
        // Half a frame header.
        ("cut-off header", GET_VOLUME, vec![0, 0, 0]),
        ("no message", GET_VOLUME, Vec::new()),
        ("huge length", GET_VOLUME, frame(false, u32::MAX, &[0; 16])),
        ("compressed", GET_VOLUME, frame(true, 4, &[1, 2, 3, 4])),
        (
            "unknown method",
            "/coreblk.v1.Volumes/NoSuchCall",
            frame(false, 0, &[]),
        ),
        ("unknown service", "/x.Y/Z", frame(false, 0, &[])),
        ("import cut off in its second frame", IMPORT, cut_import),
    ];
    let rt = rt();
    // The raw client itself: a well-formed request gets the daemon's own answer.
    let sane = rt.block_on(raw_call(
        &socket,
        GET_VOLUME,
        message_frame(&pb::GetVolumeRequest {
            volume: "nosuch".into(),
        }),
    ));
    assert_eq!(sane.http_status, 200, "{sane:?}");
    assert_eq!(
        sane.grpc_status,
        Some(tonic::Code::NotFound as i32),
        "{sane:?}"
    );
    assert!(sane.grpc_message.contains("nosuch"), "{sane:?}");
    for (what, path, body) in cases {
        let answer = rt
            .block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, raw_call(&socket, path, body)).await
            })
            .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"));
        eprintln!("{what}: {answer:?}");
        assert_eq!(answer.http_status, 200, "{what}: {answer:?}");
        let code = answer
            .grpc_status
            .unwrap_or_else(|| panic!("{what}: no grpc-status: {answer:?}"));
        assert!(
            (1..=16).contains(&code) && code != tonic::Code::Unknown as i32,
            "{what}: not a proper error status: {answer:?}"
        );
        // tonic answers an unknown path UNIMPLEMENTED without words; the code says it all.
        assert!(
            !answer.grpc_message.is_empty() || code == tonic::Code::Unimplemented as i32,
            "{what}: a status without a message: {answer:?}"
        );
        assert!(
            daemon.alive(),
            "{what} killed coreblkd:\n{}",
            daemon.log_text()
        );
    }
    // Still serving, nothing panicked; the cut-off import left its volume marked
    // importing (or none at all), and it is removable.
    rt.block_on(async {
        let ch = daemon.channel().await;
        let info = pb::node_client::NodeClient::new(ch.clone())
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .expect("node info after the bad requests")
            .into_inner();
        assert_eq!(info.state(), pb::DaemonState::Serving);
        let mut volumes = pb::volumes_client::VolumesClient::new(ch);
        match volumes
            .get_volume(pb::GetVolumeRequest {
                volume: "raw-import".into(),
            })
            .await
        {
            Ok(v) => {
                assert_eq!(v.into_inner().state(), pb::VolumeState::Importing);
                // Its session closes once the server has seen the stream end.
                let end = Instant::now() + Duration::from_secs(10);
                loop {
                    match volumes
                        .delete_volume(pb::DeleteVolumeRequest {
                            volume: "raw-import".into(),
                        })
                        .await
                    {
                        Ok(_) => break,
                        Err(e)
                            if e.code() == tonic::Code::FailedPrecondition
                                && Instant::now() < end =>
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("deleting the cut-off import: {e}"),
                    }
                }
            }
            Err(e) => assert_eq!(e.code(), tonic::Code::NotFound, "{e}"),
        }
    });
    assert!(
        !daemon.log_text().contains("panicked"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

#[test]
fn the_api_answers_unavailable_until_the_pools_are_imported() {
    // Long enough to make the calls below on a loaded machine; the test waits it out.
    const DELAY_MS: &str = "4000";
    let dir = workdir();
    let daemon = Daemon::spawn(dir.path(), &[("COREBLK_TEST_IMPORT_DELAY_MS", DELAY_MS)]);
    assert!(
        wait_for(START_DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok()
                && daemon.log_text().contains("serving; stop with SIGTERM")
        }),
        "coreblkd did not start serving:\n{}",
        daemon.log_text()
    );
    // The import runs as its own task: its first line may follow "serving" by a moment.
    assert!(
        wait_for(Duration::from_secs(3), || daemon
            .log_text()
            .contains("the pool import waits first")),
        "coreblkd was not built with the `testing` feature (build the workspace with \
         --features coreblk-daemon/testing):\n{}",
        daemon.log_text()
    );
    let rt = rt();
    rt.block_on(async {
        let ch = daemon.channel().await;
        let info = pb::node_client::NodeClient::new(ch.clone())
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .expect("node info answers while starting")
            .into_inner();
        assert_eq!(info.state(), pb::DaemonState::Starting, "{info:?}");
        let unavailable = |what: &str, e: tonic::Status| {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{what}: {e:?}");
            assert!(
                e.message().contains("importing its pools") && e.message().contains("retry"),
                "{what}: {}",
                e.message()
            );
        };
        let mut volumes = pb::volumes_client::VolumesClient::new(ch.clone());
        unavailable(
            "create volume",
            volumes
                .create_volume(pb::CreateVolumeRequest {
                    pool: "default".into(),
                    name: "early".into(),
                    size_bytes: 1 << 20,
                    ..Default::default()
                })
                .await
                .expect_err("not ready"),
        );
        unavailable(
            "list volumes",
            volumes
                .list_volumes(pb::ListVolumesRequest::default())
                .await
                .expect_err("not ready"),
        );
        unavailable(
            "create pool",
            pb::pools_client::PoolsClient::new(ch.clone())
                .create_pool(pb::CreatePoolRequest {
                    name: "p".into(),
                    devices: vec!["/nonexistent".into()],
                    ..Default::default()
                })
                .await
                .expect_err("not ready"),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                pool: "default".into(),
                volume_name: "early-import".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        unavailable(
            "import image",
            pb::images_client::ImagesClient::new(ch.clone())
                .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect_err("not ready"),
        );
    });
    // The CLI shows the code and the daemon's words, and exits 1.
    let out = std::process::Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["volume", "list"])
        .output()
        .expect("run coreblk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("(UNAVAILABLE)") && err.contains("importing its pools"),
        "{err}"
    );
    // Then it serves.
    assert!(
        wait_for(START_DEADLINE, || daemon
            .log_text()
            .contains("pool import finished")),
        "{}",
        daemon.log_text()
    );
    rt.block_on(async {
        let ch = daemon.channel().await;
        pb::volumes_client::VolumesClient::new(ch)
            .create_volume(pb::CreateVolumeRequest {
                pool: "default".into(),
                name: "later".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            })
            .await
            .expect("served once the import finished");
    });
    assert!(daemon.stop_with(libc::SIGTERM).success());
}
