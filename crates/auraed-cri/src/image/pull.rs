//! Pulling an image from an OCI/Docker registry into the store.
//!
//! The reference is normalized as Docker does (`busybox` is
//! `docker.io/library/busybox:latest`); the registry host configuration
//! (`hosts.rs`) says which endpoints to try, in order, the first that
//! answers wins. Everything fetched is verified: the manifest's sha256
//! against the digest asked for (and the registry's header), each blob
//! against its descriptor (oci-client while streaming), each layer's
//! uncompressed tar against the config's `rootfs.diff_ids`. An image index
//! resolves to this machine's platform (linux and the running arch).

use std::{path::PathBuf, sync::Arc, time::Duration};

use base64::Engine;
use oci_client::{
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    manifest::{
        OciImageManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
        OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    },
    secrets::RegistryAuth,
    Client, Reference,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    hosts::{Endpoint, HostsError, RegistryHosts},
    store::{digest_hex, ImageRecord, LayerRecord, Store, StoreError},
    unpack::{unpack_layer, UnpackError},
};

const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0:?} is not a valid image reference: {1}")]
    Reference(String, String),
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error("no endpoint configured for {0} can pull")]
    NoEndpoint(String),
    #[error("{image}: not found ({detail})")]
    NotFound { image: String, detail: String },
    #[error("{image}: {detail}")]
    Registry { image: String, detail: String },
    #[error("{image}: {what} digest mismatch: expected {expected}, got {actual}")]
    Digest {
        image: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error("{image}: content does not match its digest: {detail}")]
    Verify { image: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{image}: layer {digest}: {source}")]
    Unpack {
        image: String,
        digest: String,
        source: UnpackError,
    },
}

/// Registry credentials (the CRI's AuthConfig).
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64 of `username:password` (as in a docker config).
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl Credentials {
    fn registry_auth(&self) -> RegistryAuth {
        if !self.registry_token.is_empty() {
            return RegistryAuth::Bearer(self.registry_token.clone());
        }
        if !self.username.is_empty() {
            return RegistryAuth::Basic(self.username.clone(), self.password.clone());
        }
        if !self.auth.is_empty() {
            if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(self.auth.trim()) {
                if let Some((u, p)) = String::from_utf8_lossy(&raw).split_once(':') {
                    return RegistryAuth::Basic(u.to_string(), p.to_string());
                }
            }
        }
        if !self.identity_token.is_empty() {
            // An identity token is a refresh token: registries accept it as
            // the password of the `<token>` user in the token exchange.
            return RegistryAuth::Basic("<token>".into(), self.identity_token.clone());
        }
        RegistryAuth::Anonymous
    }
}

/// A reference split and normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    /// `docker.io`, `registry.k8s.io`, `host:5000`.
    pub registry: String,
    /// `library/busybox`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageName {
    pub fn parse(image: &str) -> Result<ImageName, PullError> {
        let r: Reference = image.parse().map_err(|e: oci_client::ParseError| {
            PullError::Reference(image.to_string(), e.to_string())
        })?;
        let digest = r.digest().map(str::to_string);
        let tag = match (r.tag(), &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        if let Some(d) = &digest {
            digest_hex(d).map_err(|e| PullError::Reference(image.to_string(), e.to_string()))?;
        }
        Ok(ImageName {
            registry: r.registry().to_string(),
            repository: r.repository().to_string(),
            tag,
            digest,
        })
    }

    /// `registry/repository:tag`, if it has a tag.
    pub fn repo_tag(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{t}", self.registry, self.repository))
    }

    pub fn repo_digest(&self, digest: &str) -> String {
        format!("{}/{}@{digest}", self.registry, self.repository)
    }

    /// The name as the store knows it: the tag reference, else the digest one.
    pub fn canonical(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(_), _) => self.repo_tag().unwrap_or_default(),
            (None, Some(d)) => self.repo_digest(d),
            (None, None) => format!("{}/{}", self.registry, self.repository),
        }
    }

    fn on(&self, host: &str) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::with_digest(host.into(), self.repository.clone(), d.clone()),
            (None, Some(t)) => Reference::with_tag(host.into(), self.repository.clone(), t.clone()),
            (None, None) => {
                Reference::with_tag(host.into(), self.repository.clone(), "latest".into())
            }
        }
    }
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct ConfigRootfs {
    rootfs: Rootfs,
}

