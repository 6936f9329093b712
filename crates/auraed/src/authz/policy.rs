//! The policy file (TOML) and the decision: which rules of the caller's
//! roles match a method and target. Deny rules win over allow rules; with
//! no matching rule a method is refused, except discovery and health.
//!
//! ```toml
//! [identities]                  # certificate name (CN or SAN) -> roles
//! alice = ["observer"]
//! "*" = ["everyone"]            # every verified certificate
//!
//! [[roles.observer.rules]]
//! name = "read everything"      # optional, quoted in denials
//! methods = ["aurae.cells.v0.CellService/List", "aurae.observe.v0.ObserveService/*"]
//! cells = ["**"]                # cell patterns: team-a, team-a/*, team-a/**
//! host = true                   # the host context (executables outside cells)
//!
//! [[roles.observer.rules]]
//! effect = "deny"
//! methods = ["aurae.vms.v0.VmService/*"]
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    methods::{self, Kind},
    pattern::{CellPattern, MethodPattern},
};
use crate::services::cells::validation::CellName;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the authorization policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("authorization policy {path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    identities: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    roles: BTreeMap<String, RoleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDoc {
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: Option<String>,
    effect: Option<Spanned<String>>,
    methods: Spanned<Vec<Spanned<String>>>,
    cells: Option<Vec<Spanned<String>>>,
    host: Option<bool>,
}

/// What a check is about.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A method without a cell (VMs, logs, discovery, ...).
    None,
    /// An executable outside cells, or the whole host.
    Host,
    Cell(&'a CellName),
    /// Some cell or the host, not known yet (a scoped method at the edge,
    /// before its handler checks the real target).
    Some,
    /// Every cell and the host.
    Everything,
}

#[derive(Debug)]
pub struct Rule {
    /// `role "observer" rule 2 "read everything" (policy.toml:14)`.
    pub label: String,
    pub deny: bool,
    methods: Vec<MethodPattern>,
    cells: Vec<CellPattern>,
    host: bool,
}

impl Rule {
    fn covers_everything(&self) -> bool {
        self.host && self.cells.iter().any(CellPattern::is_everything)
    }

    fn covers_something(&self) -> bool {
        self.host || !self.cells.is_empty()
    }

    fn applies(&self, method: &str, target: Target<'_>) -> bool {
        if !self.methods.iter().any(|m| m.matches(method)) {
            return false;
        }
        match target {
            Target::None => true,
            Target::Host => self.host,
            Target::Cell(c) => self.cells.iter().any(|p| p.matches(c)),
            // When the target is not known, an allow rule may apply and a
            // deny rule must not refuse yet (the handler checks again);
            // for everything, the reverse.
            Target::Some if self.deny => self.covers_everything(),
            Target::Some => self.covers_something(),
            Target::Everything if self.deny => self.covers_something(),
            Target::Everything => self.covers_everything(),
        }
    }
}

#[derive(Debug)]
pub struct Role {
    pub name: String,
    rules: Vec<Rule>,
}

/// A parsed, checked policy.
#[derive(Debug)]
pub struct Policy {
    pub path: PathBuf,
    /// Certificate name (or `*`) -> indices into `roles`.
    identities: HashMap<String, Vec<usize>>,
    roles: Vec<Role>,
}

