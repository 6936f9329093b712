//! A minimal SPDY/3.1 framing layer, enough for the Kubernetes streaming
//! protocols (remotecommand and portforward multiplex their streams over
//! SPDY/3.1: Go's `moby/spdystream`, which kubelet and client-go use).
//!
//! Frames (SPDY protocol draft 3.1, section 2.2): a control frame is
//! `1 | version(15) | type(16) | flags(8) | length(24) | payload`, a data
//! frame `0 | stream id(31) | flags(8) | length(24) | data`. Name/value
//! header blocks are zlib streams primed with the SPDY/3 dictionary, one
//! stream per direction for the whole connection, each block ending in a
//! sync flush.
//!
//! [`Connection`] runs one connection: a reader task that answers each
//! SYN_STREAM with a SYN_REPLY (as spdystream's server does), routes DATA
//! to its stream and echoes PINGs, and a writer task that owns the header
//! compressor. Flow control: received data is acknowledged with
//! WINDOW_UPDATE as the consumer reads it (64 KiB initial window); the
//! peer's window is recorded but not waited on, because spdystream, the
//! only client there is, sends no WINDOW_UPDATE at all: waiting would stall
//! every stream after 64 KiB.

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

include!("spdy_dictionary.rs");

pub const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

pub const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status codes (section 2.6.3).
pub const PROTOCOL_ERROR: u32 = 1;
pub const INVALID_STREAM: u32 = 2;
pub const REFUSED_STREAM: u32 = 3;
pub const CANCEL: u32 = 5;

/// The initial flow-control window of every stream (section 2.6.8).
pub const INITIAL_WINDOW: u32 = 64 * 1024;
/// The largest payload a frame can carry (24-bit length).
const MAX_FRAME: usize = 0xFF_FFFF;
/// Data is sent in frames of at most this many bytes.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
/// A decompressed header block larger than this is refused (a zlib bomb
/// would otherwise cost memory; real blocks here are a few hundred bytes).
const MAX_HEADER_BLOCK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY: {0}")]
    Protocol(String),
    #[error("SPDY header compression: {0}")]
    Zlib(String),
    #[error("SPDY connection: {0}")]
    Io(#[from] io::Error),
}

/// A name/value header block: lower-case names; a value holding several
/// values separates them with NUL.
pub type Headers = Vec<(String, String)>;

