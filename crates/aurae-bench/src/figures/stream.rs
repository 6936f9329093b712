//! Figure 4: output streaming. An executable writes N bytes (lines of 1 KiB)
//! and, separately, M short lines (`seq M`) to stdout; the client receives
//! everything through GetSubProcessStream and checks that nothing was lost.
//! Rates are timed from the first received line to the end of the stream
//! (the executable first sleeps 0.2 s so that the subscription is in place
//! before it writes; start-up is figures 1-2).
//!
//! The daemon keeps `--output-cap` bytes per channel (the benchmark's
//! daemon: 4 GiB, more than any load here writes); a reader that falls
//! behind by more gets, in place of the lines it missed, one line
//! `auraed: N stdout lines were rotated away …`: such a line is counted as
//! N lost lines and the row says so instead of "nothing lost".

use std::time::Instant;

use anyhow::{bail, Context as _};
use aurae_client::proto::observe::{GetSubProcessStreamRequest, LogChannelType};
use tokio::io::AsyncReadExt;

use super::{Ctx, Series};
use crate::{
    cells,
    report::{Better, Figure, Kind},
};

const LINE: usize = 1023;
const CELL: &str = "stream";

/// The decimal text of the next line `seq` writes, counted up in place:
/// checking a line is a comparison, not a parse (at tens of millions of
/// lines a second the check must not be what the row measures).
struct Decimal {
    /// The number `digits` spells.
    at: u64,
    digits: Vec<u8>,
}

impl Decimal {
    fn new() -> Self {
        Self {
            at: 1,
            digits: b"1".to_vec(),
        }
    }

    /// Whether `line` is `no` in decimal (lines are checked in order, so
    /// `no` is almost always one more than the last).
    fn matches(&mut self, no: u64, line: &[u8]) -> bool {
        if no != self.at {
            self.at = no;
            self.digits = no.to_string().into_bytes();
        }
        let ok = line == self.digits;
        self.at += 1;
        match self.digits.iter().rposition(|&d| d != b'9') {
            Some(i) => {
                self.digits[i] += 1;
                self.digits[i + 1..].fill(b'0');
            }
            None => {
                self.digits.fill(b'0');
                self.digits.insert(0, b'1');
            }
        }
        ok
    }
}

/// What came through, and whether it is exactly what was written.
struct Got {
    bytes: u64,
    lines: u64,
    secs: f64,
    bad: Option<String>,
    /// Lines the daemon said were rotated away, and its first such note.
    lost: u64,
    lost_note: Option<String>,
    expect: Decimal,
}

impl Got {
    fn new() -> Got {
        Got {
            bytes: 0,
            lines: 0,
            secs: 0.0,
            bad: None,
            lost: 0,
            lost_note: None,
            expect: Decimal::new(),
        }
    }
}

/// N of the daemon's note `auraed: N <channel> lines were rotated away …`,
/// sent in place of N lines a slow reader missed.
fn rotated_away(line: &str) -> Option<u64> {
    let (n, rest) = line.strip_prefix("auraed: ")?.split_once(' ')?;
    let (_channel, rest) = rest.split_once(' ')?;
    rest.starts_with("lines were rotated away")
        .then(|| n.parse().ok())
        .flatten()
}

enum Load {
    /// `n` lines of LINE 'x' characters.
    Bytes(u64),
    /// `seq n`.
    Lines(u64),
}

impl Load {
    fn command(&self) -> String {
        match self {
            Load::Bytes(n) => format!("yes {} | head -n {n}", "x".repeat(LINE)),
            Load::Lines(n) => format!("seq {n}"),
        }
    }
    fn expected(&self) -> (u64, u64) {
        match *self {
            Load::Bytes(n) => (n * (LINE as u64 + 1), n),
            Load::Lines(n) => ((1..=n).map(|k| digits(k) + 1).sum(), n),
        }
    }
    fn check(&self, got: &mut Got) {
        let (b, l) = self.expected();
        if got.lost > 0 {
            let also = got
                .bad
                .take()
                .map(|b| format!("; also {b}"))
                .unwrap_or_default();
            got.bad = Some(format!(
                "LOST: {} of {l} lines rotated away before the reader got to them; got {} lines / {} bytes; the daemon said: {:.120}{also}",
                got.lost,
                got.lines,
                got.bytes,
                got.lost_note.as_deref().unwrap_or_default()
            ));
        } else if got.bad.is_none() && (got.bytes != b || got.lines != l) {
            got.bad = Some(format!(
                "LOST: expected {l} lines / {b} bytes, got {} / {}",
                got.lines, got.bytes
            ));
        }
    }
}

