//! `aurae.discovery.v0.DiscoveryService`: tells a caller that this is a
//! healthy Aurae node, and its version.

use aurae_proto::discovery::{
    discovery_service_server::DiscoveryService, DiscoverRequest, DiscoverResponse,
};
use tonic::{Request, Response, Status};

#[derive(Debug, Default, Clone, Copy)]
pub struct Discovery;

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    async fn discover(
        &self,
        _: Request<DiscoverRequest>,
    ) -> Result<Response<DiscoverResponse>, Status> {
        Ok(Response::new(DiscoverResponse {
            healthy: true,
            version: crate::VERSION.to_owned(),
        }))
    }
}
