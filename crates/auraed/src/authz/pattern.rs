//! The two kinds of pattern a policy rule holds: gRPC methods
//! (`aurae.cells.v0.CellService/Start`, `aurae.observe.v0.ObserveService/*`,
//! `*`) and cell subtrees (`team-a`, `team-a/*`, `team-a/**`, `**`).

use std::fmt;

use crate::services::cells::validation::CellName;

/// A method pattern, checked against the methods the daemon serves when the
/// policy is loaded (see `methods.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodPattern {
    /// `*`: every method of every service.
    Any,
    /// `package.Service/*`: every method of one service.
    Service(String),
    /// `package.Service/Method`.
    Exact(String),
}

impl MethodPattern {
    /// Parses the syntax only; whether the service or method exists is
    /// the caller's check.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        let Some((service, method)) = s.split_once('/') else {
            return Err(format!(
                "method {s:?} must be \"package.Service/Method\", \"package.Service/*\" or \"*\""
            ));
        };
        let ident = |x: &str| {
            !x.is_empty()
                && x.split('.').all(|p| {
                    !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
        };
        if !ident(service) || service.contains('*') {
            return Err(format!("method {s:?}: {service:?} is not a service name"));
        }
        match method {
            "*" => Ok(Self::Service(service.to_owned())),
            m if ident(m) && !m.contains('.') => Ok(Self::Exact(s.to_owned())),
            m => Err(format!("method {s:?}: {m:?} is not a method name (or *)")),
        }
    }

    /// Whether it matches `method`, written `package.Service/Method`.
    pub fn matches(&self, method: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Service(s) => method
                .strip_prefix(s.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
            Self::Exact(m) => m == method,
        }
    }
}

impl fmt::Display for MethodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Service(s) => write!(f, "{s}/*"),
            Self::Exact(m) => f.write_str(m),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `*`: exactly one component.
    One,
    /// `**`: zero or more components.
    Any,
}

/// A pattern over cell names, component by component: a literal component,
/// `*` (exactly one component) or `**` (zero or more). So `team-a/**` is
/// the subtree rooted at `team-a`, the cell itself included; `team-a/*` its
/// children only; `team-a` the cell alone; `**` every cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellPattern {
    text: String,
    parts: Vec<Part>,
}

impl CellPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("a cell pattern must not be empty".into());
        }
        let mut parts = Vec::new();
        for c in s.split('/') {
            parts.push(match c {
                "*" => Part::One,
                "**" => Part::Any,
                _ if c.contains('*') => {
                    return Err(format!(
                        "cell pattern {s:?}: '*' must be a whole component (\"a/*\", \"a/**\")"
                    ))
                }
                _ => {
                    CellName::parse("cell pattern", c)
                        .map_err(|e| format!("cell pattern {s:?}: {}", e.reason))?;
                    Part::Literal(c.to_owned())
                }
            });
        }
        Ok(Self {
            text: s.to_owned(),
            parts,
        })
    }

    /// Whether `cell` (a cell's full name) matches.
    pub fn matches(&self, cell: &CellName) -> bool {
        fn go(p: &[Part], c: &[&str]) -> bool {
            match (p.first(), c.first()) {
                (None, None) => true,
                (None, Some(_)) => false,
                (Some(Part::Any), _) => {
                    // Zero components, or one and the same `**` again.
                    go(&p[1..], c) || (!c.is_empty() && go(p, &c[1..]))
                }
                (Some(_), None) => false,
                (Some(Part::One), Some(_)) => go(&p[1..], &c[1..]),
                (Some(Part::Literal(l)), Some(x)) => l == x && go(&p[1..], &c[1..]),
            }
        }
        go(&self.parts, &cell.components())
    }

    /// `**`: every cell.
    pub fn is_everything(&self) -> bool {
        self.parts.iter().all(|p| *p == Part::Any)
    }
}

impl fmt::Display for CellPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cell(s: &str) -> CellName {
        CellName::parse("t", s).expect("valid cell name")
    }

    fn pat(s: &str) -> CellPattern {
        CellPattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn subtrees() {
        let t = pat("team-a/**");
        assert!(t.matches(&cell("team-a")));
        assert!(t.matches(&cell("team-a/web")));
        assert!(t.matches(&cell("team-a/web/worker")));
        assert!(!t.matches(&cell("team-b")));
        assert!(!t.matches(&cell("team-ab")));
        assert!(!t.matches(&cell("x/team-a")));

        let exact = pat("team-a");
        assert!(exact.matches(&cell("team-a")));
        assert!(!exact.matches(&cell("team-a/web")));

        let children = pat("team-a/*");
        assert!(!children.matches(&cell("team-a")));
        assert!(children.matches(&cell("team-a/web")));
        assert!(!children.matches(&cell("team-a/web/worker")));

        assert!(pat("**").matches(&cell("anything/at/all")));
        assert!(pat("**").is_everything());
        assert!(!pat("a/**").is_everything());
        let mid = pat("**/db");
        assert!(mid.matches(&cell("db")));
        assert!(mid.matches(&cell("a/b/db")));
        assert!(!mid.matches(&cell("a/db/x")));
        assert!(pat("*/web/**").matches(&cell("t/web")));
        assert!(!pat("*/web/**").matches(&cell("web")));
    }

    #[test]
    fn bad_cell_patterns() {
        for bad in ["", "team-*", "a//b", "a/b c", "-a", "a/***"] {
            assert!(CellPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn methods() {
        let start = "aurae.cells.v0.CellService/Start";
        assert!(MethodPattern::parse("*").unwrap().matches(start));
        let svc = MethodPattern::parse("aurae.cells.v0.CellService/*").unwrap();
        assert!(svc.matches(start));
        assert!(!svc.matches("aurae.cells.v0.CellServiceX/Start"));
        assert!(!svc.matches("aurae.observe.v0.ObserveService/GetSubProcessStream"));
        let exact = MethodPattern::parse(start).unwrap();
        assert!(exact.matches(start));
        assert!(!exact.matches("aurae.cells.v0.CellService/Stop"));
        assert_eq!(svc.to_string(), "aurae.cells.v0.CellService/*");
        for bad in [
            "",
            "CellService",
            "aurae.cells.v0.CellService/",
            "/Start",
            "aurae.cells.*/Start",
            "aurae..v0.CellService/Start",
            "aurae.cells.v0.CellService/St*",
            "a/b/c",
        ] {
            assert!(MethodPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,4}"
    }

    proptest! {
        /// `p/**` matches exactly `p` and its descendants.
        #[test]
        fn double_star_is_the_subtree(
            p in proptest::collection::vec(component(), 1..4),
            c in proptest::collection::vec(component(), 1..6),
        ) {
            let prefix = cell(&p.join("/"));
            let name = cell(&c.join("/"));
            let inside = name == prefix || name.is_descendant_of(&prefix);
            prop_assert_eq!(pat(&format!("{prefix}/**")).matches(&name), inside);
            prop_assert_eq!(pat(prefix.as_str()).matches(&name), name == prefix);
            prop_assert!(pat("**").matches(&name));
            let child = name.parent().as_ref() == Some(&prefix);
            prop_assert_eq!(pat(&format!("{prefix}/*")).matches(&name), child);
        }
    }
}
