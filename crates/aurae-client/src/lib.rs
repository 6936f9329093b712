//! Client library for an Aurae node: finds the client config, connects over
//! a unix socket or TCP with mutual TLS, and hands out one stub per service.
//! `aer` and the integration tests use it.

mod config;
mod connect;

pub use aurae_proto as proto;
pub use config::{AuthConfig, ClientConfig, ConfigError, SystemConfig};
pub use connect::{error_chain, tls_config, Client, ConnectError, Target, SERVER_NAME};
