//! Stopping `coreblkd` with clients connected: an idle client connection (one that does
//! not even poll it, so never answers the server's GOAWAY PING) does not hold the stop
//! up, and a call in flight (an image import stream) keeps the daemon up until it ends,
//! while new calls get UNAVAILABLE.

mod common;

use std::time::{Duration, Instant};

use common::{rt, wait_for, workdir, Daemon};
use coreblk_proto::v1 as pb;

/// Well below the control plane's 30 s grace period for in-flight calls.
const PROMPT: Duration = Duration::from_secs(5);

fn sigterm(d: &Daemon) {
    let pid = libc::pid_t::try_from(d.child.id()).expect("pid fits");
    // The pid is our own child, not yet reaped (we hold its `Child` and have not
    // waited for it), so it cannot name another process.
    // SAFETY: kill takes plain integers, and the pid names only our child (above).
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
}

#[test]
fn an_idle_client_connection_does_not_hold_up_a_stop() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let socket = daemon.socket.clone();
    let rt = rt();
    let channel = rt.block_on(daemon.channel());
    rt.block_on(
        pb::node_client::NodeClient::new(channel.clone()).get_node_info(pb::GetNodeInfoRequest {}),
    )
    .expect("a call on the connection");
    // The channel stays open; its runtime is not polled from here on.
    let t0 = Instant::now();
    let status = daemon.stop_with(libc::SIGTERM);
    let took = t0.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < PROMPT, "the stop took {took:?}");
    assert!(!socket.exists(), "the socket was not removed");
    drop(channel);
}

#[test]
fn a_call_in_flight_keeps_the_daemon_up_until_it_ends() {
    let dir = workdir();
    let mut daemon = Daemon::start(dir.path());
    let rt = rt();
    let channel = rt.block_on(daemon.channel());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = rt.block_on(async {
        tx.send(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                pool: "default".into(),
                volume_name: "slow".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            })),
        })
        .await
        .expect("send start");
        let mut s = pb::images_client::ImagesClient::new(channel.clone())
            .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("import")
            .into_inner();
        let started = s.message().await.expect("started").expect("a message");
        assert!(matches!(
            started.msg,
            Some(pb::import_image_response::Msg::Started(_))
        ));
        s
    });
    sigterm(&daemon);
    let t0 = Instant::now();
    assert!(
        !wait_for(Duration::from_secs(1), || !daemon.alive()),
        "the daemon stopped with an import stream open:\n{}",
        daemon.log_text()
    );
    // A new call that would change something, while the stop drains the one in flight:
    // UNAVAILABLE at once, saying why (read-only calls such as node info still answer,
    // with state STOPPING).
    let create = |ch: tonic::transport::Channel| async move {
        tokio::time::timeout(
            PROMPT,
            pb::volumes_client::VolumesClient::new(ch).create_volume(pb::CreateVolumeRequest {
                pool: "default".into(),
                name: "late".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            }),
        )
        .await
        .expect("answered promptly")
    };
    let e = rt
        .block_on(create(channel.clone()))
        .expect_err("a create during a stop");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("stopping"), "{e}");
    // A new client is refused at connect (the CLI then says no daemon listens) or, if it
    // got through, answered UNAVAILABLE.
    rt.block_on(async {
        let connect = coreblk_daemon::control::client::connect(&daemon.socket);
        match tokio::time::timeout(PROMPT, connect)
            .await
            .expect("connecting during a stop did not hang")
        {
            Ok(ch) => {
                let e = create(ch).await.expect_err("a create on a new connection");
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
            }
            Err(e) => assert!(
                matches!(
                    e,
                    coreblk_daemon::control::client::ConnectError::NotListening { .. }
                        | coreblk_daemon::control::client::ConnectError::NoSocket { .. }
                ),
                "{e}"
            ),
        }
    });
    // The client ends its call: the stream closes, the daemon goes.
    drop(tx);
    rt.block_on(async { while let Ok(Some(_)) = responses.message().await {} });
    let mut status = None;
    assert!(
        wait_for(PROMPT, || {
            status = daemon.child.try_wait().expect("wait");
            status.is_some()
        }),
        "the daemon did not stop after the call ended:\n{}",
        daemon.log_text()
    );
    assert!(status.expect("exited").success());
    assert!(t0.elapsed() < PROMPT + Duration::from_secs(1));
}
