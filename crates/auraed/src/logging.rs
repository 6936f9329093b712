//! Logging: one `tracing` subscriber writes human lines to stderr and feeds
//! the same lines to a [`LogBus`], from which `GetAuraeDaemonLogStream`
//! serves a bounded backlog and then live lines.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    io::IsTerminal,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::broadcast;
use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{
    filter::LevelFilter,
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    layer::Context,
    prelude::*,
    registry::LookupSpan,
    EnvFilter, Layer,
};

/// Lines a new subscriber receives first.
pub const LOG_BACKLOG: usize = 1000;
/// Live lines buffered per subscriber before it starts losing the oldest.
pub const LOG_CHANNEL_CAPACITY: usize = 4096;

/// One formatted daemon log line.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Nanoseconds since the Unix epoch.
    pub timestamp: i64,
    pub line: String,
}

/// Fan-out of the daemon's log lines with a bounded backlog.
#[derive(Debug)]
pub struct LogBus {
    backlog: Mutex<VecDeque<LogLine>>,
    live: broadcast::Sender<LogLine>,
}

impl LogBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            backlog: Mutex::new(VecDeque::with_capacity(LOG_BACKLOG)),
            live: broadcast::channel(LOG_CHANNEL_CAPACITY).0,
        })
    }

    pub fn publish(&self, line: LogLine) {
        // The backlog lock is held while sending so that a subscriber taken
        // under the same lock sees every line exactly once.
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        if backlog.len() == LOG_BACKLOG {
            backlog.pop_front();
        }
        backlog.push_back(line.clone());
        let _ = self.live.send(line);
    }

    /// The current backlog and a receiver for every later line.
    pub fn subscribe(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        (backlog.iter().cloned().collect(), self.live.subscribe())
    }
}

/// Installs the global subscriber (stderr + bus) and returns the bus.
/// RUST_LOG, when set, overrides `level`.
pub fn init(level: Level) -> Arc<LogBus> {
    let bus = LogBus::new();
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::from_level(level).into())
        .from_env_lossy();
    // Under systemd, stderr is the journal: each line starts with its
    // syslog priority (`<3>` for errors, see sd-daemon(3)), which journald
    // strips and stores as PRIORITY (`journalctl -p warning` works), and
    // carries no timestamp (the journal stamps every line itself).
    let journal = crate::systemd::stderr_is_journal();
    let plain = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour codes only for a person at a terminal, never in a
            // file, a pipe or the journal.
            .with_ansi(std::io::stderr().is_terminal())
    });
    let journald = journal.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JournalPrefix(
                tracing_subscriber::fmt::format().without_time(),
            ))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(journald)
        .with(BusLayer(bus.clone()))
        .try_init();
    bus
}

/// The syslog priority of a level: err, warning, info, debug (journald
/// reads it from a `<N>` prefix).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Puts `<N>` (the syslog priority) before each line of an event format.
struct JournalPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

struct BusLayer(Arc<LogBus>);

impl<S: Subscriber> Layer<S> for BusLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut v = LineVisitor(String::new(), String::new());
        event.record(&mut v);
        let mut line = format!("{:>5} {}: {}", meta.level(), meta.target(), v.0);
        line.push_str(&v.1);
        self.0.publish(LogLine {
            timestamp: now_nanos(),
            line,
        });
    }
}

/// Collects the message and the other fields (`key=value`) of an event.
struct LineVisitor(String, String);

impl tracing::field::Visit for LineVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value}", field.name());
        }
    }
}

pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