/// The first value of header `name` (case-insensitive).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        id: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        id: u32,
        status: u32,
    },
    /// (flags, id, value) entries.
    Settings(Vec<(u8, u32, u32)>),
    Ping(u32),
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        id: u32,
        delta: u32,
    },
    Data {
        id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this layer does not know (ignored, as the
    /// spec asks).
    Unknown(u16),
}

fn zerr(e: impl std::fmt::Display) -> SpdyError {
    SpdyError::Zlib(e.to_string())
}

/// Writes frames; owns the header compressor of its direction.
pub struct Encoder {
    z: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        let mut z = Compress::new(Compression::default(), true);
        // A fresh stream accepts a dictionary; it cannot fail here.
        let _ = z.set_dictionary(DICTIONARY);
        Encoder { z }
    }

    fn header_block(&mut self, h: &Headers) -> Result<Vec<u8>, SpdyError> {
        let mut raw = Vec::with_capacity(64);
        raw.put_u32(h.len() as u32);
        for (n, v) in h {
            raw.put_u32(n.len() as u32);
            raw.extend(n.to_ascii_lowercase().as_bytes());
            raw.put_u32(v.len() as u32);
            raw.extend(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let start = self.z.total_in();
        loop {
            let done = (self.z.total_in() - start) as usize;
            self.z
                .compress_vec(&raw[done..], &mut out, FlushCompress::Sync)
                .map_err(zerr)?;
            let done = (self.z.total_in() - start) as usize;
            // A sync flush is complete when it left room in the output.
            if done == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(256);
        }
    }

    pub fn encode(&mut self, f: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        let control = |out: &mut BytesMut, kind: u16, flags: u8, payload: &[u8]| {
            out.put_u16(0x8000 | VERSION);
            out.put_u16(kind);
            out.put_u32(((flags as u32) << 24) | payload.len() as u32);
            out.extend_from_slice(payload);
        };
        let mut p = Vec::new();
        match f {
            Frame::SynStream {
                id,
                associated,
                priority,
                flags,
                headers,
            } => {
                p.put_u32(id & 0x7FFF_FFFF);
                p.put_u32(associated & 0x7FFF_FFFF);
                p.put_u8(priority << 5);
                p.put_u8(0); // slot
                p.extend(self.header_block(headers)?);
                control(out, SYN_STREAM, *flags, &p);
            }
            Frame::SynReply { id, flags, headers } => {
                p.put_u32(id & 0x7FFF_FFFF);
                p.extend(self.header_block(headers)?);
                control(out, SYN_REPLY, *flags, &p);
            }
            Frame::Headers { id, flags, headers } => {
                p.put_u32(id & 0x7FFF_FFFF);
                p.extend(self.header_block(headers)?);
                control(out, HEADERS, *flags, &p);
            }
            Frame::RstStream { id, status } => {
                p.put_u32(id & 0x7FFF_FFFF);
                p.put_u32(*status);
                control(out, RST_STREAM, 0, &p);
            }
            Frame::Settings(entries) => {
                p.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    p.put_u32(((*flags as u32) << 24) | (id & 0xFF_FFFF));
                    p.put_u32(*value);
                }
                control(out, SETTINGS, 0, &p);
            }
            Frame::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
            Frame::GoAway { last_good, status } => {
                p.put_u32(last_good & 0x7FFF_FFFF);
                p.put_u32(*status);
                control(out, GOAWAY, 0, &p);
            }
            Frame::WindowUpdate { id, delta } => {
                p.put_u32(id & 0x7FFF_FFFF);
                p.put_u32(delta & 0x7FFF_FFFF);
                control(out, WINDOW_UPDATE, 0, &p);
            }
            Frame::Data { id, flags, data } => {
                if data.len() > MAX_FRAME {
                    return Err(SpdyError::Protocol("data frame too large".into()));
                }
                out.put_u32(id & 0x7FFF_FFFF);
                out.put_u32(((*flags as u32) << 24) | data.len() as u32);
                out.extend_from_slice(data);
            }
            Frame::Unknown(_) => {}
        }
        Ok(())
    }
}

/// Reads frames; owns the header decompressor of its direction.
pub struct Decoder {
    z: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            z: Decompress::new(true),
        }
    }

    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let start = self.z.total_in();
        loop {
            let done = (self.z.total_in() - start) as usize;
            let before = self.z.total_out();
            match self
                .z
                .decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z.set_dictionary(DICTIONARY).map_err(zerr)?;
                    continue;
                }
                Err(e) => return Err(zerr(e)),
            }
            let done = (self.z.total_in() - start) as usize;
            let progressed = self.z.total_out() > before;
            if done == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(SpdyError::Protocol("header block too large".into()));
            }
            if !progressed && done == input.len() {
                return Ok(out);
            }
            out.reserve(1024);
        }
    }

    fn header_block(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let raw = self.inflate(compressed)?;
        let mut b = &raw[..];
        let bad = || SpdyError::Protocol("malformed header block".into());
        let take = |b: &mut &[u8]| -> Result<String, SpdyError> {
            if b.remaining() < 4 {
                return Err(bad());
            }
            let n = b.get_u32() as usize;
            if b.remaining() < n {
                return Err(bad());
            }
            let s = String::from_utf8(b[..n].to_vec()).map_err(|_| bad())?;
            b.advance(n);
            Ok(s)
        };
        if b.remaining() < 4 {
            return Err(bad());
        }
        let count = b.get_u32() as usize;
        let mut h = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let name = take(&mut b)?;
            let value = take(&mut b)?;
            h.push((name.to_ascii_lowercase(), value));
        }
        Ok(h)
    }

    /// One frame from the front of `buf`, or None if it holds less than a
    /// frame yet.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let head = buf.split_to(8);
        let flags = head[4];
        let mut p = buf.split_to(len);
        let short = |need: usize, p: &BytesMut| {
            if p.len() < need {
                Err(SpdyError::Protocol("control frame too short".into()))
            } else {
                Ok(())
            }
        };
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Some(Frame::Data {
                id,
                flags,
                data: p.freeze(),
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7FFF;
        if version != VERSION {
            return Err(SpdyError::Protocol(format!(
                "unsupported SPDY version {version}"
            )));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let frame = match kind {
            SYN_STREAM => {
                short(10, &p)?;
                let id = p.get_u32() & 0x7FFF_FFFF;
                let associated = p.get_u32() & 0x7FFF_FFFF;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                Frame::SynStream {
                    id,
                    associated,
                    priority,
                    flags,
                    headers: self.header_block(&p)?,
                }
            }
            SYN_REPLY | HEADERS => {
                short(4, &p)?;
                let id = p.get_u32() & 0x7FFF_FFFF;
                let headers = self.header_block(&p)?;
                if kind == SYN_REPLY {
                    Frame::SynReply { id, flags, headers }
                } else {
                    Frame::Headers { id, flags, headers }
                }
            }
            RST_STREAM => {
                short(8, &p)?;
                Frame::RstStream {
                    id: p.get_u32() & 0x7FFF_FFFF,
                    status: p.get_u32(),
                }
            }
            SETTINGS => {
                short(4, &p)?;
                let n = p.get_u32() as usize;
                short(n.saturating_mul(8), &p)?;
                let mut v = Vec::with_capacity(n.min(16));
                for _ in 0..n {
                    let fi = p.get_u32();
                    v.push(((fi >> 24) as u8, fi & 0xFF_FFFF, p.get_u32()));
                }
                Frame::Settings(v)
            }
            PING => {
                short(4, &p)?;
                Frame::Ping(p.get_u32())
            }
            GOAWAY => {
                short(4, &p)?;
                let last_good = p.get_u32() & 0x7FFF_FFFF;
                let status = if p.len() >= 4 { p.get_u32() } else { 0 };
                Frame::GoAway { last_good, status }
            }
            WINDOW_UPDATE => {
                short(8, &p)?;
                Frame::WindowUpdate {
                    id: p.get_u32() & 0x7FFF_FFFF,
                    delta: p.get_u32() & 0x7FFF_FFFF,
                }
            }
            other => Frame::Unknown(other),
        };
        Ok(Some(frame))
    }
}

/// What the writer task is asked to do.
pub(super) enum Out {
    Frame(Frame),
    /// GOAWAY, flush, close the write side, stop the reader.
    Close,
}

/// Sends on one stream. Clones share the stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    tx: mpsc::Sender<Out>,
    reset: Arc<AtomicBool>,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    async fn send(&self, f: Frame) -> io::Result<()> {
        if self.reset.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream reset by the peer",
            ));
        }
        self.tx
            .send(Out::Frame(f))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "SPDY connection closed"))
    }

    pub async fn write(&self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.send(Frame::Data {
                id: self.id,
                flags: 0,
                data: Bytes::copy_from_slice(chunk),
            })
            .await?;
        }
        Ok(())
    }

    /// Half-closes the stream (an empty DATA frame with FIN).
    pub async fn close(&self) -> io::Result<()> {
        self.send(Frame::Data {
            id: self.id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        })
        .await
    }

    pub async fn reset(&self, status: u32) {
        let _ = self
            .send(Frame::RstStream {
                id: self.id,
                status,
            })
            .await;
        self.reset.store(true, Ordering::Relaxed);
    }

    pub fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Relaxed)
    }
}

