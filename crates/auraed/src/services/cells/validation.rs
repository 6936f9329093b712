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
/// Cell names nest at most this deep (`a/b/...`, 16 components). `List`
/// answers a recursive message (`CellGraphNode.children`), one level of
/// protobuf nesting per cell level plus a few for the envelope; prost's
/// and grpcio's decoders stop at 100, so a cap far below keeps `List`
/// decodable by every client.
pub const MAX_DEPTH: usize = 16;
/// A whole cell name is at most this many bytes, `/` included. The binding
/// bound is the state record `<runtime-dir>/state/cells/<name, / as .>.json`,
/// written through `.<file>.tmp`: 240 + 10 stays below NAME_MAX (255).
/// The cgroup paths (`<hierarchy>/<root>/<name>/_exec/cgroup.procs`) then
/// stay far below PATH_MAX (4096).
pub const MAX_CELL_NAME: usize = 240;
/// Components that are, or could become, a cgroup control file in some
/// hierarchy; a cell directory of that name could not be made. Control
/// files are `cgroup.*` and `<controller>.*` (a dot cannot occur in a cell
/// name) except, in cgroup v1, the core files `tasks`, `notify_on_release`
/// and `release_agent` and, when the cpuset hierarchy is mounted with
/// `noprefix`, cpuset's files without their `cpuset.` prefix (`cpus`,
/// `mems`, `cpu_exclusive`, `effective_cpus`, ...). Names with `_` cannot
/// occur either, which leaves `tasks`, `cpus` and `mems`. `auraed` is the
/// leaf the daemon moves itself into on pure v2 (`host::cgroup`).
pub const RESERVED_COMPONENTS: [&str; 4] = ["tasks", "cpus", "mems", "auraed"];
pub const MAX_EXECUTABLE_NAME: usize = 255;
/// The longest command, in bytes. It is one argv string of the shim and of
/// `/bin/sh -c`: the kernel refuses a single argument of MAX_ARG_STRLEN
/// (32 pages = 128 KiB with 4 KiB pages, its terminating NUL included)
/// with E2BIG.
pub const MAX_COMMAND: usize = 128 * 1024 - 1;
/// `(uid_t)-1` / `(gid_t)-1`: "no change" to setresuid(2), refused by
/// setuid(2)/setgid(2) with EINVAL.
pub const INVALID_ID: u32 = u32::MAX;
pub const CPU_WEIGHT_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000;
/// The kernel's limits on the CFS period and the smallest quota (µs).
pub const CPU_PERIOD_RANGE: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
pub const CPU_MIN_QUOTA: i64 = 1_000;
/// The largest CFS quota (µs): kernel/sched/core.c refuses a quota above
/// `max_cfs_runtime = MAX_BW * NSEC_PER_USEC` ns with EINVAL, where
/// `MAX_BW = (1ULL << (64 - BW_SHIFT)) - 1` and `BW_SHIFT = 20`: 2^44 - 1 µs
/// (more than 203 days per period).
pub const CPU_MAX_QUOTA: i64 = (1 << 44) - 1;

/// A validated cell path: `a/b/c`, each component 1..=63 of `[A-Za-z0-9-]`,
/// not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellName(String);