#[derive(Deserialize)]
struct Rootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

fn this_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub struct Puller {
    store: Arc<Store>,
    hosts: RegistryHosts,
}

impl Puller {
    pub fn new(store: Arc<Store>, hosts: RegistryHosts) -> Self {
        // The registry client's TLS uses the process-wide rustls provider:
        // ring, which the rest of the daemon uses. Already set is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Puller { store, hosts }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Pulls `image` (or finds it complete in the store) and records it.
    pub async fn pull(&self, image: &str, creds: &Credentials) -> Result<ImageRecord, PullError> {
        let name = ImageName::parse(image)?;
        let endpoints: Vec<Endpoint> = self
            .hosts
            .endpoints(&name.registry)?
            .into_iter()
            .filter(|e| e.can_pull && (e.can_resolve || name.digest.is_some()))
            .collect();
        if endpoints.is_empty() {
            return Err(PullError::NoEndpoint(name.registry.clone()));
        }
        let auth = creds.registry_auth();
        let mut last = None;
        for ep in &endpoints {
            match self.pull_from(&name, ep, &auth).await {
                Ok(rec) => return Ok(rec),
                // What the content says is final: another mirror would not
                // make a bad digest good.
                Err(
                    e @ (PullError::Digest { .. }
                    | PullError::Verify { .. }
                    | PullError::Store(_)
                    | PullError::Unpack { .. }),
                ) => return Err(e),
                Err(e) => {
                    tracing::debug!("pull {image} from {}: {e}", ep.host);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| PullError::NoEndpoint(name.registry.clone())))
    }

    fn client(ep: &Endpoint) -> Client {
        let extra_root_certificates = ep
            .ca
            .iter()
            .filter_map(|p| match std::fs::read(p) {
                Ok(data) => Some(Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                }),
                Err(e) => {
                    tracing::warn!("registry CA {}: {e}; ignored", p.display());
                    None
                }
            })
            .collect();
        Client::new(ClientConfig {
            protocol: if ep.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: ep.skip_verify,
            extra_root_certificates,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        })
    }

    async fn pull_from(
        &self,
        name: &ImageName,
        ep: &Endpoint,
        auth: &RegistryAuth,
    ) -> Result<ImageRecord, PullError> {
        let shown = name.canonical();
        let client = Self::client(ep);
        let reference = name.on(&ep.host);
        let registry_err = |e: oci_client::errors::OciDistributionError| {
            let detail = format!(
                "{} ({}): {e}",
                ep.host,
                if ep.plain_http { "http" } else { "https" }
            );
            if matches!(e, oci_client::errors::OciDistributionError::DigestError(_)) {
                return PullError::Verify {
                    image: shown.clone(),
                    detail,
                };
            }
            use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
            let not_found = match &e {
                E::ImageManifestNotFoundError(_) => true,
                E::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
                    matches!(x.code, C::ManifestUnknown | C::NameUnknown | C::BlobUnknown)
                }),
                _ => false,
            };
            if not_found {
                PullError::NotFound {
                    image: shown.clone(),
                    detail,
                }
            } else {
                PullError::Registry {
                    image: shown.clone(),
                    detail,
                }
            }
        };

