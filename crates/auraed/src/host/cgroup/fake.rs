//! A backend that touches no kernel state and records what it was asked to do, for service
//! tests (like youki's `test_manager.rs`). Processes spawned against it join no cgroup.

use std::{path::PathBuf, sync::Mutex, time::Duration};

use super::{lock, requested, CellStats, CgroupBackend, CgroupError, Limits};

/// One call the fake received; cell paths are joined with '/'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    Create(String, Limits),
    KillAll(String),
    Remove(String),
    RemoveRoot,
}

#[derive(Debug, Default)]
pub struct FakeBackend {
    /// What `is_v2` answers.
    pub v2: bool,
    /// API fields (e.g. "cell.memory.min") that `check_supported` and `create` refuse.
    pub unsupported: Vec<&'static str>,
    /// When set, `create` fails with an Io error for this cell path (joined with '/').
    pub fail_create: Option<String>,
    /// What `cpuset_available` answers (for every parent).
    pub cpuset: Option<(String, String)>,
    calls: Mutex<Vec<FakeCall>>,
}

impl FakeBackend {
    /// Everything received so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        lock(&self.calls).clone()
    }

    fn record(&self, call: FakeCall) {
        lock(&self.calls).push(call);
    }
}

impl CgroupBackend for FakeBackend {
    fn is_v2(&self) -> bool {
        self.v2
    }

    fn check_supported(&self, limits: &Limits) -> Result<(), CgroupError> {
        match requested(limits)
            .into_iter()
            .find(|(field, _)| self.unsupported.contains(field))
        {
            Some((field, _)) => Err(CgroupError::Unsupported {
                field,
                reason: "refused by the fake backend".to_string(),
            }),
            None => Ok(()),
        }
    }

    fn create(&self, path: &[&str], limits: &Limits) -> Result<(), CgroupError> {
        self.check_supported(limits)?;
        let name = path.join("/");
        if self.fail_create.as_deref() == Some(name.as_str()) {
            return Err(CgroupError::Io {
                action: "create",
                path: PathBuf::from(&name),
                source: std::io::Error::other("injected by the fake backend"),
            });
        }
        self.record(FakeCall::Create(name, limits.clone()));
        Ok(())
    }

    fn procs_files(&self, _path: &[&str]) -> Vec<PathBuf> {
        Vec::new()
    }

    fn pids(&self, _path: &[&str]) -> Result<Vec<i32>, CgroupError> {
        Ok(Vec::new())
    }

    fn kill_all(&self, path: &[&str]) -> Result<(), CgroupError> {
        self.record(FakeCall::KillAll(path.join("/")));
        Ok(())
    }

    fn remove(&self, path: &[&str], _timeout: Duration) -> Result<(), CgroupError> {
        self.record(FakeCall::Remove(path.join("/")));
        Ok(())
    }

    fn unified_dir(&self, _path: &[&str]) -> Option<PathBuf> {
        None
    }

    fn leftover_cells(&self) -> Vec<Vec<String>> {
        Vec::new()
    }

    fn cpuset_available(&self, _parent: &[&str]) -> Option<(String, String)> {
        self.cpuset.clone()
    }

    fn stats(&self, _path: &[&str]) -> Result<CellStats, CgroupError> {
        Ok(CellStats::default())
    }

    fn remove_root(&self) -> Result<(), CgroupError> {
        self.record(FakeCall::RemoveRoot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_and_refuses_listed_fields() {
        let fake = FakeBackend {
            unsupported: vec!["cell.memory.min"],
            ..FakeBackend::default()
        };
        let limits = Limits {
            mem_min: Some(1),
            ..Limits::default()
        };
        assert!(fake.create(&["a"], &limits).is_err());
        fake.create(&["a", "b"], &Limits::default())
            .expect("create");
        fake.kill_all(&["a", "b"]).expect("kill");
        fake.remove(&["a", "b"], Duration::ZERO).expect("remove");
        assert_eq!(
            fake.calls(),
            vec![
                FakeCall::Create("a/b".into(), Limits::default()),
                FakeCall::KillAll("a/b".into()),
                FakeCall::Remove("a/b".into()),
            ]
        );
    }
}
