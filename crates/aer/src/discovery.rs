//! `aer discover`

use aurae_client::{proto::discovery::DiscoverRequest, Client};

use crate::{status, Failure};

pub async fn discover(client: &Client, json: bool) -> Result<(), Failure> {
    let r = client
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({ "healthy": r.healthy, "version": r.version })
        );
    } else {
        let state = if r.healthy { "healthy" } else { "NOT healthy" };
        println!("auraed {} is {state}", r.version);
    }
    if r.healthy {
        Ok(())
    } else {
        Err(Failure::new("the node reports it is not healthy"))
    }
}
