//! What the Sluice filter and controller must agree on: the check call, the rule schema
//! and how a decision is shown to a client. Plain serde types so that the crate builds for
//! `wasm32-wasip1` (inside Envoy) and natively (controller, tests) alike.

pub mod admin;
pub mod check;
pub mod config;
pub mod duration;
pub mod headers;
pub mod rule_index;
pub mod rules;
pub mod usage;

pub use check::{
    sampled, AddressCount, CachedDenials, Check, CheckRequest, CheckResponse, ClientId, ClientKind,
    Decision, DenyReason, Grant, LeaseReturn, LeasedAdmissions, PolicyStatus, Refusal,
    ReleaseRequest, Report, CHECK_PATH, MAX_CALL_BODY_BYTES, MAX_CHECK_HEADERS,
    MAX_GRANT_TOKEN_BYTES, MAX_HEADER_NAME_BYTES, MAX_IDENTITY_BYTES, MAX_METHOD_BYTES,
    MAX_REPORTED_ADDRESSES, MAX_REQUEST_FIELD_BYTES, RELEASE_PATH, REPORTER_HEADER, REPORT_PATH,
};
pub use config::{
    Alerts, ApiKey, AutomaticState, ConfigDocument, FilterView, ListEntry, ListItem, ListKind,
    ListName, Observability, Protection, Reported, Tier, TierLimits, UnknownApiKeys, CONFIG_PATH,
};
pub use rules::{
    FailureMode, HeaderMatch, Leased, Penalty, Rule, RuleMatch, RuleSet, Scope, Strategy, LEASABLE,
    USAGE_STRATEGIES,
};
pub use usage::{
    Settlement, Usage, UsageReservation, UsageSource, MAX_REQUEST_FIGURES,
    MAX_SETTLEMENTS_PER_CALL, MAX_USAGE,
};