fn digits(k: u64) -> u64 {
    k.checked_ilog10().map_or(1, |d| u64::from(d) + 1)
}

/// Lines per message the batched auraed row asks for
/// (`max_lines_per_message`, an API extension).
const BATCH: u32 = 1024;

/// How the client asks for its lines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One line per message (no extension field: upstream's behaviour).
    One,
    /// `max_lines_per_message` = BATCH: LogItems in `items`.
    Items,
    /// `line_blocks`: lines in one text per message (`block`).
    Blocks,
}

impl Got {
    /// Counts and checks one received line.
    fn line(&mut self, load: &Load, line: &str) {
        if let Some(n) = rotated_away(line) {
            self.lost += n;
            self.lost_note.get_or_insert_with(|| line.to_owned());
            return;
        }
        self.lines += 1;
        self.bytes += line.len() as u64 + 1;
        // Line numbers count the lost lines too.
        let no = self.lines + self.lost;
        let ok = match load {
            Load::Bytes(_) => line.len() == LINE,
            Load::Lines(_) => self.expect.matches(no, line.as_bytes()),
        };
        if !ok && self.bad.is_none() {
            self.bad = Some(format!("line {no} differs: {line:.80}"));
        }
    }

    fn bad(&mut self, why: impl FnOnce() -> String) {
        if self.bad.is_none() {
            self.bad = Some(why());
        }
    }
}

/// Through auraed: Start in a cell, then GetSubProcessStream(stdout) in
/// the given shape.
async fn via_auraed(ctx: &Ctx, load: &Load, exe: &str, shape: Shape) -> anyhow::Result<Got> {
    let cmd = format!("sleep 0.2; {}", load.command());
    let pid = cells::start(&ctx.client, CELL, exe, &cmd).await?;
    let r = async {
        let mut s = ctx
            .client
            .observe()
            .get_sub_process_stream(GetSubProcessStreamRequest {
                channel_type: LogChannelType::Stdout as i32,
                process_id: pid,
                max_lines_per_message: if shape == Shape::Items { BATCH } else { 0 },
                line_blocks: shape == Shape::Blocks,
            })
            .await
            .context("GetSubProcessStream")?
            .into_inner();
        let mut got = Got::new();
        let mut t0 = None;
        while let Some(m) = s.message().await.context("GetSubProcessStream")? {
            let t = *t0.get_or_insert_with(Instant::now);
            got.secs = t.elapsed().as_secs_f64();
            match shape {
                // `item` (an empty line if unset, as before).
                Shape::One => got.line(load, &m.item.map(|i| i.line).unwrap_or_default()),
                Shape::Items => {
                    if m.item.is_some() {
                        got.bad(|| "a batched response has `item` set".into());
                    }
                    for i in m.items {
                        got.line(load, &i.line);
                    }
                }
                Shape::Blocks => {
                    let Some(b) = m.block else {
                        got.bad(|| "a response without `block`".into());
                        continue;
                    };
                    let counted: u64 = b.line_counts.iter().map(|&n| u64::from(n)).sum();
                    if b.timestamps.len() != b.line_counts.len() || !b.text.ends_with('\n') {
                        got.bad(|| "a malformed block".into());
                    }
                    let before = got.lines + got.lost;
                    for line in b.text.split_terminator('\n') {
                        got.line(load, line);
                    }
                    // (A rotation note counts as the lines it stands for.)
                    let (lines, note) = (got.lines + got.lost - before, got.lost > 0);
                    if counted != lines && !note {
                        got.bad(|| format!("a block of {lines} lines with {counted} timestamps"));
                    }
                }
            }
        }
        load.check(&mut got);
        anyhow::Ok(got)
    }
    .await;
    cells::stop(&ctx.client, CELL, exe).await?;
    r
}

