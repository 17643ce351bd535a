//! Sluice's proxy-wasm filter.
//!
//! Everything that decides lives in plain Rust modules ([`config`], [`identity`] with
//! [`client`] and [`jwt`], [`lists`], [`decision`], [`denial`], [`batch`], [`request`]) and is tested
//! natively; [`host`] is the only module that talks to Envoy, and it is only
//! compiled for the wasm target.

pub mod batch;
pub mod client;
pub mod config;
pub mod decision;
pub mod denial;
pub mod identity;
pub mod jwt;
pub mod lists;
pub mod request;

#[cfg(target_arch = "wasm32")]
mod host;
