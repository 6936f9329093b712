//! Who may do what: a policy (`--authz-policy`, see `policy.rs`) maps the
//! names in a verified client certificate to roles, and roles to the
//! methods and cells they may use.
//!
//! Enforced in two steps, both through the one [`Caller`] the edge layer
//! makes per request: the layer refuses a method no rule of the caller's
//! roles can allow (every service, reflection and unknown paths included)
//! and hands the caller to the handler in the request's extensions; the
//! handlers of methods that name a cell or the host (`methods::SCOPED`)
//! check that target, and `List` and the signal stream show only what the
//! caller may see. Without a policy every verified certificate may do
//! everything, as before, and the daemon says so at start.

pub mod identity;
pub mod issue;
pub mod methods;
pub mod pattern;
pub mod policy;

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use tonic::{body::Body, Status};

pub use identity::{Peer, PeerIdentity};
use policy::Decision;
pub use policy::{Policy, PolicyError, Target};

/// The policy in force; replaced whole on reload (SIGHUP).
#[derive(Debug)]
pub struct Authorizer {
    path: Option<PathBuf>,
    policy: RwLock<Option<Arc<Policy>>>,
}

impl Authorizer {
    /// Loads the policy at `path`, or none: then everything is allowed.
    pub fn new(path: Option<&Path>) -> Result<Self, PolicyError> {
        let policy = match path {
            Some(p) => {
                let policy = Policy::load(p)?;
                tracing::info!("authorization policy {} in force", p.display());
                Some(Arc::new(policy))
            }
            None => {
                tracing::warn!(
                    "no --authz-policy: every client certificate signed by the CA may do everything, \
                     including starting processes as root on this host"
                );
                None
            }
        };
        Ok(Self {
            path: path.map(Path::to_owned),
            policy: RwLock::new(policy),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the policy file again; on failure the old policy stays.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let policy = Arc::new(Policy::load(path)?);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(policy);
        Ok(())
    }

    fn caller(&self, peer: Option<Arc<PeerIdentity>>) -> Caller {
        let identity = peer.unwrap_or_else(|| Arc::new(PeerIdentity::named(Vec::new())));
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let roles = policy
            .as_ref()
            .map(|p| p.roles_of(&identity.names))
            .unwrap_or_default();
        Caller {
            identity,
            policy,
            roles: roles.into(),
        }
    }
}

/// Reloads the policy on every SIGHUP until `stop`. The handler is in place
/// when this returns (a SIGHUP before it would kill the daemon).
pub fn reload_on_sighup(authz: &Arc<Authorizer>, stop: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!("cannot install a SIGHUP handler ({e}): the policy cannot be reloaded");
            return;
        }
    };
    let authz = authz.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = hup.recv() => {}
            }
            match authz.reload() {
                Ok(()) => tracing::info!(
                    "SIGHUP: reloaded the authorization policy {}",
                    authz
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
                Err(e) => tracing::error!("SIGHUP: {e}; the previous policy stays in force"),
            }
        }
    });
}

/// Who calls, and the policy (one version for the whole request).
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Arc<PeerIdentity>,
    /// None: no policy, everything allowed.
    policy: Option<Arc<Policy>>,
    roles: Arc<[usize]>,
}

impl Caller {
    /// PERMISSION_DENIED (logged) unless the caller may call `method` on
    /// `target`. `subject` replaces the target in the message when given
    /// (a pid: the cell it is in is not the caller's business).
    pub fn check(
        &self,
        method: &str,
        target: Target<'_>,
        subject: Option<&str>,
    ) -> Result<(), Status> {
        let Some(policy) = &self.policy else {
            return Ok(());
        };
        let what = match subject {
            Some(s) => format!(" on {s}"),
            None => target.to_string(),
        };
        let message = match policy.decide(&self.roles, method, target) {
            Decision::Allow(_) => return Ok(()),
            Decision::Deny(rule) => format!(
                "identity {} may not call {method}{what}: denied by {rule}",
                self.identity
            ),
            Decision::NoRule => {
                let roles = policy.role_names(&self.roles);
                format!(
                    "no rule allows identity {} (roles: {}) to call {method}{what} (policy {})",
                    self.identity,
                    if roles.is_empty() {
                        "none".to_owned()
                    } else {
                        roles.join(", ")
                    },
                    policy.path.display()
                )
            }
        };
        tracing::info!("denied: {message}");
        Err(Status::permission_denied(message))
    }

    /// Whether the caller may, without logging (for filtering).
    pub fn may(&self, method: &str, target: Target<'_>) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|p| matches!(p.decide(&self.roles, method, target), Decision::Allow(_)))
    }

    /// Whether the caller may use `method` on every cell and the host, so
    /// that nothing needs filtering.
    pub fn unrestricted(&self, method: &str) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|p| p.unrestricted(&self.roles, method))
    }
}

/// The caller the edge layer put in the request. A request that did not
/// pass the layer has none and is refused (fail closed).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::permission_denied("no caller identity for this request"))
}

/// The edge: refuses what no rule can allow, hands the caller on.
#[derive(Debug, Clone)]
pub struct AuthzLayer(pub Arc<Authorizer>);

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            authz: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthzService<S> {
    inner: S,
    authz: Arc<Authorizer>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthzService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
        let caller = self.authz.caller(peer);
        let method = req.uri().path().trim_start_matches('/').to_owned();
        let target = match methods::kind(&method) {
            methods::Kind::Scoped => Target::Some,
            methods::Kind::Everything => Target::Everything,
            methods::Kind::Unscoped | methods::Kind::Implicit => Target::None,
        };
        if let Err(status) = caller.check(&method, target, None) {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        req.extensions_mut().insert(caller);
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_resolved_from_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[identities]\nalice = [\"r\"]\n[[roles.r.rules]]\nmethods = [\"aurae.cells.v0.CellService/List\"]\ncells = [\"a/**\"]\n",
        )
        .unwrap();
        let authz = Authorizer::new(Some(&path)).unwrap();
        let alice = authz.caller(Some(Arc::new(PeerIdentity::named(vec!["alice".into()]))));
        let a = crate::services::cells::validation::CellName::parse("t", "a/b").unwrap();
        assert!(alice.may(methods::CELL_LIST, Target::Cell(&a)));
        assert!(!alice.unrestricted(methods::CELL_LIST));
        let e = alice
            .check(methods::CELL_START, Target::Cell(&a), None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .starts_with("no rule allows identity \"alice\" (roles: r) to call aurae.cells.v0.CellService/Start on cell a/b"),
            "{}",
            e.message()
        );
        // A bad file on reload leaves the old policy in force.
        std::fs::write(&path, "[identities]\nalice = [\"nope\"]\n").unwrap();
        assert!(authz.reload().is_err());
        let again = authz.caller(Some(Arc::new(PeerIdentity::named(vec!["alice".into()]))));
        assert!(again.may(methods::CELL_LIST, Target::Cell(&a)));

        let open = Authorizer::new(None).unwrap().caller(None);
        assert!(open.unrestricted(methods::CELL_START));
        assert!(open.check(methods::CELL_START, Target::Host, None).is_ok());
    }
}