/// The outcome of a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    /// By this allow rule (None: discovery and health, allowed to all).
    Allow(Option<&'p str>),
    /// By this deny rule.
    Deny(&'p str),
    /// No rule allows it.
    NoRule,
}

fn line_of(text: &str, span: &Range<usize>) -> usize {
    text.as_bytes()[..span.start.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let invalid = |span: &Range<usize>, reason: String| PolicyError::Invalid {
            path: path.to_owned(),
            line: line_of(text, span),
            reason,
        };
        let doc: FileDoc = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            invalid(&span, e.message().trim_end().replace('\n', ": "))
        })?;
        let file = path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into(),
        );

        let mut roles = Vec::new();
        let mut index = HashMap::new();
        for (name, role) in &doc.roles {
            let mut rules = Vec::new();
            for (i, r) in role.rules.iter().enumerate() {
                // toml cannot span a table here; a rule is where its
                // `methods` are.
                let span = r.methods.span();
                let line = line_of(text, &span);
                let label = match &r.name {
                    Some(n) => format!("role {name:?} rule {} {n:?} ({file}:{line})", i + 1),
                    None => format!("role {name:?} rule {} ({file}:{line})", i + 1),
                };
                rules.push(check_rule(r, label, &span, &invalid)?);
            }
            index.insert(name.clone(), roles.len());
            roles.push(Role {
                name: name.clone(),
                rules,
            });
        }

        let mut identities = HashMap::new();
        for (who, names) in &doc.identities {
            if who.is_empty() {
                return Err(invalid(
                    &names.span(),
                    "an identity must not be empty".into(),
                ));
            }
            let mut ids = Vec::new();
            for role in names.get_ref() {
                let Some(i) = index.get(role.get_ref()) else {
                    let defined: Vec<&str> = doc.roles.keys().map(String::as_str).collect();
                    return Err(invalid(
                        &role.span(),
                        format!(
                            "identity {who:?}: no role {:?} (roles defined: {})",
                            role.get_ref(),
                            if defined.is_empty() {
                                "none".to_owned()
                            } else {
                                defined.join(", ")
                            }
                        ),
                    ));
                };
                ids.push(*i);
            }
            identities.insert(who.clone(), ids);
        }
        Ok(Self {
            path: path.to_owned(),
            identities,
            roles,
        })
    }

    /// The roles of a certificate with these names (and of `*`).
    pub fn roles_of(&self, names: &[String]) -> Vec<usize> {
        let mut v: Vec<usize> = names
            .iter()
            .map(String::as_str)
            .chain(["*"])
            .filter_map(|n| self.identities.get(n))
            .flatten()
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn role_names(&self, roles: &[usize]) -> Vec<&str> {
        roles
            .iter()
            .filter_map(|i| self.roles.get(*i))
            .map(|r| r.name.as_str())
            .collect()
    }

    pub fn decide(&self, roles: &[usize], method: &str, target: Target<'_>) -> Decision<'_> {
        let mut allow = None;
        let rules = roles
            .iter()
            .filter_map(|i| self.roles.get(*i))
            .flat_map(|r| r.rules.iter());
        for rule in rules {
            if !rule.applies(method, target) {
                continue;
            }
            if rule.deny {
                return Decision::Deny(&rule.label);
            }
            allow.get_or_insert(rule.label.as_str());
        }
        match allow {
            Some(label) => Decision::Allow(Some(label)),
            None if methods::kind(method) == Kind::Implicit => Decision::Allow(None),
            None => Decision::NoRule,
        }
    }

    /// Whether these roles may use `method` on every cell and the host
    /// with no deny rule narrowing it: then nothing needs filtering.
    pub fn unrestricted(&self, roles: &[usize], method: &str) -> bool {
        matches!(
            self.decide(roles, method, Target::Everything),
            Decision::Allow(_)
        )
    }
}

fn check_rule(
    r: &RuleDoc,
    label: String,
    span: &Range<usize>,
    invalid: &dyn Fn(&Range<usize>, String) -> PolicyError,
) -> Result<Rule, PolicyError> {
    let deny = match r.effect.as_ref().map(|e| (e.get_ref().as_str(), e.span())) {
        None | Some(("allow", _)) => false,
        Some(("deny", _)) => true,
        Some((other, span)) => {
            return Err(invalid(
                &span,
                format!("effect must be \"allow\" or \"deny\", got {other:?}"),
            ))
        }
    };
    if r.methods.get_ref().is_empty() {
        return Err(invalid(
            &r.methods.span(),
            "methods must name at least one method (or \"*\")".into(),
        ));
    }
    let mut scoped = false;
    let mut methods = Vec::new();
    for m in r.methods.get_ref() {
        let p = MethodPattern::parse(m.get_ref()).map_err(|e| invalid(&m.span(), e))?;
        let unknown = match &p {
            MethodPattern::Any => None,
            MethodPattern::Service(s) => (!methods::is_service(s)).then(|| format!("service {s}")),
            MethodPattern::Exact(x) => {
                (!methods::known().contains(x)).then(|| format!("method {x}"))
            }
        };
        if let Some(what) = unknown {
            return Err(invalid(&m.span(), format!("this daemon serves no {what}")));
        }
        scoped |= methods::known()
            .iter()
            .any(|k| p.matches(k) && matches!(methods::kind(k), Kind::Scoped | Kind::Everything));
        methods.push(p);
    }
    let mut cells = Vec::new();
    for c in r.cells.iter().flatten() {
        cells.push(CellPattern::parse(c.get_ref()).map_err(|e| invalid(&c.span(), e))?);
    }
    let targeted = r.cells.is_some() || r.host.is_some();
    if scoped && !targeted {
        return Err(invalid(
            span,
            "the rule names methods that act on cells (CellService, GetSubProcessStream, GetPosixSignalsStream) but says neither `cells` nor `host`; say which (e.g. cells = [\"**\"], host = true for everything)".into(),
        ));
    }
    if !scoped && targeted {
        return Err(invalid(
            span,
            "`cells` and `host` apply only to CellService, GetSubProcessStream and GetPosixSignalsStream, which this rule does not name".into(),
        ));
    }
    Ok(Rule {
        label,
        deny,
        methods,
        cells,
        host: r.host.unwrap_or(false),
    })
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::None | Target::Some => Ok(()),
            Target::Host => f.write_str(" on the host context"),
            Target::Cell(c) => write!(f, " on cell {c}"),
            Target::Everything => f.write_str(" on every cell and the host"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[identities]
alice = ["observer"]
"team-a-ci" = ["tenant-a"]
root = ["admin"]
"*" = ["everyone"]

[[roles.observer.rules]]
name = "read"
methods = ["aurae.cells.v0.CellService/List", "aurae.observe.v0.ObserveService/*"]
cells = ["**"]
host = true

[[roles.tenant-a.rules]]
methods = ["aurae.cells.v0.CellService/*", "aurae.observe.v0.ObserveService/GetSubProcessStream"]
cells = ["team-a/**"]

[[roles.tenant-a.rules]]
name = "keep the top"
effect = "deny"
methods = ["aurae.cells.v0.CellService/Free"]
cells = ["team-a"]

[[roles.admin.rules]]
methods = ["*"]
cells = ["**"]
host = true

[[roles.everyone.rules]]
methods = ["grpc.reflection.v1.ServerReflection/*"]
"#;

    fn policy(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("/etc/aurae/policy.toml"))
    }

    fn cell(s: &str) -> CellName {
        CellName::parse("t", s).unwrap()
    }

    #[test]
    fn decisions() {
        let p = policy(POLICY).expect("parses");
        let alice = p.roles_of(&["alice".into()]);
        let ci = p.roles_of(&["x".into(), "team-a-ci".into()]);
        let root = p.roles_of(&["root".into()]);
        let nobody = p.roles_of(&["nobody".into()]);
        assert_eq!(p.role_names(&alice), ["everyone", "observer"]);
        use methods::*;
        let a = cell("team-a");
        let a1 = cell("team-a/web");
        let b = cell("team-b");

        assert_eq!(
            p.decide(&alice, CELL_LIST, Target::Cell(&b)),
            Decision::Allow(Some("role \"observer\" rule 1 \"read\" (policy.toml:10)"))
        );
        assert_eq!(
            p.decide(&alice, CELL_START, Target::Cell(&a)),
            Decision::NoRule
        );
        assert_eq!(p.decide(&alice, CELL_START, Target::Some), Decision::NoRule);
        assert!(p.unrestricted(&alice, OBSERVE_SIGNALS));
        assert!(!p.unrestricted(&alice, CELL_START));

        assert!(matches!(
            p.decide(&ci, CELL_START, Target::Cell(&a1)),
            Decision::Allow(_)
        ));
        assert!(matches!(
            p.decide(&ci, CELL_FREE, Target::Cell(&a1)),
            Decision::Allow(_)
        ));
        assert_eq!(
            p.decide(&ci, CELL_FREE, Target::Cell(&a)),
            Decision::Deny("role \"tenant-a\" rule 2 \"keep the top\" (policy.toml:21)")
        );
        // Not refused at the edge: Free of team-a/web is allowed.
        assert!(matches!(
            p.decide(&ci, CELL_FREE, Target::Some),
            Decision::Allow(_)
        ));
        assert_eq!(
            p.decide(&ci, CELL_START, Target::Cell(&b)),
            Decision::NoRule
        );
        assert_eq!(p.decide(&ci, CELL_START, Target::Host), Decision::NoRule);
        assert_eq!(
            p.decide(&ci, OBSERVE_SIGNALS, Target::Some),
            Decision::NoRule
        );
        assert!(!p.unrestricted(&ci, CELL_LIST));

        for m in [CELL_START, OBSERVE_LOGS, "aurae.vms.v0.VmService/Create"] {
            assert!(matches!(
                p.decide(&root, m, Target::Everything),
                Decision::Allow(_)
            ));
        }
        // Discovery and health for everyone; reflection by the * rule.
        for roles in [&alice, &ci, &root, &nobody] {
            assert!(matches!(
                p.decide(roles, "grpc.health.v1.Health/Check", Target::None),
                Decision::Allow(_)
            ));
            assert!(matches!(
                p.decide(
                    roles,
                    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                    Target::None
                ),
                Decision::Allow(Some(_))
            ));
        }
        assert_eq!(
            p.decide(&nobody, OBSERVE_LOGS, Target::None),
            Decision::NoRule
        );
        assert_eq!(
            p.decide(
                &nobody,
                "aurae.cells.v0.CellService/Future",
                Target::Everything
            ),
            Decision::NoRule
        );
    }

    #[test]
    fn discovery_can_be_denied() {
        let p = policy(
            r#"
[identities]
mallory = ["nope"]
[[roles.nope.rules]]
effect = "deny"
methods = ["aurae.discovery.v0.DiscoveryService/*"]
"#,
        )
        .unwrap();
        let m = p.roles_of(&["mallory".into()]);
        assert!(matches!(
            p.decide(
                &m,
                "aurae.discovery.v0.DiscoveryService/Discover",
                Target::None
            ),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("[identities]\nalice = [\"ghost\"]\n", 2, "no role \"ghost\""),
            (
                "[[roles.r.rules]]\nmethods = [\n  \"aurae.cells.v0.CellService/Strat\",\n]\ncells = [\"**\"]\n",
                3,
                "serves no method aurae.cells.v0.CellService/Strat",
            ),
            (
                "[[roles.r.rules]]\nmethods = [\"aurae.nope.v0.X/*\"]\n",
                2,
                "serves no service aurae.nope.v0.X",
            ),
            (
                "\n[[roles.r.rules]]\nmethods = [\"aurae.cells.v0.CellService/Start\"]\n",
                3,
                "neither `cells` nor `host`",
            ),
            (
                "[[roles.r.rules]]\nmethods = [\"aurae.vms.v0.VmService/*\"]\ncells = [\"a\"]\n",
                2,
                "apply only to",
            ),
            (
                "[[roles.r.rules]]\nmethods = [\"*\"]\nhost = true\ncells = [\"a/b*\"]\n",
                4,
                "whole component",
            ),
            (
                "[[roles.r.rules]]\nmethods = [\"*\"]\nhost = true\neffect = \"maybe\"\n",
                4,
                "allow\" or \"deny",
            ),
            ("[[roles.r.rules]]\nmethod = [\"*\"]\n", 2, "unknown field"),
            ("[identities\n", 1, ""),
            ("[roles.r]\nrules = 3\n", 2, ""),
        ];
        for (text, line, needle) in cases {
            match policy(text) {
                Err(PolicyError::Invalid {
                    line: l, reason, ..
                }) => {
                    assert_eq!(l, line, "{text:?}: {reason}");
                    assert!(reason.contains(needle), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let e = policy("[identities]\nalice = [\"ghost\"]\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("authorization policy /etc/aurae/policy.toml:2: "),
            "{e}"
        );
    }
}
