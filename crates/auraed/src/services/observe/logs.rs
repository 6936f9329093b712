//! GetAuraeDaemonLogStream: the `LogBus` backlog, then live lines.

use aurae_proto::observe::{GetAuraeDaemonLogStreamResponse, LogItem};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::logging::{now_nanos, LogLine};

const CHANNEL: &str = "auraed";

type Tx = mpsc::Sender<Result<GetAuraeDaemonLogStreamResponse, Status>>;

fn item(timestamp: i64, line: String) -> Result<GetAuraeDaemonLogStreamResponse, Status> {
    Ok(GetAuraeDaemonLogStreamResponse {
        item: Some(LogItem {
            channel: CHANNEL.into(),
            line,
            timestamp,
        }),
    })
}

/// Sends the backlog, then every live line until the client goes away. A
/// subscriber that falls more than the bus's capacity behind loses the
/// oldest lines (the bus never waits for it) and gets one line saying how
/// many; other subscribers are unaffected.
pub(super) async fn produce(backlog: Vec<LogLine>, mut live: broadcast::Receiver<LogLine>, tx: Tx) {
    for l in backlog {
        if tx.send(item(l.timestamp, l.line)).await.is_err() {
            return;
        }
    }
    loop {
        let next = match live.recv().await {
            Ok(l) => item(l.timestamp, l.line),
            Err(broadcast::error::RecvError::Lagged(n)) => item(
                now_nanos(),
                format!("auraed: this stream fell behind; {n} log lines were dropped"),
            ),
            // The bus lives as long as the daemon; nothing more will come.
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(next).await.is_err() {
            return;
        }
    }
}
