//! Safelist and denylist: requests from listed addresses, users or API keys, or to listed
//! paths, skip the limiter (safelist) or are refused with 403 (denylist). Paths exempt by
//! default (health, metrics) behave as safelisted.

use ipnet::IpNet;
use sluice_protocol::rules::PathPattern;

use crate::identity::Identity;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List {
    pub networks: Vec<IpNet>,
    pub users: Vec<String>,
    /// SHA-256 (hex) of each listed key.
    pub api_keys: Vec<String>,
    /// Path globs (`*` within a segment, `**` across), compiled.
    pub paths: Vec<PathPattern>,
}

impl List {
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
            && self.users.is_empty()
            && self.api_keys.is_empty()
            && self.paths.is_empty()
    }

    /// Whether the request is on the list by any of its identities or its path.
    pub fn contains(&self, identity: &Identity, path: &str) -> bool {
        identity
            .ip
            .is_some_and(|ip| self.networks.iter().any(|net| net.contains(&ip)))
            || identity
                .user
                .as_ref()
                .is_some_and(|user| self.users.contains(user))
            || identity
                .api_key
                .as_ref()
                .is_some_and(|key| self.api_keys.contains(key))
            || self.contains_path(path)
    }

    pub fn contains_path(&self, path: &str) -> bool {
        self.paths.iter().any(|pattern| pattern.matches(path))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Safelisted,
    Denylisted,
    Neither,
}

/// Where a request stands: the denylist wins over the safelist, so that one listing cannot
/// lift another's ban.
pub fn listing(safelist: &List, denylist: &List, identity: &Identity, path: &str) -> Listing {
    if denylist.contains(identity, path) {
        Listing::Denylisted
    } else if safelist.contains(identity, path) {
        Listing::Safelisted
    } else {
        Listing::Neither
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::api_key_digest;
    use sluice_protocol::ClientId;

    fn identity(ip: &str, user: Option<&str>, key: Option<&str>) -> Identity {
        Identity {
            client: ClientId::ip(ip),
            ip: Some(ip.parse().unwrap()),
            counted_ip: ip.into(),
            user: user.map(str::to_owned),
            tier: None,
            api_key: key.map(api_key_digest),
        }
    }

    #[test]
    fn each_kind_of_entry_lists_a_request() {
        let list = List {
            networks: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            users: vec!["root".into()],
            api_keys: vec![api_key_digest("k-1")],
            paths: vec![PathPattern::new("/internal/**")],
        };
        assert!(list.contains(&identity("10.2.3.4", None, None), "/"));
        assert!(list.contains(&identity("2001:db8::7", None, None), "/"));
        assert!(list.contains(&identity("192.0.2.1", Some("root"), None), "/"));
        assert!(list.contains(&identity("192.0.2.1", None, Some("k-1")), "/"));
        assert!(list.contains(&identity("192.0.2.1", None, None), "/internal/a/b"));
        assert!(!list.contains(&identity("192.0.2.1", Some("ann"), Some("k-2")), "/api"));
    }

    #[test]
    fn the_denylist_wins() {
        let both = List {
            users: vec!["ann".into()],
            ..List::default()
        };
        let who = identity("192.0.2.1", Some("ann"), None);
        assert_eq!(listing(&both, &both, &who, "/"), Listing::Denylisted);
        assert_eq!(
            listing(&both, &List::default(), &who, "/"),
            Listing::Safelisted
        );
        assert_eq!(
            listing(&List::default(), &List::default(), &who, "/"),
            Listing::Neither
        );
    }
}
