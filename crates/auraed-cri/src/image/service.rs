//! `runtime.v1.ImageService` on the store and the puller.

use std::{collections::HashMap, sync::Arc};

use tonic::{Request, Response, Status};

use super::{
    pull::{Credentials, ImageName, PullError, Puller},
    store::{ImageRecord, Store, StoreError},
};
use crate::proto::{self, image_service_server::ImageService};

impl From<PullError> for Status {
    fn from(e: PullError) -> Status {
        match &e {
            PullError::Reference(..) => Status::invalid_argument(e.to_string()),
            PullError::NotFound { .. } => Status::not_found(e.to_string()),
            PullError::Hosts(_) | PullError::NoEndpoint(_) => {
                Status::failed_precondition(e.to_string())
            }
            PullError::Registry { .. } => Status::unavailable(e.to_string()),
            PullError::Digest { .. } | PullError::Verify { .. } | PullError::Invalid { .. } => {
                Status::data_loss(e.to_string())
            }
            PullError::Unpack { .. } | PullError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

fn store_status(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

pub struct ImageServiceImpl {
    puller: Arc<Puller>,
}

impl ImageServiceImpl {
    pub fn new(puller: Arc<Puller>) -> Self {
        ImageServiceImpl { puller }
    }

    fn store(&self) -> &Store {
        self.puller.store()
    }

    /// The image a CRI `ImageSpec.image` names: an id, an id prefix, or a
    /// reference (tag or digest), normalized.
    fn lookup(&self, spec: &str) -> Option<ImageRecord> {
        let spec = spec.trim();
        if spec.is_empty() {
            return None;
        }
        let reference = ImageName::parse(spec).ok().map(|n| n.canonical());
        self.store().find(spec, reference.as_deref())
    }
}

/// The image's user from its config (`User` in `config`): a numeric uid
/// (with or without `:gid`) or a user name.
fn image_user(config: &[u8]) -> (Option<i64>, String) {
    let user = serde_json::from_slice::<serde_json::Value>(config)
        .ok()
        .and_then(|v| v.get("config")?.get("User")?.as_str().map(str::to_string))
        .unwrap_or_default();
    let name = user.split(':').next().unwrap_or("");
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

fn to_proto(img: &ImageRecord, config: Option<&[u8]>) -> proto::Image {
    let (uid, username) = config.map(image_user).unwrap_or((None, String::new()));
    proto::Image {
        id: img.id.clone(),
        repo_tags: img.repo_tags.clone(),
        repo_digests: img.repo_digests.clone(),
        size: img.size,
        uid: uid.map(|value| proto::Int64Value { value }),
        username,
        spec: Some(proto::ImageSpec {
            image: img.id.clone(),
            ..Default::default()
        }),
        pinned: img.pinned,
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        request: Request<proto::ListImagesRequest>,
    ) -> Result<Response<proto::ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match filter {
            Some(spec) => self.lookup(&spec).into_iter().collect(),
            None => self.store().list(),
        };
        let images = images
            .iter()
            .map(|i| {
                let config = self.store().read_blob(&i.id).ok();
                to_proto(i, config.as_deref())
            })
            .collect();
        Ok(Response::new(proto::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<proto::ImageStatusRequest>,
    ) -> Result<Response<proto::ImageStatusResponse>, Status> {
        let req = request.into_inner();
        let spec = req.image.map(|s| s.image).unwrap_or_default();
        if spec.trim().is_empty() {
            return Err(Status::invalid_argument(
                "image: an image name or id is required",
            ));
        }
        // An image that is not there is an empty answer, not an error.
        let Some(img) = self.lookup(&spec) else {
            return Ok(Response::new(proto::ImageStatusResponse::default()));
        };
        let config = self.store().read_blob(&img.id).map_err(store_status)?;
        let mut info = HashMap::new();
        if req.verbose {
            let spec: serde_json::Value =
                serde_json::from_slice(&config).unwrap_or(serde_json::Value::Null);
            let layers: Vec<_> = img
                .layers
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "digest": l.digest, "diffID": l.diff_id, "mediaType": l.media_type, "size": l.size,
                        "path": self.store().layer_path(&l.digest).map(|p| p.display().to_string()).unwrap_or_default(),
                    })
                })
                .collect();
            let v = serde_json::json!({
                "imageSpec": spec,
                "manifestDigest": img.manifest_digest,
                "configMediaType": img.config_media_type,
                "layers": layers,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(proto::ImageStatusResponse {
            image: Some(to_proto(&img, Some(&config))),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<proto::PullImageRequest>,
    ) -> Result<Response<proto::PullImageResponse>, Status> {
        let req = request.into_inner();
        let image = req.image.map(|s| s.image).unwrap_or_default();
        if image.trim().is_empty() {
            return Err(Status::invalid_argument(
                "image: an image reference is required",
            ));
        }
        let creds = req
            .auth
            .map(|a| Credentials {
                username: a.username,
                password: a.password,
                auth: a.auth,
                identity_token: a.identity_token,
                registry_token: a.registry_token,
            })
            .unwrap_or_default();
        let started = std::time::Instant::now();
        let rec = self.puller.pull(image.trim(), &creds).await.map_err(|e| {
            tracing::info!("PullImage {image}: {e}");
            Status::from(e)
        })?;
        tracing::info!(
            "pulled {image} as {} in {} ms",
            rec.id,
            started.elapsed().as_millis()
        );
        Ok(Response::new(proto::PullImageResponse {
            image_ref: rec.id,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<proto::RemoveImageRequest>,
    ) -> Result<Response<proto::RemoveImageResponse>, Status> {
        let spec = request
            .into_inner()
            .image
            .map(|s| s.image)
            .unwrap_or_default();
        if spec.trim().is_empty() {
            return Err(Status::invalid_argument(
                "image: an image name or id is required",
            ));
        }
        // Removing an image that is not there succeeds (idempotent).
        if let Some(img) = self.lookup(&spec) {
            self.store().remove(&img.id).map_err(store_status)?;
            tracing::info!("removed image {} ({})", img.id, img.repo_tags.join(", "));
        }
        Ok(Response::new(proto::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<proto::ImageFsInfoRequest>,
    ) -> Result<Response<proto::ImageFsInfoResponse>, Status> {
        let store = self.puller.store().clone();
        let (bytes, inodes) = tokio::task::spawn_blocking(move || store.usage())
            .await
            .map_err(|e| Status::internal(format!("measuring the image store: {e}")))?;
        let usage = proto::FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(proto::FilesystemIdentifier {
                mountpoint: self.store().root().display().to_string(),
            }),
            used_bytes: Some(proto::UInt64Value { value: bytes }),
            inodes_used: Some(proto::UInt64Value { value: inodes }),
        };
        Ok(Response::new(proto::ImageFsInfoResponse {
            image_filesystems: vec![usage],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_from_the_config() {
        let cfg = |u: &str| format!(r#"{{"config":{{"User":"{u}"}}}}"#).into_bytes();
        assert_eq!(image_user(&cfg("1002")), (Some(1002), String::new()));
        assert_eq!(image_user(&cfg("1003:1004")), (Some(1003), String::new()));
        assert_eq!(image_user(&cfg("www-data")), (None, "www-data".into()));
        assert_eq!(image_user(&cfg("www-data:1004")), (None, "www-data".into()));
        assert_eq!(image_user(&cfg("")), (None, String::new()));
        assert_eq!(image_user(b"{}"), (None, String::new()));
    }
}
