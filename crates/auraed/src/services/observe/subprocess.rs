//! GetSubProcessStream: an executable's kept lines, then live lines, until
//! the process closes its end of the pipe.

use std::sync::Arc;

use aurae_proto::observe::{GetSubProcessStreamResponse, LogItem};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::{
    logging::now_nanos,
    services::cells::output::{Channel, Event, Line, OutputStream, Subscription},
};

/// Lines copied from the backlog per lock, when catching up.
const CATCH_UP_BATCH: usize = 1024;

type Tx = mpsc::Sender<Result<GetSubProcessStreamResponse, Status>>;

/// Delivers lines in order, each once, tracking the next expected seq.
struct Cursor {
    channel: Channel,
    next: u64,
    tx: Tx,
}

/// The client went away.
struct Gone;

impl Cursor {
    async fn send(&self, line: String, timestamp: i64) -> Result<(), Gone> {
        let item = LogItem {
            channel: self.channel.as_str().into(),
            line,
            timestamp,
        };
        self.tx
            .send(Ok(GetSubProcessStreamResponse { item: Some(item) }))
            .await
            .map_err(|_| Gone)
    }

    async fn line(&mut self, l: &Line) -> Result<(), Gone> {
        self.send(l.text.to_string(), l.timestamp).await?;
        self.next = l.seq + 1;
        Ok(())
    }

    /// Reads from the backlog from `next` on until caught up. Returns true
    /// when the stream is closed and everything was delivered.
    async fn catch_up(&mut self, stream: &OutputStream) -> Result<bool, Gone> {
        loop {
            let r = stream.read_from(self.next, CATCH_UP_BATCH);
            if r.lost > 0 {
                // The reader was slower than the backlog is long: say so
                // in the stream itself, in place of the lost lines.
                let note = format!(
                    "auraed: this stream fell behind; {} {} lines were dropped",
                    r.lost,
                    self.channel.as_str()
                );
                self.send(note, now_nanos()).await?;
            }
            self.next = r.next_seq;
            let done = r.lines.is_empty();
            for l in &r.lines {
                self.line(l).await?;
            }
            if r.closed {
                return Ok(true);
            }
            if done {
                return Ok(false);
            }
        }
    }
}

/// The output pipe is drained by its own task into a bounded backlog and a
/// broadcast (`cells::output`); this follows the broadcast and, when it lags
/// (the client reads slower than the process writes), resumes from the
/// backlog by seq, so nothing kept is lost and nothing is sent twice.
pub(super) async fn produce(
    stream: Arc<OutputStream>,
    sub: Subscription,
    channel: Channel,
    tx: Tx,
) {
    let Subscription {
        backlog,
        closed,
        mut live,
        next_seq,
    } = sub;
    let mut cursor = Cursor {
        channel,
        next: next_seq,
        tx,
    };
    for l in &backlog {
        if cursor.line(l).await.is_err() {
            return;
        }
    }
    cursor.next = next_seq;
    drop(backlog);
    if closed {
        return;
    }
    loop {
        let step = match live.recv().await {
            Ok(Event::Line(l)) if l.seq < cursor.next => Ok(false),
            Ok(Event::Line(l)) if l.seq == cursor.next => cursor.line(&l).await.map(|()| false),
            // A gap without Lagged cannot happen; handle it like Lagged.
            Ok(Event::Line(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                cursor.catch_up(&stream).await
            }
            // End follows every line in the broadcast; after a catch-up the
            // backlog says whether anything is still missing.
            Ok(Event::End) | Err(broadcast::error::RecvError::Closed) => {
                cursor.catch_up(&stream).await.map(|_| true)
            }
        };
        match step {
            Ok(false) => {}
            Ok(true) | Err(Gone) => return,
        }
    }
}
