//! The methods the daemon serves (read from the same descriptor sets that
//! reflection serves, so a new RPC is known without editing a list) and
//! what a policy rule must cover to allow each.

use std::{collections::BTreeSet, sync::OnceLock};

use prost::Message;

pub const CELL_ALLOCATE: &str = "aurae.cells.v0.CellService/Allocate";
pub const CELL_FREE: &str = "aurae.cells.v0.CellService/Free";
pub const CELL_START: &str = "aurae.cells.v0.CellService/Start";
pub const CELL_STOP: &str = "aurae.cells.v0.CellService/Stop";
pub const CELL_LIST: &str = "aurae.cells.v0.CellService/List";
pub const CELL_STATS: &str = "aurae.cells.v0.CellService/Stats";
pub const OBSERVE_OUTPUT: &str = "aurae.observe.v0.ObserveService/GetSubProcessStream";
pub const OBSERVE_SIGNALS: &str = "aurae.observe.v0.ObserveService/GetPosixSignalsStream";
pub const OBSERVE_LOGS: &str = "aurae.observe.v0.ObserveService/GetAuraeDaemonLogStream";

/// Methods whose request names a cell or the host context; their handlers
/// check the target (and filter what they answer) through the caller.
const SCOPED: [&str; 8] = [
    CELL_ALLOCATE,
    CELL_FREE,
    CELL_START,
    CELL_STOP,
    CELL_LIST,
    CELL_STATS,
    OBSERVE_OUTPUT,
    OBSERVE_SIGNALS,
];

/// Services that touch cells: a method of theirs that is not classified
/// here (an RPC added later) is allowed only by a rule covering every cell
/// and the host, so that it can never leak one tenant's cells to another.
const CELL_SERVICES: [&str; 2] = [
    "aurae.cells.v0.CellService",
    "aurae.observe.v0.ObserveService",
];

/// Methods of these services are allowed to every authenticated identity
/// unless a deny rule says otherwise: they say only that the node is up.
const IMPLICIT_SERVICES: [&str; 2] = [
    "aurae.discovery.v0.DiscoveryService",
    "grpc.health.v1.Health",
];

/// Reflection's two services (tonic-reflection keeps its descriptor sets
/// private).
const REFLECTION: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What a rule must cover for a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The method alone (VMs, the daemon's log, reflection).
    Unscoped,
    /// Allowed to everyone unless denied (discovery, health).
    Implicit,
    /// A cell or the host, checked by the handler.
    Scoped,
    /// Every cell and the host (an unclassified method of a cell service).
    Everything,
}

pub fn kind(method: &str) -> Kind {
    let service = method.split_once('/').map_or(method, |(s, _)| s);
    if SCOPED.contains(&method) {
        Kind::Scoped
    } else if IMPLICIT_SERVICES.contains(&service) {
        Kind::Implicit
    } else if CELL_SERVICES.contains(&service) && method != OBSERVE_LOGS {
        Kind::Everything
    } else {
        Kind::Unscoped
    }
}

/// Every method served, as `package.Service/Method`.
pub fn known() -> &'static BTreeSet<String> {
    static KNOWN: OnceLock<BTreeSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut all: BTreeSet<String> = REFLECTION.iter().map(|m| (*m).to_owned()).collect();
        for set in [
            aurae_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            // Both are compiled in; a set that did not decode would fail
            // the unit test below, never a request.
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    for method in service.method {
                        all.insert(format!(
                            "{package}.{}/{}",
                            service.name.as_deref().unwrap_or_default(),
                            method.name.as_deref().unwrap_or_default()
                        ));
                    }
                }
            }
        }
        all
    })
}

/// Whether `service` (`package.Service`) is served.
pub fn is_service(service: &str) -> bool {
    known()
        .iter()
        .any(|m| m.split_once('/').is_some_and(|(s, _)| s == service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_known_and_classified() {
        let known = known();
        for m in SCOPED.iter().chain(&REFLECTION).chain(&[OBSERVE_LOGS]) {
            assert!(known.contains(*m), "{m} missing from {known:?}");
        }
        assert!(known.contains("aurae.vms.v0.VmService/Create"));
        assert!(known.contains("grpc.health.v1.Health/Check"));
        assert!(known.contains("aurae.discovery.v0.DiscoveryService/Discover"));
        // A cell service's method that is neither scoped nor the daemon
        // log is allowed only by an everything-rule: when one is added,
        // decide here whether its handler checks the cell (add it to
        // SCOPED) or not.
        let everything: Vec<_> = known
            .iter()
            .filter(|m| kind(m) == Kind::Everything)
            .collect();
        assert!(
            everything.is_empty(),
            "unclassified cell-service methods: {everything:?}"
        );
        assert_eq!(kind("aurae.cells.v0.CellService/Future"), Kind::Everything);
        assert_eq!(kind(CELL_START), Kind::Scoped);
        assert_eq!(kind(OBSERVE_LOGS), Kind::Unscoped);
        assert_eq!(kind("grpc.health.v1.Health/Watch"), Kind::Implicit);
        assert_eq!(kind("aurae.vms.v0.VmService/Start"), Kind::Unscoped);
        assert!(is_service("aurae.vms.v0.VmService"));
        assert!(!is_service("aurae.vms.v0.VmServic"));
    }
}