impl CellName {
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Invalid> {
        if s.is_empty() {
            return Err(invalid(field, "must not be empty"));
        }
        if s.len() > MAX_CELL_NAME {
            return Err(invalid(
                field,
                format!(
                    "must be at most {MAX_CELL_NAME} bytes in all, got {}",
                    s.len()
                ),
            ));
        }
        let depth = s.split('/').count();
        if depth > MAX_DEPTH {
            return Err(invalid(
                field,
                format!("cells nest at most {MAX_DEPTH} levels deep, got {depth}"),
            ));
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
            if RESERVED_COMPONENTS.contains(&c) {
                return Err(invalid(
                    field,
                    format!(
                        "{s:?}: {c:?} is reserved (a cgroup control file or the daemon's own cgroup); reserved: {}",
                        RESERVED_COMPONENTS.join(", ")
                    ),
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

/// An executable's command: not blank, no NUL byte (it could not be an
/// argument), at most [`MAX_COMMAND`] bytes.
pub fn command(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > MAX_COMMAND {
        return Err(invalid(
            field,
            format!(
                "must be at most {MAX_COMMAND} bytes (the kernel's limit on one argument), got {}",
                s.len()
            ),
        ));
    }
    if let Some(at) = s.find('\0') {
        return Err(invalid(
            field,
            format!("contains a NUL byte (at byte {at})"),
        ));
    }
    Ok(())
}

/// A uid or gid to run as: any but `(uid_t)-1`.
pub fn id(field: &'static str, v: Option<u32>) -> Result<Option<u32>, Invalid> {
    if v == Some(INVALID_ID) {
        return Err(invalid(
            field,
            format!(
                "must be 0..={}, got {INVALID_ID} ((uid_t)-1 is not an id)",
                INVALID_ID - 1
            ),
        ));
    }
    Ok(v)
}

/// A cpuset list: `0-3,5`, ascending ranges.
pub fn cpuset_list(field: &'static str, s: &str) -> Result<(), Invalid> {
    cpuset_ranges(field, s).map(|_| ())
}

/// The ranges of a cpuset list, as written.
fn cpuset_ranges(field: &'static str, s: &str) -> Result<Vec<(u32, u32)>, Invalid> {
    let bad = || invalid(field, format!("{s:?} is not a list like \"0-3,5\""));
    if s.is_empty() {
        return Err(bad());
    }
    let mut ranges = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |x: &str| {
            (!x.is_empty() && x.bytes().all(|c| c.is_ascii_digit()))
                .then(|| x.parse::<u32>().ok())
                .flatten()
                .ok_or_else(bad)
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(invalid(field, format!("{s:?}: range {part} is descending")));
        }
        ranges.push((a, b));
    }
    Ok(ranges)
}

/// A cpuset list must lie within what the parent has (`available`, the
/// parent cgroup's effective list as the kernel prints it; empty: none).
pub fn cpuset_within(field: &'static str, s: &str, available: &str) -> Result<(), Invalid> {
    let wanted = cpuset_ranges(field, s)?;
    let mut have = if available.trim().is_empty() {
        Vec::new()
    } else {
        // The kernel's own text; unparsable would be a kernel surprise:
        // leave the check to the kernel then.
        match cpuset_ranges(field, available.trim()) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        }
    };
    have.sort_unstable();
    // Merge adjacent and overlapping ranges.
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (a, b) in have {
        match merged.last_mut() {
            Some(last) if u64::from(a) <= u64::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    for (a, b) in wanted {
        if !merged.iter().any(|&(x, y)| x <= a && b <= y) {
            let avail = if available.trim().is_empty() {
                "none".to_owned()
            } else {
                format!("{:?}", available.trim())
            };
            let part = if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            };
            return Err(invalid(
                field,
                format!("{s:?}: {part} is not available to this cell; its parent has {avail}"),
            ));
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
            if m > CPU_MAX_QUOTA {
                return Err(invalid(
                    "cell.cpu.max",
                    format!("must be <= {CPU_MAX_QUOTA} (µs per period; the kernel's largest quota, 2^44-1), got {m}"),
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

    #[test]
    fn reserved_deep_and_long_names_are_refused() {
        for bad in ["tasks", "a/tasks", "cpus/x", "a/mems", "auraed"] {
            let e = CellName::parse("cell.name", bad).unwrap_err();
            assert!(e.reason.contains("reserved"), "{bad}: {e}");
        }
        for ok in ["Tasks", "task", "tasks-1", "cpu", "memory", "cgroup"] {
            CellName::parse("cell.name", ok).unwrap();
        }
        let deep = |n: usize, len: usize| vec!["x".repeat(len); n].join("/");
        CellName::parse("cell.name", &deep(MAX_DEPTH, 1)).unwrap();
        let e = CellName::parse("cell.name", &deep(MAX_DEPTH + 1, 1)).unwrap_err();
        assert!(e.reason.contains("16 levels"), "{e}");
        // 3 x 63 + 2 = 191 fits; 4 x 63 + 3 = 255 does not.
        CellName::parse("cell.name", &deep(3, 63)).unwrap();
        let e = CellName::parse("cell.name", &deep(4, 63)).unwrap_err();
        assert!(e.reason.contains("240 bytes"), "{e}");
        let e = CellName::parse("cell.name", &deep(64, 63)).unwrap_err();
        assert_eq!(e.field, "cell.name");
    }

    #[test]
    fn commands_and_ids() {
        command("executable.command", "sleep 1").unwrap();
        command("executable.command", &"x".repeat(MAX_COMMAND)).unwrap();
        for bad in [
            "",
            "  ",
            "a\0b",
            &"x".repeat(MAX_COMMAND + 1),
            &"x".repeat(1 << 20),
        ] {
            let e = command("executable.command", bad).unwrap_err();
            assert_eq!(e.field, "executable.command");
        }
        assert_eq!(id("uid", Some(0)).unwrap(), Some(0));
        assert_eq!(id("uid", None).unwrap(), None);
        assert_eq!(id("gid", Some(u32::MAX - 1)).unwrap(), Some(u32::MAX - 1));
        assert_eq!(id("uid", Some(u32::MAX)).unwrap_err().field, "uid");
    }

    #[test]
    fn cpu_max_is_bounded_by_the_kernel() {
        let max = |m| Cell {
            cpu: Some(CpuController {
                max: Some(m),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(limits(&max(CPU_MAX_QUOTA)).is_ok());
        for bad in [CPU_MAX_QUOTA + 1, 1 << 50, i64::MAX] {
            let e = limits(&max(bad)).unwrap_err();
            assert_eq!(e.field, "cell.cpu.max");
            assert!(e.reason.contains("17592186044415"), "{e}");
        }
    }

    #[test]
    fn cpusets_within_the_parent() {
        let f = "cell.cpuset.cpus";
        cpuset_within(f, "0", "0-1").unwrap();
        cpuset_within(f, "0-1", "0-1").unwrap();
        cpuset_within(f, "0-3", "0-1,2-3").unwrap();
        cpuset_within(f, "1,3", "0-1,3").unwrap();
        cpuset_within(f, "0", "garbage").unwrap();
        for (bad, avail) in [
            ("5", "0-1"),
            ("0-99999", "0-1"),
            ("4294967295", "0-1"),
            ("2", "0-1,3"),
            ("0-3", "0-1,3"),
            ("0", ""),
            ("7", "0"),
        ] {
            let e = cpuset_within(f, bad, avail).unwrap_err();
            assert_eq!(e.field, f);
            assert!(e.reason.contains("not available"), "{bad}: {e}");
        }
        let e = cpuset_within("cell.cpuset.mems", "7", "0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cell.cpuset.mems \"7\": 7 is not available to this cell; its parent has \"0\""
        );
    }

    mod property {
        use super::*;
        use aurae_proto::cells::CpusetController;
        use proptest::prelude::*;

        /// Strings from an alphabet that hits every rule: valid characters,
        /// separators, characters that are never valid, NUL, non-ASCII.
        fn text(max: usize) -> impl Strategy<Value = String> {
            let chars = prop_oneof![
                8 => proptest::char::range('a', 'z'),
                2 => Just('-'),
                2 => Just('/'),
                1 => proptest::char::range('0', '9'),
                1 => prop::sample::select(vec!['_', '.', ' ', '\0', '\n', 'ä', ',', 'A']),
            ];
            prop::collection::vec(chars, 0..max).prop_map(|v| v.into_iter().collect())
        }

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                text(80),
                prop::sample::select(vec!["tasks", "cpus", "mems", "auraed", "a/tasks"])
                    .prop_map(str::to_owned),
                (1usize..70, 1usize..70).prop_map(|(n, len)| vec!["y".repeat(len); n].join("/")),
            ]
        }

        fn edge_i64() -> impl Strategy<Value = i64> {
            prop_oneof![
                any::<i64>(),
                prop::sample::select(vec![
                    -1,
                    0,
                    999,
                    1000,
                    CPU_MAX_QUOTA,
                    CPU_MAX_QUOTA + 1,
                    1 << 50,
                    i64::MAX,
                    i64::MIN
                ]),
            ]
        }

        fn edge_u64() -> impl Strategy<Value = u64> {
            prop_oneof![
                any::<u64>(),
                prop::sample::select(vec![
                    0,
                    1,
                    999,
                    1000,
                    10_000,
                    10_001,
                    1_000_000,
                    1_000_001,
                    u64::MAX
                ]),
            ]
        }

        fn cpuset() -> impl Strategy<Value = String> {
            prop_oneof![
                text(12),
                prop::sample::select(vec![
                    "0",
                    "0-1",
                    "5",
                    "0-99999",
                    "4294967295",
                    "7",
                    "1-0",
                    ""
                ])
                .prop_map(str::to_owned),
                prop::collection::vec((0u32..8, 0u32..8), 1..4).prop_map(|v| v
                    .iter()
                    .map(|(a, b)| if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    })
                    .collect::<Vec<_>>()
                    .join(",")),
            ]
        }

        prop_compose! {
            fn cell()(
                name in name(),
                cpu in proptest::option::of((
                    proptest::option::of(edge_u64()),
                    proptest::option::of(edge_i64()),
                    proptest::option::of(edge_u64()),
                )),
                cs in proptest::option::of((proptest::option::of(cpuset()), proptest::option::of(cpuset()))),
                mem in proptest::option::of(proptest::collection::vec(proptest::option::of(edge_i64()), 4)),
            ) -> Cell {
                Cell {
                    name,
                    cpu: cpu.map(|(weight, max, period)| CpuController { weight, max, period }),
                    cpuset: cs.map(|(cpus, mems)| CpusetController { cpus, mems }),
                    memory: mem.map(|m| MemoryController { min: m[0], low: m[1], high: m[2], max: m[3] }),
                    ..Default::default()
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn cells_are_accepted_only_within_bounds(c in cell(), avail in cpuset()) {
                match CellName::parse("cell.name", &c.name) {
                    Ok(n) => {
                        prop_assert!(n.as_str().len() <= MAX_CELL_NAME);
                        prop_assert!(n.components().len() <= MAX_DEPTH);
                        for comp in n.components() {
                            prop_assert!(!RESERVED_COMPONENTS.contains(&comp));
                            prop_assert!((1..=MAX_COMPONENT).contains(&comp.len()));
                            prop_assert!(comp.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
                        }
                    }
                    Err(e) => prop_assert_eq!(e.field, "cell.name"),
                }
                match limits(&c) {
                    Ok(l) => {
                        if let Some(m) = l.cpu_max {
                            prop_assert!((CPU_MIN_QUOTA..=CPU_MAX_QUOTA).contains(&m));
                        }
                        if let Some(p) = l.cpu_period {
                            prop_assert!(CPU_PERIOD_RANGE.contains(&p));
                        }
                        if let Some(w) = l.cpu_weight {
                            prop_assert!(CPU_WEIGHT_RANGE.contains(&w));
                        }
                        for v in [l.mem_min, l.mem_low, l.mem_high, l.mem_max].into_iter().flatten() {
                            prop_assert!(v >= 0);
                        }
                        for (f, v) in [("cell.cpuset.cpus", &l.cpus), ("cell.cpuset.mems", &l.mems)] {
                            if let Some(v) = v {
                                if let Err(e) = cpuset_within(f, v, &avail) {
                                    prop_assert_eq!(e.field, f);
                                }
                            }
                        }
                    }
                    Err(e) => prop_assert!(e.field.starts_with("cell."), "{}", e),
                }
            }

            #[test]
            fn commands_are_accepted_only_within_bounds(
                cmd in prop_oneof![
                    text(200),
                    (0usize..4, any::<bool>()).prop_map(|(k, nul)| {
                        let len = [MAX_COMMAND - 1, MAX_COMMAND, MAX_COMMAND + 1, 1 << 20][k];
                        let mut s = "x".repeat(len);
                        if nul { s.replace_range(len / 2..len / 2 + 1, "\0"); }
                        s
                    }),
                ],
                uid in proptest::option::of(prop_oneof![any::<u32>(), Just(u32::MAX)]),
                exe_name in text(300),
            ) {
                match command("executable.command", &cmd) {
                    Ok(()) => prop_assert!(cmd.len() <= MAX_COMMAND && !cmd.contains('\0') && !cmd.trim().is_empty()),
                    Err(e) => prop_assert_eq!(e.field, "executable.command"),
                }
                match id("uid", uid) {
                    Ok(v) => prop_assert!(v != Some(u32::MAX)),
                    Err(e) => prop_assert_eq!(e.field, "uid"),
                }
                if let Err(e) = executable_name("executable.name", &exe_name) {
                    prop_assert_eq!(e.field, "executable.name");
                }
            }
        }
    }
}