/// Receives on one stream: None once the peer half-closed (FIN), reset it
/// or the connection ended.
pub struct StreamReader {
    id: u32,
    rx: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Out>,
}

impl StreamReader {
    /// Moves the reader out, leaving one that reads nothing.
    pub fn take(&mut self) -> StreamReader {
        let (_, rx) = mpsc::channel(1);
        StreamReader {
            id: self.id,
            rx: std::mem::replace(&mut self.rx, rx),
            tx: self.tx.clone(),
        }
    }

    pub async fn read(&mut self) -> Option<Bytes> {
        let b = self.rx.recv().await?;
        // The consumer has the bytes: the peer may send as many again.
        let _ = self
            .tx
            .send(Out::Frame(Frame::WindowUpdate {
                id: self.id,
                delta: b.len() as u32,
            }))
            .await;
        Some(b)
    }
}

/// A stream the peer opened (or, in a client, one this side opened).
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

pub(super) struct Route {
    pub(super) tx: mpsc::Sender<Bytes>,
    pub(super) reset: Arc<AtomicBool>,
}

pub(super) type Routes = Arc<std::sync::Mutex<HashMap<u32, Route>>>;

/// One SPDY connection over an upgraded HTTP connection.
pub struct Connection {
    /// Streams the peer opens, in order.
    pub incoming: mpsc::Receiver<Stream>,
    tx: mpsc::Sender<Out>,
    routes: Routes,
    next_id: u32,
    stopped: CancellationToken,
}

