//! Request validation: every field is checked before anything touches the
//! kernel, and every refusal names the field.

use std::fmt;

use aurae_proto::cells::Cell;

use crate::host::cgroup::Limits;

/// Refused input: `INVALID_ARGUMENT` naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field} {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

pub const MAX_COMPONENT: usize = 63;
pub const MAX_EXECUTABLE_NAME: usize = 255;
pub const CPU_WEIGHT_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000;
/// The kernel's limits on the CFS period and the smallest quota (µs).
pub const CPU_PERIOD_RANGE: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
pub const CPU_MIN_QUOTA: i64 = 1_000;

/// A validated cell path: `a/b/c`, each component 1..=63 of `[A-Za-z0-9-]`,
/// not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellName(String);

impl CellName {
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Invalid> {
        if s.is_empty() {
            return Err(invalid(field, "must not be empty"));
        }
        for c in s.split('/') {
            if c.is_empty() || c.len() > MAX_COMPONENT {
                return Err(invalid(
                    field,
                    format!(
                        "{s:?}: each path component must be 1..={MAX_COMPONENT} characters, got {}",
                        c.len()
                    ),
                ));
            }
            if !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(invalid(
                    field,
                    format!("{s:?}: components may only contain A-Z, a-z, 0-9 and '-'"),
                ));
            }
            if c.starts_with('-') || c.ends_with('-') {
                return Err(invalid(
                    field,
                    format!("{s:?}: components must not start or end with '-'"),
                ));
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn components(&self) -> Vec<&str> {
        self.0.split('/').collect()
    }
    pub fn parent(&self) -> Option<CellName> {
        self.0.rsplit_once('/').map(|(p, _)| CellName(p.to_owned()))
    }
    /// The last component: the hostname of an isolated cell.
    pub fn leaf(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
    pub fn is_descendant_of(&self, other: &CellName) -> bool {
        self.0.len() > other.0.len()
            && self.0.starts_with(&other.0)
            && self.0.as_bytes()[other.0.len()] == b'/'
    }
    pub fn depth(&self) -> usize {
        self.0.matches('/').count()
    }
}

impl fmt::Display for CellName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An executable's name: 1..=255 printable characters.
pub fn executable_name(field: &'static str, s: &str) -> Result<String, Invalid> {
    let n = s.chars().count();
    if n == 0 || n > MAX_EXECUTABLE_NAME {
        return Err(invalid(
            field,
            format!("must be 1..={MAX_EXECUTABLE_NAME} characters, got {n}"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{s:?} contains a control character"),
        ));
    }
    Ok(s.to_owned())
}

/// A cpuset list: `0-3,5`, ascending ranges.
pub fn cpuset_list(field: &'static str, s: &str) -> Result<(), Invalid> {
    let bad = || invalid(field, format!("{s:?} is not a list like \"0-3,5\""));
    if s.is_empty() {
        return Err(bad());
    }
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |x: &str| {
            (!x.is_empty() && x.bytes().all(|c| c.is_ascii_digit()))
                .then(|| x.parse::<u32>().ok())
                .flatten()
                .ok_or_else(bad)
        };
        if num(a)? > num(b)? {
            return Err(invalid(field, format!("{s:?}: range {part} is descending")));
        }
    }
    Ok(())
}

/// Checks the cell's limits and turns them into cgroup terms.
pub fn limits(cell: &Cell) -> Result<Limits, Invalid> {
    let mut l = Limits::default();
    if let Some(cpu) = &cell.cpu {
        if let Some(w) = cpu.weight {
            if !CPU_WEIGHT_RANGE.contains(&w) {
                return Err(invalid(
                    "cell.cpu.weight",
                    format!("must be 1..=10000, got {w}"),
                ));
            }
        }
        if let Some(p) = cpu.period {
            if !CPU_PERIOD_RANGE.contains(&p) {
                return Err(invalid(
                    "cell.cpu.period",
                    format!("must be 1000..=1000000 (µs), got {p}"),
                ));
            }
        }
        if let Some(m) = cpu.max {
            if m < CPU_MIN_QUOTA {
                return Err(invalid(
                    "cell.cpu.max",
                    format!("must be >= {CPU_MIN_QUOTA} (µs per period; the kernel's smallest quota), got {m}"),
                ));
            }
        }
        if cpu.period.is_some() && cpu.max.is_none() {
            return Err(invalid(
                "cell.cpu.period",
                "needs cell.cpu.max (a period alone limits nothing)",
            ));
        }
        (l.cpu_weight, l.cpu_max, l.cpu_period) = (cpu.weight, cpu.max, cpu.period);
    }
    if let Some(cs) = &cell.cpuset {
        if let Some(c) = &cs.cpus {
            cpuset_list("cell.cpuset.cpus", c)?;
        }
        if let Some(m) = &cs.mems {
            cpuset_list("cell.cpuset.mems", m)?;
        }
        (l.cpus, l.mems) = (cs.cpus.clone(), cs.mems.clone());
    }
    if let Some(m) = &cell.memory {
        let fields = [
            ("cell.memory.min", m.min),
            ("cell.memory.low", m.low),
            ("cell.memory.high", m.high),
            ("cell.memory.max", m.max),
        ];
        for (field, v) in fields {
            if let Some(v) = v.filter(|v| *v < 0) {
                return Err(invalid(field, format!("must be >= 0, got {v}")));
            }
        }
        // Protections must not exceed limits: min <= low <= high <= max.
        for (i, (fa, a)) in fields.iter().enumerate() {
            for (fb, b) in &fields[i + 1..] {
                if let (Some(a), Some(b)) = (a, b) {
                    if a > b {
                        return Err(invalid(fa, format!("({a}) must not exceed {fb} ({b})")));
                    }
                }
            }
        }
        (l.mem_min, l.mem_low, l.mem_high, l.mem_max) = (m.min, m.low, m.high, m.max);
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aurae_proto::cells::{CpuController, MemoryController};

    #[test]
    fn cell_names() {
        for ok in ["a", "a/b/c", "A-9", &"x".repeat(63)] {
            CellName::parse("cell.name", ok).unwrap();
        }
        for bad in [
            "",
            "a_b",
            "-a",
            "a-",
            "a/../b",
            "a//b",
            "/a",
            "a/",
            "a b",
            "ä",
            &"x".repeat(64),
            "a/.",
        ] {
            let e = CellName::parse("cell.name", bad).unwrap_err();
            assert_eq!(e.field, "cell.name", "{bad}");
        }
        let n = CellName::parse("f", "a/b/c").unwrap();
        assert_eq!(n.leaf(), "c");
        assert_eq!(n.parent().unwrap().as_str(), "a/b");
        assert!(n.is_descendant_of(&CellName::parse("f", "a").unwrap()));
        assert!(!CellName::parse("f", "ab")
            .unwrap()
            .is_descendant_of(&CellName::parse("f", "a").unwrap()));
    }

    #[test]
    fn cpusets() {
        for ok in ["0", "0-3,5", "1,2,3", "0-0"] {
            cpuset_list("f", ok).unwrap();
        }
        for bad in ["", "1..3", "3-1", "a", "1,", "-1", "1-", "0x1"] {
            cpuset_list("f", bad).unwrap_err();
        }
    }

    #[test]
    fn limits_are_checked() {
        let cpu = |weight, max, period| Cell {
            cpu: Some(CpuController {
                weight,
                max,
                period,
            }),
            ..Default::default()
        };
        assert_eq!(
            limits(&cpu(Some(0), None, None)).unwrap_err().field,
            "cell.cpu.weight"
        );
        assert_eq!(
            limits(&cpu(Some(10_001), None, None)).unwrap_err().field,
            "cell.cpu.weight"
        );
        assert_eq!(
            limits(&cpu(None, Some(-1), None)).unwrap_err().field,
            "cell.cpu.max"
        );
        assert_eq!(
            limits(&cpu(None, Some(5000), Some(10))).unwrap_err().field,
            "cell.cpu.period"
        );
        assert!(limits(&cpu(Some(100), Some(50_000), Some(100_000))).is_ok());
        let mem = |min, low, high, max| Cell {
            memory: Some(MemoryController {
                min,
                low,
                high,
                max,
            }),
            ..Default::default()
        };
        assert_eq!(
            limits(&mem(None, None, None, Some(-5))).unwrap_err().field,
            "cell.memory.max"
        );
        assert_eq!(
            limits(&mem(None, Some(10), None, Some(5)))
                .unwrap_err()
                .field,
            "cell.memory.low"
        );
        assert!(limits(&mem(Some(1), Some(2), Some(3), Some(4))).is_ok());
    }

    #[test]
    fn executable_names() {
        executable_name("f", "sleeper 1").unwrap();
        executable_name("f", "").unwrap_err();
        executable_name("f", "a\nb").unwrap_err();
        executable_name("f", &"x".repeat(256)).unwrap_err();
    }
}
