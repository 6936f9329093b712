//! GetSubProcessStream: an executable's kept lines, then live lines, until
//! the channel is closed (or the executable's directory is removed, or its
//! shim died).
//!
//! The shim writes the output to files (`host::shim::format`); the reader
//! (`cells::output::OutputReader`) follows them, so a slow client only
//! falls behind in the files, never slows the executable or the daemon: if
//! it falls behind by more than is kept, it is told how many lines it
//! missed, in the stream itself.

use aurae_proto::observe::{GetSubProcessStreamResponse, LogItem};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    logging::now_nanos,
    services::cells::output::{Channel, OutputReader, ReadEvent},
};

type Tx = mpsc::Sender<Result<GetSubProcessStreamResponse, Status>>;

/// The line sent in place of `n` lines that were rotated away.
pub(super) fn lost_note(n: u64, channel: Channel) -> String {
    format!(
        "auraed: {n} {} lines were rotated away before this reader got to them \
         (kept per channel: see --output-cap)",
        channel.as_str()
    )
}

/// Sends the lines `reader` returns, one per message, until the end of the
/// channel, an error, or the client going away (a failed send).
pub(super) async fn produce(mut reader: OutputReader, channel: Channel, tx: Tx) {
    let send = |line: String, timestamp: i64| {
        let item = LogItem {
            channel: channel.as_str().into(),
            line,
            timestamp,
        };
        tx.send(Ok(GetSubProcessStreamResponse { item: Some(item) }))
    };
    loop {
        let event = match reader.next().await {
            Ok(e) => e,
            Err(e) => {
                let msg = format!("reading the {} of the executable: {e}", channel.as_str());
                tracing::warn!("GetSubProcessStream: {msg}");
                let _ = tx.send(Err(Status::internal(msg))).await;
                return;
            }
        };
        match event {
            ReadEvent::Lines(lines) => {
                for l in lines {
                    if send(l.text, l.timestamp).await.is_err() {
                        return;
                    }
                }
            }
            ReadEvent::Lost(n) => {
                if send(lost_note(n, channel), now_nanos()).await.is_err() {
                    return;
                }
            }
            ReadEvent::End => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, time::Duration};

    use super::*;
    use crate::{
        host::{proc::ProcId, shim::format},
        services::cells::output::OutputSource,
    };

    fn write_lines(path: &std::path::Path, lines: std::ops::Range<i64>) {
        let mut buf = Vec::new();
        for i in lines {
            format::encode_line(&mut buf, i, format!("line {i}").as_bytes());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(&buf)
            .unwrap();
    }

    #[tokio::test]
    async fn lines_and_gaps_become_messages() {
        let d = tempfile::tempdir().unwrap();
        // Lines 0..3 were rotated away; 3..5 are kept, then the end.
        write_lines(&d.path().join("stderr.3"), 3..5);
        format::write_atomic(d.path(), "stderr.end", b"5").unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let reader = OutputReader::open(&src, Channel::Stderr).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        tokio::time::timeout(
            Duration::from_secs(10),
            produce(reader, Channel::Stderr, tx),
        )
        .await
        .unwrap();
        let mut items = Vec::new();
        while let Some(m) = rx.recv().await {
            items.push(m.unwrap().item.unwrap());
        }
        assert_eq!(items.len(), 3);
        assert!(items.iter().all(|i| i.channel == "stderr"));
        assert_eq!(items[0].line, lost_note(3, Channel::Stderr));
        assert!(items[0]
            .line
            .starts_with("auraed: 3 stderr lines were rotated away"));
        assert!(items[0].timestamp > 1_000_000_000_000_000_000);
        assert_eq!((items[1].line.as_str(), items[1].timestamp), ("line 3", 3));
        assert_eq!((items[2].line.as_str(), items[2].timestamp), ("line 4", 4));
    }

    /// Lines through the producer into the channel, as many as the
    /// reader's throughput test (`AURAED_OUTPUT_BENCH_LINES`, 200,000).
    #[tokio::test]
    async fn producer_throughput() {
        let n: i64 = std::env::var("AURAED_OUTPUT_BENCH_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let d = tempfile::tempdir().unwrap();
        write_lines(&d.path().join("stdout.0"), 0..n);
        format::write_atomic(d.path(), "stdout.end", n.to_string().as_bytes()).unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let t = std::time::Instant::now();
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, mut rx) = mpsc::channel(128);
        let task = tokio::spawn(produce(reader, Channel::Stdout, tx));
        let mut got = 0;
        while let Some(m) = rx.recv().await {
            assert_eq!(m.unwrap().item.unwrap().timestamp, got);
            got += 1;
        }
        task.await.unwrap();
        assert_eq!(got, n);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{n} lines through the producer in {secs:.3} s: {:.0} lines/s",
            n as f64 / secs
        );
    }

    #[tokio::test]
    async fn stops_when_the_client_goes_away() {
        let d = tempfile::tempdir().unwrap();
        write_lines(&d.path().join("stdout.0"), 0..1000);
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(produce(reader, Channel::Stdout, tx));
        let first = rx.recv().await.unwrap().unwrap().item.unwrap();
        assert_eq!(first.line, "line 0");
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the producer did not stop")
            .unwrap();
    }
}
