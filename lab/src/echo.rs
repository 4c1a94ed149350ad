//! The demo service: a tiny HTTP/1.1 server that answers every request with the cluster that
//! served it and the address it was called from (the node agent for a local endpoint, the
//! gateway for a tunnelled one).

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_core::lifecycle::DrainWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read before answering anyway.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the echo service on 127.0.0.1 (port chosen by the system) and serves it until `drain`
/// signals. Returns the bound address.
pub(crate) async fn start(cluster: String, drain: DrainWatch) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = drain.signaled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        tokio::spawn(answer(tcp, peer, cluster.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "echo accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    Ok(addr)
}

/// The body the echo service answers with.
pub fn body(cluster: &str, caller: SocketAddr) -> String {
    format!("cluster={cluster} caller={caller}\n")
}

async fn answer(mut tcp: TcpStream, caller: SocketAddr, cluster: String) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let body = body(&cluster, caller);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(error) = tcp.write_all(response.as_bytes()).await {
        tracing::debug!(%error, "echo reply failed");
    }
    let _ = tcp.shutdown().await;
}