        let (mut bytes, header_digest) = client
            .pull_manifest_raw(&reference, auth, &MANIFEST_TYPES)
            .await
            .map_err(registry_err)?;
        let mut manifest_digest = sha256(&bytes);
        let expected = name.digest.clone().unwrap_or_else(|| header_digest.clone());
        if expected.starts_with("sha256:") && manifest_digest != expected {
            return Err(PullError::Digest {
                image: shown,
                what: "manifest".into(),
                expected,
                actual: manifest_digest,
            });
        }
        let mut digests = vec![manifest_digest.clone()];
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| PullError::Invalid {
                image: shown.clone(),
                reason: format!("manifest is not JSON: {e}"),
            })?;
        if value.get("manifests").is_some() {
            let index: Index = serde_json::from_value(value).map_err(|e| PullError::Invalid {
                image: shown.clone(),
                reason: format!("image index: {e}"),
            })?;
            let want = this_arch();
            let entry = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == want)
                })
                .ok_or_else(|| PullError::NotFound {
                    image: shown.clone(),
                    detail: format!("no linux/{want} image in the index"),
                })?;
            let platform_ref = name.on(&ep.host);
            let platform_ref = Reference::with_digest(
                platform_ref.registry().into(),
                platform_ref.repository().into(),
                entry.digest.clone(),
            );
            self.store.put_blob(&manifest_digest, &bytes)?;
            let (b, _) = client
                .pull_manifest_raw(&platform_ref, auth, &MANIFEST_TYPES)
                .await
                .map_err(registry_err)?;
            let actual = sha256(&b);
            if actual != entry.digest {
                return Err(PullError::Digest {
                    image: shown,
                    what: "platform manifest".into(),
                    expected: entry.digest.clone(),
                    actual,
                });
            }
            bytes = b;
            manifest_digest = actual;
            digests.push(manifest_digest.clone());
        }
        let manifest: OciImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| PullError::Invalid {
                image: shown.clone(),
                reason: format!("image manifest: {e}"),
            })?;
        self.store.put_blob(&manifest_digest, &bytes)?;

        // The config: small, kept as a blob; its digest is the image id.
        let config_digest = manifest.config.digest.clone();
        digest_hex(&config_digest)?;
        let config = match self.store.read_blob(&config_digest) {
            Ok(c) if sha256(&c) == config_digest => c,
            _ => {
                let mut out = Vec::new();
                client
                    .pull_blob(&reference, &manifest.config, &mut out)
                    .await
                    .map_err(registry_err)?;
                self.store.put_blob(&config_digest, &out)?;
                out
            }
        };
        let diff_ids = serde_json::from_slice::<ConfigRootfs>(&config)
            .map(|c| c.rootfs.diff_ids)
            .map_err(|e| PullError::Invalid {
                image: shown.clone(),
                reason: format!("image config: {e}"),
            })?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(PullError::Invalid {
                image: shown,
                reason: format!(
                    "config lists {} layers, the manifest {}",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }

        // From here on the image's blobs and layers are ours: a RemoveImage
        // of another image sharing them does not collect them under us.
        let _lease = self.store.lease(
            digests
                .iter()
                .cloned()
                .chain([manifest_digest.clone(), config_digest.clone()])
                .chain(manifest.layers.iter().map(|l| l.digest.clone())),
        );
        let mut layers = Vec::new();
        for _attempt in 0..2 {
            layers.clear();
            let mut lowers: Vec<PathBuf> = Vec::new();
            for (desc, diff_id) in manifest.layers.iter().zip(&diff_ids) {
                let dir = self.store.layer_path(&desc.digest)?;
                if !dir.exists() {
                    self.fetch_layer(
                        &client,
                        &reference,
                        desc,
                        diff_id,
                        &lowers,
                        &shown,
                        &registry_err,
                    )
                    .await?;
                }
                layers.push(LayerRecord {
                    digest: desc.digest.clone(),
                    media_type: desc.media_type.clone(),
                    size: desc.size.max(0) as u64,
                    diff_id: diff_id.clone(),
                });
                lowers.insert(0, dir);
            }
            let record = ImageRecord {
                id: config_digest.clone(),
                repo_tags: name.repo_tag().into_iter().collect(),
                repo_digests: vec![name.repo_digest(&digests[0])],
                manifest_digest: manifest_digest.clone(),
                config_media_type: manifest.config.media_type.clone(),
                size: manifest.config.size.max(0) as u64
                    + manifest
                        .layers
                        .iter()
                        .map(|l| l.size.max(0) as u64)
                        .sum::<u64>(),
                layers: layers.clone(),
                pinned: false,
            };
            let rec = self.store.add(record)?;
            // A RemoveImage racing this pull may have collected a layer we
            // found present before we recorded the image: fetch it again.
            let complete = rec.layers.iter().all(|l| {
                self.store
                    .layer_path(&l.digest)
                    .map(|p| p.exists())
                    .unwrap_or(false)
            }) && self
                .store
                .blob_path(&rec.id)
                .map(|p| p.exists())
                .unwrap_or(false);
            if complete {
                return Ok(rec);
            }
            let _ = self.store.put_blob(&config_digest, &config);
        }
        Err(PullError::Invalid {
            image: shown,
            reason: "its layers were removed while it was being pulled; pull again".into(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_layer(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &oci_client::manifest::OciDescriptor,
        diff_id: &str,
        lowers: &[PathBuf],
        shown: &str,
        registry_err: &impl Fn(oci_client::errors::OciDistributionError) -> PullError,
    ) -> Result<(), PullError> {
        let blob = self.store.blob_path(&desc.digest)?;
        if !blob.exists() {
            let tmp = self.store.temp_path("layer-blob");
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| StoreError::Io {
                    path: tmp.clone(),
                    source: e,
                })?;
            let r = client.pull_blob(reference, desc, file).await;
            if let Err(e) = r {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(registry_err(e));
            }
            self.store.commit(&tmp, &blob)?;
        }
        let tmp_dir = self.store.temp_path("layer");
        let (store, lowers, digest) = (self.store.clone(), lowers.to_vec(), desc.digest.clone());
        let unpacked = tokio::task::spawn_blocking(move || -> Result<_, PullError> {
            std::fs::create_dir(&tmp_dir).map_err(|e| StoreError::Io {
                path: tmp_dir.clone(),
                source: e,
            })?;
            let file = std::fs::File::open(&blob).map_err(|e| StoreError::Io {
                path: blob.clone(),
                source: e,
            })?;
            let r = unpack_layer(file, &tmp_dir, &lowers);
            Ok((r, tmp_dir, store))
        })
        .await
        .map_err(|e| PullError::Invalid {
            image: shown.to_string(),
            reason: format!("unpacking task failed: {e}"),
        })??;
        let (result, tmp_dir, store) = unpacked;
        let stats = match result {
            Ok(s) => s,
            Err(source) => {
                let _ = super::store::remove_any(&tmp_dir);
                return Err(PullError::Unpack {
                    image: shown.to_string(),
                    digest,
                    source,
                });
            }
        };
        if stats.diff_id != diff_id {
            let _ = super::store::remove_any(&tmp_dir);
            return Err(PullError::Digest {
                image: shown.to_string(),
                what: format!("layer {digest} (uncompressed)"),
                expected: diff_id.to_string(),
                actual: stats.diff_id,
            });
        }
        if stats.skipped_devices > 0 {
            tracing::info!(
                "{shown}: layer {digest}: {} device nodes skipped (mknod not permitted)",
                stats.skipped_devices
            );
        }
        store.commit(&tmp_dir, &store.layer_path(&digest)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_like_docker() {
        let n = ImageName::parse("busybox").expect("busybox");
        assert_eq!(
            n.repo_tag().as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        let n = ImageName::parse("registry.k8s.io/e2e-test-images/busybox:1.29-2").expect("k8s");
        assert_eq!(n.registry, "registry.k8s.io");
        assert_eq!(n.repository, "e2e-test-images/busybox");
        assert_eq!(
            n.repo_tag().as_deref(),
            Some("registry.k8s.io/e2e-test-images/busybox:1.29-2")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let n = ImageName::parse(&format!("127.0.0.1:5000/x/y@{d}")).expect("digest");
        assert_eq!(n.tag, None);
        assert_eq!(n.canonical(), format!("127.0.0.1:5000/x/y@{d}"));
        assert!(ImageName::parse("docker.io/Upper/case").is_err());
        assert!(ImageName::parse("").is_err());
    }

    #[test]
    fn credentials_choose_the_strongest_form() {
        let c = Credentials {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p:w"),
            ..Default::default()
        };
        assert!(matches!(c.registry_auth(), RegistryAuth::Basic(u, p) if u == "u" && p == "p:w"));
        let c = Credentials {
            registry_token: "t".into(),
            username: "u".into(),
            ..Default::default()
        };
        assert!(matches!(c.registry_auth(), RegistryAuth::Bearer(t) if t == "t"));
        assert!(matches!(
            Credentials::default().registry_auth(),
            RegistryAuth::Anonymous
        ));
    }
}
