//! The figures as data (the JSON shape, see README "Benchmark") and as a
//! printed table.

use std::{fmt::Write as _, path::Path, time::SystemTime};

use serde::Serialize;

use crate::stats::Stats;

/// Bumped whenever a field changes meaning or disappears.
pub const SCHEMA: &str = "aurae-bench/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Measured through auraed.
    Ours,
    /// The kernel work alone, done by the benchmark itself.
    Floor,
    /// Another runtime (runc, crun).
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub label: String,
    pub kind: Kind,
    pub unit: String,
    /// None when the row could not be measured; `unavailable` says why.
    pub stats: Option<Stats>,
    pub unavailable: Option<String>,
    pub note: Option<String>,
}

impl Row {
    pub fn measured(id: &str, label: &str, kind: Kind, unit: &str, samples: &[f64]) -> Row {
        let stats = Stats::of(samples);
        Row {
            id: id.into(),
            label: label.into(),
            kind,
            unit: unit.into(),
            unavailable: stats.is_none().then(|| "no samples".to_owned()),
            stats,
            note: None,
        }
    }

    pub fn unavailable(id: &str, label: &str, kind: Kind, unit: &str, why: &str) -> Row {
        Row {
            id: id.into(),
            label: label.into(),
            kind,
            unit: unit.into(),
            stats: None,
            unavailable: Some(why.into()),
            note: None,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }
}

/// `ours` p50 ÷ `baseline` p50, both rows of the same figure and unit.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub ours: String,
    pub baseline: String,
    pub p50_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub id: String,
    pub title: String,
    pub better: Better,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub notes: Vec<String>,
}

impl Figure {
    pub fn new(id: &str, title: &str, better: Better) -> Figure {
        Figure {
            id: id.into(),
            title: title.into(),
            better,
            rows: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, r: Row) -> &mut Self {
        self.rows.push(r);
        self
    }

    pub fn note(&mut self, n: impl Into<String>) -> &mut Self {
        self.notes.push(n.into());
        self
    }

    /// Ratios of the first measured `ours` row to every measured
    /// floor/baseline row with the same unit.
    pub fn finish(mut self) -> Figure {
        let ours = self
            .rows
            .iter()
            .find(|r| r.kind == Kind::Ours && r.stats.is_some())
            .cloned();
        if let Some(o) = ours {
            let op50 = o.stats.map_or(f64::NAN, |s| s.p50);
            self.ratios = self
                .rows
                .iter()
                .filter(|r| r.kind != Kind::Ours && r.unit == o.unit)
                .filter_map(|r| {
                    let b = r.stats?.p50;
                    (b > 0.0).then(|| Ratio {
                        ours: o.id.clone(),
                        baseline: r.id.clone(),
                        p50_ratio: op50 / b,
                    })
                })
                .collect();
        }
        self
    }

    /// A figure that could not be measured at all.
    pub fn failed(id: &str, title: &str, better: Better, e: &anyhow::Error) -> Figure {
        let mut f = Figure::new(id, title, better);
        f.row(Row::unavailable(
            "auraed",
            "auraed",
            Kind::Ours,
            "",
            &format!("{e:#}"),
        ));
        f
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cgroups: String,
    pub mem_total_mib: u64,
    /// Where the daemons' state and the OCI bundles are (a tmpfs when
    /// there is one, as /run is on real hosts).
    pub state_dir: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub runs: usize,
    pub cells: usize,
    pub throughput_window_secs: f64,
    pub throughput_windows: usize,
    pub stream_bytes: u64,
    pub stream_lines: u64,
    pub stream_runs: usize,
    pub startups: usize,
    pub exit_detection: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub date: String,
    pub machine: Machine,
    pub settings: Settings,
    pub versions: Vec<(String, String)>,
    pub figures: Vec<Figure>,
    /// Set when the run was cut short (Ctrl-C or a fatal error).
    pub incomplete: Option<String>,
}

impl Report {
    /// A row of ours could not be measured, stopped early, or saw output
    /// lost or garbled.
    pub fn ours_failed(&self) -> bool {
        self.figures
            .iter()
            .flat_map(|f| &f.rows)
            .filter(|r| r.kind == Kind::Ours)
            .any(|r| {
                r.stats.is_none()
                    || r.note
                        .as_deref()
                        .is_some_and(|n| !n.starts_with("nothing lost"))
            })
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "aurae-bench {}  |  {} vCPU, kernel {}, {}, {} MiB RAM  |  {}",
            self.date, m.cpus, m.kernel, m.cgroups, m.mem_total_mib, self.settings.exit_detection
        );
        if !m.state_dir.is_empty() {
            let _ = writeln!(s, "  state: {}", m.state_dir);
        }
        for (what, v) in &self.versions {
            let _ = writeln!(s, "  {what}: {v}");
        }
        for f in &self.figures {
            let better = match f.better {
                Better::Lower => "lower is better",
                Better::Higher => "higher is better",
            };
            let _ = writeln!(s, "\n{} — {} ({better})", f.id, f.title);
            // The label column: 60 wide, or as wide as the longest label.
            let w = f
                .rows
                .iter()
                .map(|r| r.label.chars().count())
                .max()
                .unwrap_or(0)
                .max(60);
            let _ = writeln!(
                s,
                "  {:<w$} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}  ours÷row",
                "row", "unit", "n", "min", "p50", "p99", "max"
            );
            for r in &f.rows {
                let ratio = f
                    .ratios
                    .iter()
                    .find(|x| x.baseline == r.id)
                    .map(|x| format!("{:.2}×", x.p50_ratio))
                    .unwrap_or_default();
                match (&r.stats, &r.unavailable) {
                    (Some(st), _) => {
                        let _ = writeln!(
                            s,
                            "  {:<w$} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}  {ratio}",
                            r.label,
                            r.unit,
                            st.n,
                            num(st.min),
                            num(st.p50),
                            num(st.p99),
                            num(st.max)
                        );
                    }
                    (None, why) => {
                        let _ = writeln!(
                            s,
                            "  {:<w$} not available: {}",
                            r.label,
                            why.as_deref().unwrap_or("unknown")
                        );
                    }
                }
                if let Some(n) = &r.note {
                    let _ = writeln!(s, "  {:<w$}   ({n})", "");
                }
            }
            for n in &f.notes {
                let _ = writeln!(s, "  note: {n}");
            }
        }
        if let Some(why) = &self.incomplete {
            let _ = writeln!(s, "\nINCOMPLETE RUN: {why}");
        }
        s
    }
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 10_000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Now, UTC, as `YYYY-MM-DD HH:MM:SS` (civil-from-days, no date crate).
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_compare_first_ours_row_with_same_unit() {
        let mut f = Figure::new("f", "t", Better::Lower);
        f.row(Row::measured("a", "a", Kind::Ours, "ms", &[10.0]))
            .row(Row::measured("b", "b", Kind::Floor, "ms", &[2.0]))
            .row(Row::measured("c", "c", Kind::Baseline, "MiB", &[5.0]))
            .row(Row::unavailable("d", "d", Kind::Baseline, "ms", "nope"));
        let f = f.finish();
        assert_eq!(f.ratios.len(), 1);
        assert_eq!(f.ratios[0].baseline, "b");
        assert_eq!(f.ratios[0].p50_ratio, 5.0);
    }
}