/// Reading a pipe from `cmd` (a local process, or `runc run`).
async fn via_pipe(mut cmd: tokio::process::Command, load: &Load) -> anyhow::Result<Got> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn")?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = Got::new();
    let mut t0 = None;
    loop {
        let n = out.read(&mut buf).await.context("read stdout")?;
        if n == 0 {
            break;
        }
        let t = *t0.get_or_insert_with(Instant::now);
        got.bytes += n as u64;
        got.lines += buf[..n].iter().filter(|&&c| c == b'\n').count() as u64;
        got.secs = t.elapsed().as_secs_f64();
    }
    let st = child.wait().await.context("wait")?;
    if !st.success() {
        bail!("{st}");
    }
    load.check(&mut got);
    Ok(got)
}

pub async fn figures(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let s = &ctx.settings;
    let loads = [
        Load::Bytes(s.stream_bytes / (LINE as u64 + 1)),
        Load::Lines(s.stream_lines),
    ];
    let mut figs = Vec::new();
    let cell_ok = match &ctx.observe {
        Ok(()) => cells::allocate(&ctx.client, CELL)
            .await
            .map_err(|e| format!("{e:#}")),
        Err(why) => Err(format!("GetSubProcessStream {why}")),
    };
    for (li, load) in loads.iter().enumerate() {
        let (unit, what, id, title) = match load {
            Load::Bytes(n) => (
                "MB/s",
                "bytes",
                "4a",
                format!(
                    "output streaming: {} MiB as {n} lines of 1 KiB on stdout → client",
                    s.stream_bytes >> 20
                ),
            ),
            Load::Lines(n) => (
                "lines/s",
                "lines",
                "4b",
                format!("output streaming: `seq {n}` ({n} short lines) on stdout → client"),
            ),
        };
        let mut f = Figure::new(id, &title, Better::Higher);
        let rate = |g: &Got| match load {
            Load::Bytes(_) => g.bytes as f64 / 1e6 / g.secs.max(1e-9),
            Load::Lines(_) => g.lines as f64 / g.secs.max(1e-9),
        };
        const SHAPES: [Shape; 3] = [Shape::One, Shape::Items, Shape::Blocks];
        let ns = SHAPES.len();
        let mut notes: Vec<Option<String>> = vec![None; ns + 1 + ctx.runtimes.len()];
        let ours = || match &cell_ok {
            Ok(()) => Series::default(),
            Err(e) => Series::failed(e.clone()),
        };
        let mut series: Vec<Series> = SHAPES.iter().map(|_| ours()).collect();
        series.push(Series::default());
        series.extend(ctx.oci_series());
        for run in 0..s.stream_runs {
            let (head, tail) = series.split_at_mut(ns);
            for (k, (ser, shape)) in head.iter_mut().zip(SHAPES).enumerate() {
                ser.sample(|| async {
                    let g = via_auraed(ctx, load, &format!("s{li}r{run}b{k}"), shape).await?;
                    notes[k] = g.bad.clone().or(notes[k].take());
                    Ok(rate(&g))
                })
                .await;
            }
            let mut local = tokio::process::Command::new("/bin/sh");
            local.arg("-c").arg(load.command());
            tail[0]
                .sample(|| async {
                    let g = via_pipe(local, load).await?;
                    notes[ns] = g.bad.clone().or(notes[ns].take());
                    Ok(rate(&g))
                })
                .await;
            for (i, (rt, ser)) in ctx.runtimes.iter().zip(tail[1..].iter_mut()).enumerate() {
                if let Ok(o) = &rt.oci {
                    ser.sample(|| async {
                        let b =
                            o.bundle(&format!("stream{li}"), &["/bin/sh", "-c", &load.command()])?;
                        let (cmd, _) = o.run_command(&b, false);
                        let g = via_pipe(cmd, load).await?;
                        notes[ns + 1 + i] = g.bad.clone().or(notes[ns + 1 + i].take());
                        Ok(rate(&g))
                    })
                    .await;
                }
            }
        }
        let mut it = series.into_iter();
        let mut rows = vec![
            it.next().unwrap_or_default().row(
                &format!("auraed_{what}"),
                "auraed: GetSubProcessStream(stdout)",
                Kind::Ours,
                unit,
            ),
            it.next().unwrap_or_default().row(
                &format!("auraed_batched_{what}"),
                &format!("auraed: GetSubProcessStream, batched (max_lines_per_message={BATCH})"),
                Kind::Ours,
                unit,
            ),
            it.next().unwrap_or_default().row(
                &format!("auraed_blocks_{what}"),
                "auraed: GetSubProcessStream, line blocks (line_blocks)",
                Kind::Ours,
                unit,
            ),
            it.next().unwrap_or_default().row(
                &format!("floor_{what}"),
                "floor: sh -c … | benchmark reads the pipe",
                Kind::Floor,
                unit,
            ),
        ];
        for (rt, ser) in ctx.runtimes.iter().zip(it) {
            rows.push(ser.row(
                &format!("{}_{what}", rt.name),
                &format!("{}: `run`, stdout piped to the benchmark", rt.label()),
                Kind::Baseline,
                unit,
            ));
        }
        // Every way of ours beside the floor (the table's ratio column
        // compares only the first row of ours).
        let p50 = |id: &str| {
            rows.iter()
                .find(|r| r.id == id)
                .and_then(|r| r.stats.as_ref())
                .map(|s| s.p50)
        };
        if let Some(floor) = p50(&format!("floor_{what}")).filter(|&f| f > 0.0) {
            let each: Vec<String> = [
                ("one per message", ""),
                ("batched", "batched_"),
                ("line blocks", "blocks_"),
            ]
            .iter()
            .filter_map(|(label, id)| {
                p50(&format!("auraed_{id}{what}")).map(|p| format!("{label} {:.2}×", p / floor))
            })
            .collect();
            f.note(format!("auraed ÷ floor (p50): {}", each.join(", ")));
        }
        for (r, n) in rows.into_iter().zip(notes) {
            f.row(match (n, r.stats.is_some()) {
                (Some(n), true) => r.with_note(n),
                (None, true) => r.with_note("nothing lost (line count and bytes checked)"),
                (_, false) => r,
            });
        }
        f.note("rates from the first received line to the end of the stream");
        f.note("auraed and the floor run the host's dash + coreutils; runc/crun run busybox's sh, yes, head, seq inside the rootfs");
        figs.push(f.finish());
    }
    if cell_ok.is_ok() {
        cells::free(&ctx.client, CELL).await?;
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_daemons_rotation_note() {
        assert_eq!(
            rotated_away(
                "auraed: 7340 stdout lines were rotated away before this reader got to them \
                 (kept per channel: see --output-cap)"
            ),
            Some(7340)
        );
        assert_eq!(
            rotated_away("auraed: x stdout lines were rotated away"),
            None
        );
        assert_eq!(rotated_away("12345"), None);
        assert_eq!(rotated_away(&"x".repeat(LINE)), None);
    }

    #[test]
    fn decimal_counts_like_seq() {
        let mut d = Decimal::new();
        for n in 1..=100_500u64 {
            assert!(d.matches(n, n.to_string().as_bytes()), "{n}");
        }
        assert!(!d.matches(100_501, b"100500"));
        // After a gap (lost lines) it follows the number it is given.
        assert!(d.matches(999_999, b"999999"));
        assert!(d.matches(1_000_000, b"1000000"));
        assert!(!d.matches(1_000_001, b"1000000"));
    }

    #[test]
    fn a_loss_is_reported_even_when_the_counts_add_up() {
        let load = Load::Lines(10);
        let mut got = Got::new();
        (got.lines, got.bytes, got.lost) = (7, 14, 3);
        got.lost_note = Some("auraed: 3 stdout lines were rotated away".into());
        load.check(&mut got);
        let bad = got.bad.unwrap_or_default();
        assert!(bad.starts_with("LOST: 3 of 10 lines"), "{bad}");

        let mut clean = Got::new();
        (clean.bytes, clean.lines) = load.expected();
        load.check(&mut clean);
        assert!(clean.bad.is_none());
    }
}
