//! `aer health [SERVICE]`: the standard grpc.health.v1 check.

use aurae_client::Client;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

use crate::{status, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fully qualified service name (e.g. aurae.cells.v0.CellService);
    /// empty means the whole server.
    #[arg(default_value = "")]
    service: String,
}

pub async fn check(client: &Client, args: Args, json: bool) -> Result<(), Failure> {
    let r = client
        .health()
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let state = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    let name = if args.service.is_empty() {
        "server"
    } else {
        &args.service
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "service": args.service, "status": state.as_str_name() })
        );
    } else {
        println!("{name}: {}", state.as_str_name());
    }
    if state == ServingStatus::Serving {
        Ok(())
    } else {
        Err(Failure::new(format!("{name} is not serving")))
    }
}
