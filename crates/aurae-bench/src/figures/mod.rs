//! The six figures. Each returns a finished [`Figure`]; a failure becomes
//! a row that says why, never an abort of the whole run.

pub mod footprint;
pub mod guest;
pub mod signal;
pub mod start;
pub mod stream;
pub mod throughput;

use std::{future::Future, path::PathBuf, time::Instant};

use aurae_client::{Client, ClientConfig};

use crate::{
    cells::ExitMode,
    oci::Oci,
    report::{Kind, Row, Settings},
};

/// What every figure needs.
pub struct Ctx {
    pub client: Client,
    /// To open more connections (one per concurrent client).
    pub client_config: ClientConfig,
    /// The main daemon's first start (it generated the PKI), in ms.
    pub first_start_ms: f64,
    pub exit: ExitMode,
    /// Err: why the ObserveService cannot be used.
    pub observe: Result<(), String>,
    pub settings: Settings,
    pub runtimes: Vec<Runtime>,
    /// Our cgroup directory (relative) for the floor baselines.
    pub floor_rel: String,
    pub auraed: PathBuf,
    pub pki: PathBuf,
    pub work: PathBuf,
}

impl Ctx {
    /// One series per OCI runtime; already failed where it cannot run.
    pub fn oci_series(&self) -> Vec<Series> {
        self.runtimes
            .iter()
            .map(|rt| match &rt.oci {
                Ok(_) => Series::default(),
                Err(why) => Series::failed(why.clone()),
            })
            .collect()
    }
}

/// An OCI runtime baseline, or why it cannot run here.
pub struct Runtime {
    pub name: String,
    pub oci: Result<Oci, String>,
    /// A bundle running `/bin/true`.
    pub bundle_true: PathBuf,
}

impl Runtime {
    pub fn label(&self) -> String {
        match &self.oci {
            Ok(o) if !o.version.is_empty() => o.version.clone(),
            _ => self.name.clone(),
        }
    }
}

/// Samples of one row; the first error stops it.
#[derive(Default)]
pub struct Series {
    pub samples: Vec<f64>,
    pub err: Option<String>,
}

impl Series {
    pub fn failed(why: impl Into<String>) -> Series {
        Series {
            samples: Vec::new(),
            err: Some(why.into()),
        }
    }

    pub async fn sample<F, Fut>(&mut self, f: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<f64>>,
    {
        if self.err.is_some() {
            return;
        }
        match f().await {
            Ok(v) => self.samples.push(v),
            Err(e) => self.err = Some(format!("{e:#}")),
        }
    }

    pub fn row(self, id: &str, label: &str, kind: Kind, unit: &str) -> Row {
        match (self.samples.is_empty(), self.err) {
            (true, Some(e)) => Row::unavailable(id, label, kind, unit, &e),
            (false, Some(e)) => Row::measured(id, label, kind, unit, &self.samples)
                .with_note(format!("stopped early: {e}")),
            (_, None) => Row::measured(id, label, kind, unit, &self.samples),
        }
    }
}

/// Runs blocking `f` on the blocking pool and times it, in ms.
pub async fn timed_blocking<F>(f: F) -> anyhow::Result<f64>
where
    F: FnOnce() -> anyhow::Result<()> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        f()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    })
    .await?
}
