//! The configuration model: one versioned document (rules, tiers, API keys, lists), how it
//! is validated ([`validate`]), read from and written to files ([`file`]), stored
//! ([`store`]), compiled for the check path ([`snapshot`]) and kept current ([`live`]).

pub mod file;
pub mod live;
pub mod snapshot;
pub mod store;
pub mod validate;

pub use live::{Author, Change, ChangeError, ConfigSource, LiveConfig};
pub use snapshot::{KeyGrant, Snapshot};
pub use store::{ConfigStore, MemoryConfigStore, RedisConfigStore, Stored};
pub use validate::FieldError;
