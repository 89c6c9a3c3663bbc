//! A tiny HTTP/1.1 responder for `/metrics` on the control plane's tokio runtime: one
//! request per connection, `GET` only, bounded in connections, request size and time.
//!
//! Owns: [`serve`]. Must never: let a slow or hostile client hold the runtime (every read
//! has a deadline, requests over [`MAX_REQUEST_BYTES`] are refused, at most
//! [`MAX_CONNECTIONS`] are served at once), or render the page on a reactor.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Largest request head read.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Most connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest a client may take to send its request or read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The pages served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/`: the HTML status page (`super::status`).
    Status,
}

/// Renders a page at request time (it may ask the reactors, by message).
pub type Render = Arc<dyn Fn(Page) -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Serves `GET /metrics` and the status page at `/` on `listener` until `stop` turns
/// true.
pub async fn serve(listener: TcpListener, render: Render, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let conn = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _peer)) => {
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(error) =
                        tokio::time::timeout(IO_TIMEOUT, answer(stream, &render)).await
                    {
                        tracing::debug!(%error, "metrics client too slow");
                    }
                });
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "metrics endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, render: &Render) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() >= MAX_REQUEST_BYTES {
            break false;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let (status, content_type, body) = if complete {
        route(&head, render).await
    } else {
        (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "request too large\n".to_owned(),
        )
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
    // Lingering close: read what the client still sends until it closes its side, so
    // closing with unread input does not reset the connection under the answer.
    let mut drained = 0usize;
    while drained < 4 * MAX_REQUEST_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

async fn route(head: &[u8], render: &Render) -> (&'static str, &'static str, String) {
    let text = String::from_utf8_lossy(head);
    let mut first = text.lines().next().unwrap_or("").split_ascii_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_owned(),
        );
    }
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(Page::Metrics).await,
        ),
        "/" | "/index.html" => (
            "200 OK",
            "text/html; charset=utf-8",
            render(Page::Status).await,
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; the status page is at /, metrics at /metrics\n".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[test]
    fn answers_get_metrics_and_refuses_the_rest() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (stop_tx, stop) = watch::channel(false);
            let render: Render = Arc::new(|page| {
                Box::pin(async move {
                    match page {
                        Page::Metrics => "x 1\n".to_owned(),
                        Page::Status => "<p>status</p>".to_owned(),
                    }
                })
            });
            let server = tokio::spawn(serve(listener, render, stop));
            let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
            assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
            assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
            let index = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
            assert!(index.contains("text/html; charset=utf-8"), "{index}");
            assert!(index.ends_with("\r\n\r\n<p>status</p>"), "{index}");
            let missing = get(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
            assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
            let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            let huge = format!(
                "GET /metrics HTTP/1.1\r\nX: {}\r\n",
                "a".repeat(MAX_REQUEST_BYTES)
            );
            let refused = get(addr, &huge).await;
            assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
            stop_tx.send(true).expect("stop");
            server.await.expect("server ends");
        });
    }
}