impl Connection {
    /// Runs the server side of a connection.
    pub fn server<T>(io: T) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::start(io, true)
    }

    /// Runs the client side (tests: `open` streams with odd ids).
    pub fn client<T>(io: T) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::start(io, false)
    }

    /// A connection whose streams exist from the start and whose frames
    /// another transport carries (WebSocket channels, `ws.rs`): `streams`
    /// are (id, stream type); `out` is what the streams send.
    pub(super) fn preopened(
        streams: &[(u32, &str)],
        tx: mpsc::Sender<Out>,
        stopped: CancellationToken,
    ) -> (Connection, Routes) {
        let routes: Routes = Arc::default();
        let (in_tx, incoming) = mpsc::channel::<Stream>(streams.len().max(1));
        for (id, kind) in streams {
            let (dtx, rx) = mpsc::channel(64);
            let reset = Arc::new(AtomicBool::new(false));
            routes.lock().unwrap_or_else(|p| p.into_inner()).insert(
                *id,
                Route {
                    tx: dtx,
                    reset: reset.clone(),
                },
            );
            let _ = in_tx.try_send(Stream {
                id: *id,
                headers: vec![("streamtype".to_string(), kind.to_string())],
                reader: StreamReader {
                    id: *id,
                    rx,
                    tx: tx.clone(),
                },
                writer: StreamWriter {
                    id: *id,
                    tx: tx.clone(),
                    reset,
                },
            });
        }
        (
            Connection {
                incoming,
                tx,
                routes: routes.clone(),
                next_id: 1,
                stopped,
            },
            routes,
        )
    }

    fn start<T>(io: T, server: bool) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (tx, out_rx) = mpsc::channel::<Out>(64);
        let (in_tx, incoming) = mpsc::channel::<Stream>(16);
        let routes: Routes = Arc::default();
        let stopped = CancellationToken::new();
        tokio::spawn(write_loop(wr, out_rx, stopped.clone()));
        tokio::spawn(read_loop(
            rd,
            server,
            tx.clone(),
            in_tx,
            routes.clone(),
            stopped.clone(),
        ));
        Connection {
            incoming,
            tx,
            routes,
            next_id: if server { 2 } else { 1 },
            stopped,
        }
    }

    /// Opens a stream (the peer's SYN_REPLY is not awaited).
    pub async fn open(&mut self, headers: Headers) -> io::Result<Stream> {
        let id = self.next_id;
        self.next_id += 2;
        let (dtx, rx) = mpsc::channel(64);
        let reset = Arc::new(AtomicBool::new(false));
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Route {
                    tx: dtx,
                    reset: reset.clone(),
                },
            );
        self.tx
            .send(Out::Frame(Frame::SynStream {
                id,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            }))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "SPDY connection closed"))?;
        Ok(Stream {
            id,
            headers,
            reader: StreamReader {
                id,
                rx,
                tx: self.tx.clone(),
            },
            writer: StreamWriter {
                id,
                tx: self.tx.clone(),
                reset,
            },
        })
    }

    /// Resolves when the connection has ended (peer gone or closed).
    pub async fn closed(&self) {
        self.stopped.cancelled().await
    }

    /// Sends GOAWAY after everything queued, then closes the connection.
    pub async fn close(self) {
        let _ = self.tx.send(Out::Close).await;
        // The writer stops the reader once it has flushed; wait a bounded
        // time so a stuck peer cannot hold the task.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), self.stopped.cancelled()).await;
    }
}

