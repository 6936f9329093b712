//! Images for the CRI: where to pull from (`hosts`), pulling with
//! verification (`pull`), the content-addressed store (`store`), layer
//! unpacking into overlayfs lower directories (`unpack`) and the
//! `runtime.v1.ImageService` (`service`).

pub mod hosts;
pub mod pull;
pub mod service;
pub mod store;
pub mod unpack;

pub use hosts::RegistryHosts;
pub use pull::{Credentials, ImageName, Puller};
pub use service::ImageServiceImpl;
pub use store::Store;
