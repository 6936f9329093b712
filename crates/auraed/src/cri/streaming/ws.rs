//! remotecommand over WebSocket (`v5.channel.k8s.io`, client-go's
//! `NewWebSocketExecutor`): one binary message per write, its first byte
//! the channel (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize); v5 adds
//! the close signal `[255, channel]` (the client closed its stdin). The
//! server ends by closing the WebSocket, which is every stream's EOF.
//!
//! The channels become the streams of a [`spdy::Connection`] made up front,
//! so `remotecommand.rs` serves both transports unchanged.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
        Message,
    },
    WebSocketStream,
};
use tokio_util::sync::CancellationToken;

use super::spdy::{self, Frame, Out};

pub const V5: &str = "v5.channel.k8s.io";
/// What the WebSocket side speaks (v5's status is v4's).
pub const PROTOCOLS: &[&str] = &[V5];

const CHANNELS: &[(u32, &str)] = &[
    (0, "stdin"),
    (1, "stdout"),
    (2, "stderr"),
    (3, "error"),
    (4, "resize"),
];
const CLOSE_SIGNAL: u8 = 255;

/// Serves the channels of an upgraded WebSocket connection as streams.
pub async fn connection<T>(io: T) -> spdy::Connection
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut source) = ws.split();
    let (tx, mut out) = mpsc::channel::<Out>(64);
    let stopped = CancellationToken::new();
    let (conn, routes) = spdy::Connection::preopened(CHANNELS, tx, stopped.clone());
    let stop = stopped.clone();
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                item = out.recv() => item,
                () = stop.cancelled() => None,
            };
            match item {
                Some(Out::Frame(Frame::Data { id, data, .. })) if !data.is_empty() => {
                    let mut m = Vec::with_capacity(data.len() + 1);
                    m.push(id as u8);
                    m.extend_from_slice(&data);
                    if sink.send(Message::Binary(m.into())).await.is_err() {
                        break;
                    }
                }
                Some(Out::Frame(_)) => {} // FIN, window updates: nothing to say
                Some(Out::Close) | None => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "".into(),
                        })))
                        .await;
                    let _ = sink.close().await;
                    break;
                }
            }
        }
        stop.cancel();
    });
    let stop = stopped.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = source.next() => m,
                () = stop.cancelled() => break,
            };
            let data: Bytes = match msg {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue, // pings are answered by tungstenite
            };
            let Some((&ch, rest)) = data.split_first() else {
                continue;
            };
            let table = || routes.lock().unwrap_or_else(|p| p.into_inner());
            if ch == CLOSE_SIGNAL {
                if let Some(&c) = rest.first() {
                    table().remove(&u32::from(c));
                }
                continue;
            }
            let route = table().get(&u32::from(ch)).map(|r| r.tx.clone());
            if let Some(r) = route {
                let _ = r.send(data.slice(1..)).await;
            }
        }
        routes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        stop.cancel();
    });
    conn
}

/// The WebSocket subprotocol of port forwarding tunnelled over WebSocket
/// (client-go's `NewSPDYOverWebsocketDialer`): the binary messages carry
/// a SPDY/3.1 connection's bytes.
pub const PORTFORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

/// The byte stream tunnelled in an upgraded WebSocket connection.
pub async fn tunnel<T>(io: T) -> tokio::io::DuplexStream
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut source) = ws.split();
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut rd, mut wr) = tokio::io::split(ours);
    tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            let b = match m {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    });
    theirs
}
