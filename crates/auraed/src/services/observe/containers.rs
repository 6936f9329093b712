//! GetSubProcessStream for a Kubernetes CRI container's process (its init
//! pid, as ContainerStatus' verbose info gives it): the container's lines
//! of the asked-for channel, from its CRI log file (`crate::cri`), from the
//! first line the file holds, then live, until the container has exited
//! and the file is read to its end.
//!
//! Containers are not executables of the cells layer (the CRI side runs
//! them with an OCI runtime and a monitor that writes kubelet's log file),
//! so their output is read from that file rather than the shim's. kubelet
//! rotates it (rename, then ReopenContainerLog): when the path names
//! another file, the reader goes on with the new one from its start.

use std::{io::Read, os::unix::fs::MetadataExt, path::PathBuf, sync::Arc, time::Duration};

use aurae_proto::observe::{GetSubProcessStreamResponse, LogBlock, LogItem};
use tokio::sync::mpsc;
use tonic::Status;

use super::subprocess::{Shape, MAX_MESSAGE_TEXT};
use crate::{
    cri::container::log::{parse, Stream},
    services::cells::output::Channel,
};

type Tx = mpsc::Sender<Result<GetSubProcessStreamResponse, Status>>;

/// How often a live log file is looked at again.
const POLL: Duration = Duration::from_millis(100);
/// Bytes read at once.
const CHUNK: usize = 256 << 10;

/// The CRI's containers, as the observe service asks about them.
pub trait ContainerLogs: Send + Sync {
    /// The container whose init process is `pid`, if any.
    fn by_pid(&self, pid: i32) -> Option<ContainerLog>;
    /// Whether container `id` may still write (created or running).
    fn live(&self, id: &str) -> bool;
}

/// A container's log file and the cell it runs in (for authorization).
#[derive(Debug, Clone)]
pub struct ContainerLog {
    pub id: String,
    pub cell: String,
    pub path: PathBuf,
}

/// Follows `log` and sends the lines of `channel`, shaped as `shape` says.
pub(super) async fn produce(
    containers: Arc<dyn ContainerLogs>,
    log: ContainerLog,
    channel: Channel,
    shape: Shape,
    tx: Tx,
) {
    let want = match channel {
        Channel::Stdout => Stream::Stdout,
        Channel::Stderr => Stream::Stderr,
    };
    let mut file: Option<(std::fs::File, u64)> = None;
    let mut pending = Vec::new(); // bytes after the last newline read
    let mut partial = Vec::new(); // text of P records of our stream
    let mut partial_ts = 0;
    // One read buffer for the stream's life (it polls every POLL while live).
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Checked before reading: what is written before the container is
        // seen to have exited is read below, in full.
        let live = containers.live(&log.id);
        if file.is_none() || rotated(&log, &file) {
            if let Some((f, _)) = file.take() {
                // The rest of the old file first.
                let mut f = f;
                let mut rest = Vec::new();
                let _ = f.read_to_end(&mut rest);
                pending.extend_from_slice(&rest);
            }
            file = std::fs::File::open(&log.path).ok().and_then(|f| {
                let ino = f.metadata().ok()?.ino();
                Some((f, ino))
            });
        }
        let n = match &mut file {
            Some((f, _)) => f.read(&mut buf).unwrap_or(0),
            None => 0,
        };
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            let mut items = Vec::new();
            let mut start = 0;
            while let Some(nl) = memchr::memchr(b'\n', &pending[start..]) {
                if let Some(r) = parse(&pending[start..start + nl]) {
                    if r.stream == want {
                        if partial.is_empty() {
                            partial_ts = r.timestamp;
                        }
                        partial.extend_from_slice(r.text);
                        if !r.partial {
                            items.push(LogItem {
                                channel: channel.as_str().into(),
                                line: String::from_utf8_lossy(&partial).into_owned(),
                                timestamp: partial_ts,
                            });
                            partial.clear();
                        }
                    }
                }
                start += nl + 1;
            }
            pending.drain(..start);
            if !send(&tx, items, channel, shape).await {
                return;
            }
            continue;
        }
        if !live {
            // Exited and read to the end: a last partial line goes too.
            if !partial.is_empty() {
                let item = LogItem {
                    channel: channel.as_str().into(),
                    line: String::from_utf8_lossy(&partial).into_owned(),
                    timestamp: partial_ts,
                };
                send(&tx, vec![item], channel, shape).await;
            }
            return;
        }
        // A file read to its end gives what is appended later (no sticky EOF).
        tokio::time::sleep(POLL).await;
    }
}

/// Whether the log path now names another file than the one open.
fn rotated(log: &ContainerLog, file: &Option<(std::fs::File, u64)>) -> bool {
    match (file, std::fs::metadata(&log.path)) {
        (Some((_, ino)), Ok(m)) => m.ino() != *ino,
        _ => false,
    }
}

/// Sends `items` as responses of `shape`; false when the client is gone.
async fn send(tx: &Tx, items: Vec<LogItem>, channel: Channel, shape: Shape) -> bool {
    if items.is_empty() {
        return true;
    }
    let responses: Vec<GetSubProcessStreamResponse> = match shape {
        Shape::One => items
            .into_iter()
            .map(|i| GetSubProcessStreamResponse {
                item: Some(i),
                ..Default::default()
            })
            .collect(),
        Shape::Items(n) => batches(items, n)
            .into_iter()
            .map(|items| GetSubProcessStreamResponse {
                items,
                ..Default::default()
            })
            .collect(),
        Shape::Blocks => batches(items, usize::MAX)
            .into_iter()
            .map(|items| GetSubProcessStreamResponse {
                block: Some(block(channel, items)),
                ..Default::default()
            })
            .collect(),
    };
    for r in responses {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}

/// At most `n` items and about [`MAX_MESSAGE_TEXT`] bytes of text each.
fn batches(items: Vec<LogItem>, n: usize) -> Vec<Vec<LogItem>> {
    let mut out: Vec<Vec<LogItem>> = Vec::new();
    let mut bytes = 0;
    for i in items {
        let full = out
            .last()
            .is_none_or(|b| b.len() >= n || bytes + i.line.len() > MAX_MESSAGE_TEXT);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += i.line.len();
        if let Some(b) = out.last_mut() {
            b.push(i);
        }
    }
    out
}

/// Lines as one LogBlock (text with newlines, timestamps run-length encoded).
fn block(channel: Channel, items: Vec<LogItem>) -> LogBlock {
    let mut b = LogBlock {
        channel: channel.as_str().into(),
        ..Default::default()
    };
    for i in items {
        b.text.push_str(&i.line);
        b.text.push('\n');
        match (b.timestamps.last(), b.line_counts.last_mut()) {
            (Some(&t), Some(c)) if t == i.timestamp => *c += 1,
            _ => {
                b.timestamps.push(i.timestamp);
                b.line_counts.push(1);
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(line: &str, timestamp: i64) -> LogItem {
        LogItem {
            channel: "stdout".into(),
            line: line.into(),
            timestamp,
        }
    }

    #[test]
    fn blocks_run_length_encode_timestamps() {
        let b = block(Channel::Stdout, vec![it("a", 1), it("b", 1), it("c", 2)]);
        assert_eq!(b.text, "a\nb\nc\n");
        assert_eq!((b.timestamps, b.line_counts), (vec![1, 2], vec![2, 1]));
    }

    #[test]
    fn batches_hold_at_most_n() {
        let v: Vec<LogItem> = (0..5).map(|i| it("x", i)).collect();
        let b = batches(v, 2);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    }
}