async fn write_loop<W: AsyncWrite>(wr: W, mut rx: mpsc::Receiver<Out>, stopped: CancellationToken) {
    tokio::pin!(wr);
    let mut enc = Encoder::new();
    let mut buf = BytesMut::with_capacity(MAX_DATA_CHUNK + 64);
    let mut last_seen = 0;
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = stopped.cancelled() => None,
        };
        let close = match item {
            Some(Out::Frame(f)) => {
                if let Frame::SynReply { id, .. } = &f {
                    last_seen = *id;
                }
                if let Err(e) = enc.encode(&f, &mut buf) {
                    tracing::debug!("SPDY encode: {e}");
                    break;
                }
                false
            }
            Some(Out::Close) | None => {
                let _ = enc.encode(
                    &Frame::GoAway {
                        last_good: last_seen,
                        status: 0,
                    },
                    &mut buf,
                );
                true
            }
        };
        // Batch what is already queued into one write.
        if !close && buf.len() < MAX_DATA_CHUNK && !rx.is_empty() {
            continue;
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
        if close {
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
            break;
        }
        if rx.is_empty() && wr.flush().await.is_err() {
            break;
        }
    }
    stopped.cancel();
}

async fn read_loop<R: AsyncRead>(
    rd: R,
    server: bool,
    tx: mpsc::Sender<Out>,
    incoming: mpsc::Sender<Stream>,
    routes: Routes,
    stopped: CancellationToken,
) {
    tokio::pin!(rd);
    let mut dec = Decoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut last_peer_id = 0u32;
    let send = |f: Frame| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Out::Frame(f)).await;
        }
    };
    'conn: loop {
        loop {
            let frame = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("SPDY read: {e}");
                    send(Frame::GoAway {
                        last_good: last_peer_id,
                        status: PROTOCOL_ERROR,
                    })
                    .await;
                    break 'conn;
                }
            };
            match frame {
                Frame::SynStream {
                    id, flags, headers, ..
                } => {
                    // Peer-initiated ids are odd from a client, even from a
                    // server, and increase.
                    let peer_parity = if server { 1 } else { 0 };
                    if id == 0 || id % 2 != peer_parity || id <= last_peer_id {
                        send(Frame::RstStream {
                            id,
                            status: PROTOCOL_ERROR,
                        })
                        .await;
                        continue;
                    }
                    last_peer_id = id;
                    send(Frame::SynReply {
                        id,
                        flags: 0,
                        headers: vec![],
                    })
                    .await;
                    let (dtx, rx) = mpsc::channel(64);
                    let reset = Arc::new(AtomicBool::new(false));
                    if flags & FLAG_FIN == 0 {
                        routes.lock().unwrap_or_else(|p| p.into_inner()).insert(
                            id,
                            Route {
                                tx: dtx,
                                reset: reset.clone(),
                            },
                        );
                    }
                    let stream = Stream {
                        id,
                        headers,
                        reader: StreamReader {
                            id,
                            rx,
                            tx: tx.clone(),
                        },
                        writer: StreamWriter {
                            id,
                            tx: tx.clone(),
                            reset,
                        },
                    };
                    if incoming.send(stream).await.is_err() {
                        routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        send(Frame::RstStream {
                            id,
                            status: REFUSED_STREAM,
                        })
                        .await;
                    }
                }
                Frame::Data { id, flags, data } => {
                    let route = routes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .map(|r| r.tx.clone());
                    match route {
                        Some(rtx) => {
                            // A full stream waits for its consumer: the
                            // reader stops (backpressure on a peer that
                            // ignores the window).
                            if !data.is_empty() && rtx.send(data).await.is_err() {
                                // The consumer is gone: drop the bytes.
                            }
                            if flags & FLAG_FIN != 0 {
                                routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            }
                        }
                        None => {
                            send(Frame::RstStream {
                                id,
                                status: INVALID_STREAM,
                            })
                            .await
                        }
                    }
                }
                Frame::SynReply { id, flags, .. } | Frame::Headers { id, flags, .. } => {
                    if flags & FLAG_FIN != 0 {
                        routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    }
                }
                Frame::RstStream { id, .. } => {
                    if let Some(r) = routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                        r.reset.store(true, Ordering::Relaxed);
                    }
                }
                Frame::Ping(pid) => {
                    // Answer the peer's pings (their ids have the peer's
                    // parity); ours are not sent.
                    let peer_parity = if server { 1 } else { 0 };
                    if pid % 2 == peer_parity {
                        send(Frame::Ping(pid)).await;
                    }
                }
                Frame::GoAway { .. } => break 'conn,
                Frame::Settings(_) | Frame::WindowUpdate { .. } | Frame::Unknown(_) => {}
            }
        }
        let n = tokio::select! {
            n = rd.read_buf(&mut buf) => n,
            _ = stopped.cancelled() => break 'conn,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // Every stream sees the end of its data.
    routes.lock().unwrap_or_else(|p| p.into_inner()).clear();
    drop(incoming);
    stopped.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
        let mut enc = Encoder::new();
        let mut buf = BytesMut::new();
        for f in frames {
            enc.encode(f, &mut buf).expect("encode");
        }
        let mut dec = Decoder::new();
        let mut out = vec![];
        while let Some(f) = dec.decode(&mut buf).expect("decode") {
            out.push(f);
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\x00\x00\x00\x07options"));
        assert!(DICTIONARY.ends_with(b",*,enq=0."));
    }

    #[test]
    fn frames_survive_a_roundtrip_with_one_compression_context() {
        let h = |t: &str| {
            vec![
                ("streamtype".to_string(), t.to_string()),
                ("port".to_string(), "80".to_string()),
            ]
        };
        let frames = vec![
            Frame::SynStream {
                id: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: h("error"),
            },
            Frame::SynStream {
                id: 3,
                associated: 0,
                priority: 3,
                flags: FLAG_FIN,
                headers: h("data"),
            },
            Frame::SynReply {
                id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Data {
                id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::RstStream { id: 3, status: 5 },
            Frame::Settings(vec![(0, 7, 65536)]),
            Frame::Ping(7),
            Frame::WindowUpdate { id: 1, delta: 5 },
            Frame::GoAway {
                last_good: 3,
                status: 0,
            },
        ];
        assert_eq!(roundtrip(&frames), frames);
    }

    /// A SYN_STREAM as Go's spdystream framer writes it (client-go's
    /// port-forward error stream: `streamType: error, port: 80,
    /// requestID: 0`), captured from the framer in cri-tools' vendor tree.
    #[test]
    fn decodes_a_frame_written_by_spdystream() {
        let bytes = include_bytes!("testdata/go_syn_stream.bin");
        let mut buf = BytesMut::from(&bytes[..]);
        let f = Decoder::new()
            .decode(&mut buf)
            .expect("decode")
            .expect("a frame");
        let Frame::SynStream { id, headers, .. } = f else {
            panic!("not a SYN_STREAM: {f:?}");
        };
        assert_eq!(id, 1);
        assert_eq!(header(&headers, "streamType"), Some("error"));
        assert_eq!(header(&headers, "port"), Some("80"));
        assert_eq!(header(&headers, "requestid"), Some("0"));
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut enc = Encoder::new();
        let mut full = BytesMut::new();
        enc.encode(&Frame::Ping(1), &mut full).expect("encode");
        let mut dec = Decoder::new();
        let mut part = BytesMut::from(&full[..5]);
        assert_eq!(dec.decode(&mut part).expect("decode"), None);
        part.extend_from_slice(&full[5..]);
        assert_eq!(dec.decode(&mut part).expect("decode"), Some(Frame::Ping(1)));
    }

    #[test]
    fn a_wrong_version_is_refused() {
        let mut buf = BytesMut::from(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert!(Decoder::new().decode(&mut buf).is_err());
    }

    /// The server side against raw frames: SYN_REPLY for a new stream,
    /// WINDOW_UPDATE once its data is consumed, PING echoed, and a reset
    /// stream refusing writes.
    #[tokio::test]
    async fn server_frames_reply_window_ping_and_reset() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut server = Connection::server(a);
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let mut out = BytesMut::new();
        for f in [
            Frame::SynStream {
                id: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "stdin".into())],
            },
            Frame::Data {
                id: 1,
                flags: 0,
                data: Bytes::from_static(b"12345"),
            },
            Frame::Ping(1),
        ] {
            enc.encode(&f, &mut out).expect("encode");
        }
        b.write_all(&out).await.expect("write");
        let mut st = server.incoming.recv().await.expect("stream");
        assert_eq!(st.reader.read().await.as_deref(), Some(&b"12345"[..]));
        let mut inbuf = BytesMut::new();
        let mut got = Vec::new();
        while got.len() < 3 {
            if let Some(f) = dec.decode(&mut inbuf).expect("decode") {
                got.push(f);
                continue;
            }
            b.read_buf(&mut inbuf).await.expect("read");
        }
        assert!(got.contains(&Frame::SynReply {
            id: 1,
            flags: 0,
            headers: vec![]
        }));
        assert!(got.contains(&Frame::Ping(1)));
        assert!(got.contains(&Frame::WindowUpdate { id: 1, delta: 5 }));
        // The peer resets the stream: writes fail, reads end.
        out.clear();
        enc.encode(
            &Frame::RstStream {
                id: 1,
                status: CANCEL,
            },
            &mut out,
        )
        .expect("encode");
        b.write_all(&out).await.expect("write");
        assert_eq!(st.reader.read().await, None);
        assert!(st.writer.is_reset());
        assert!(st.writer.write(b"x").await.is_err());
        // Data for a stream that does not exist is answered with a reset.
        out.clear();
        enc.encode(
            &Frame::Data {
                id: 9,
                flags: 0,
                data: Bytes::from_static(b"?"),
            },
            &mut out,
        )
        .expect("encode");
        b.write_all(&out).await.expect("write");
        loop {
            if let Some(f) = dec.decode(&mut inbuf).expect("decode") {
                if f == (Frame::RstStream {
                    id: 9,
                    status: INVALID_STREAM,
                }) {
                    break;
                }
                continue;
            }
            b.read_buf(&mut inbuf).await.expect("read");
        }
    }

    #[tokio::test]
    async fn a_connection_replies_routes_data_and_answers_pings() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut server = Connection::server(a);
        let mut client = Connection::client(b);
        let mut s = client
            .open(vec![("streamtype".into(), "stdout".into())])
            .await
            .expect("open");
        s.writer.write(b"ping?").await.expect("write");
        s.writer.close().await.expect("fin");
        let mut peer = server.incoming.recv().await.expect("a stream");
        assert_eq!(peer.header("streamType"), Some("stdout"));
        assert_eq!(peer.reader.read().await.as_deref(), Some(&b"ping?"[..]));
        assert_eq!(peer.reader.read().await, None);
        peer.writer.write(b"pong").await.expect("write");
        peer.writer.close().await.expect("fin");
        assert_eq!(s.reader.read().await.as_deref(), Some(&b"pong"[..]));
        assert_eq!(s.reader.read().await, None);
        server.close().await;
        client.closed().await;
    }
}
