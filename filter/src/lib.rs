//! Sluice's proxy-wasm filter.
//!
//! Everything that decides lives in plain Rust modules ([`config`], [`identity`] with
//! [`client`] and [`jwt`], [`lists`], [`decision`], [`denial`], [`batch`], [`report`]) and
//! is tested natively. The request path itself ([`dispatch`], [`root`], [`stream`]) reaches
//! Envoy only through the [`host::Host`] trait: `abi` implements it over the proxy-wasm ABI
//! inside Envoy (the crate's only `unsafe` code, compiled for wasm32 only), and [`testing`]
//! for native tests that drive the filter as Envoy would.

pub mod batch;
pub mod client;
pub mod config;
pub mod decision;
pub mod denial;
pub mod dispatch;
pub mod flavour;
pub mod grpc;
pub mod host;
pub mod identity;
pub mod jwt;
pub mod lease;
pub mod lists;
pub mod report;
pub mod root;
pub mod stream;
pub mod testing;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod abi;
