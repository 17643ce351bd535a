//! Safelist and denylist: requests from listed addresses, users or API keys, or to listed
//! paths, skip the limiter (safelist) or are refused with 403 (denylist). The lists come
//! from the controller's configuration (operators change them through its admin API); an
//! entry may expire, and stops applying at that moment whether or not the filter has read
//! the configuration since. Paths exempt by the plugin configuration (health, metrics)
//! behave as safelisted.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use sluice_protocol::config::{ListItem, ListKind};
use sluice_protocol::rules::PathPattern;

use crate::identity::Identity;

/// When an entry stops applying (ms since the epoch); `None`: until removed.
type Expiry = Option<u64>;

fn live(expiry: &Expiry, now_ms: u64) -> bool {
    expiry.is_none_or(|at| now_ms < at)
}

/// One list, indexed so that a lookup costs the same however long the list is (but for
/// networks wider than one address and path globs, which are tried in turn).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List {
    addresses: HashMap<IpAddr, Expiry>,
    networks: Vec<(IpNet, Expiry)>,
    users: HashMap<String, Expiry>,
    /// By the SHA-256 (hex) of the key.
    api_keys: HashMap<String, Expiry>,
    paths: Vec<(PathPattern, Expiry)>,
}

impl List {
    /// The list the controller's entries make. An entry whose value does not read (the
    /// controller validates them, so only a newer controller's kind of entry) is skipped.
    pub fn from_items(items: &[ListItem]) -> List {
        let mut list = List::default();
        for item in items {
            let expiry = item.expires_at_ms;
            match item.kind {
                ListKind::Ip => {
                    if let Ok(net) = item.value.parse::<IpNet>() {
                        list.add_network(net, expiry);
                    } else if let Ok(address) = item.value.parse::<IpAddr>() {
                        list.addresses.insert(address.to_canonical(), expiry);
                    }
                }
                ListKind::User => {
                    list.users.insert(item.value.clone(), expiry);
                }
                ListKind::ApiKey => {
                    list.api_keys
                        .insert(item.value.to_ascii_lowercase(), expiry);
                }
                ListKind::Path => list.paths.push((PathPattern::new(&item.value), expiry)),
            }
        }
        list
    }

    /// A list of path globs only (the exempt paths).
    pub fn of_paths(globs: &[String]) -> List {
        List {
            paths: globs.iter().map(|g| (PathPattern::new(g), None)).collect(),
            ..List::default()
        }
    }

    fn add_network(&mut self, net: IpNet, expiry: Expiry) {
        if net.prefix_len() == net.max_prefix_len() {
            self.addresses.insert(net.addr().to_canonical(), expiry);
        } else {
            self.networks.push((net, expiry));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
            && self.networks.is_empty()
            && self.users.is_empty()
            && self.api_keys.is_empty()
            && self.paths.is_empty()
    }

    /// Whether the request is on the list at `now_ms`, by any of its identities or its path.
    pub fn contains(&self, identity: &Identity, path: &str, now_ms: u64) -> bool {
        let found = |expiry: Option<&Expiry>| expiry.is_some_and(|e| live(e, now_ms));
        identity.ip.is_some_and(|ip| {
            found(self.addresses.get(&ip))
                || self
                    .networks
                    .iter()
                    .any(|(net, expiry)| live(expiry, now_ms) && net.contains(&ip))
        }) || identity
            .user
            .as_ref()
            .is_some_and(|user| found(self.users.get(user)))
            || identity
                .api_key
                .as_ref()
                .is_some_and(|key| found(self.api_keys.get(key)))
            || self
                .paths
                .iter()
                .any(|(pattern, expiry)| live(expiry, now_ms) && pattern.matches(path))
    }

    /// Whether `path` is on the list (for lists of paths that never expire).
    pub fn contains_path(&self, path: &str) -> bool {
        self.paths.iter().any(|(pattern, _)| pattern.matches(path))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Safelisted,
    Denylisted,
    Neither,
}

/// Where a request stands at `now_ms`: the denylist wins over the safelist, so that one
/// listing cannot lift another's ban.
pub fn listing(
    safelist: &List,
    denylist: &List,
    identity: &Identity,
    path: &str,
    now_ms: u64,
) -> Listing {
    if denylist.contains(identity, path, now_ms) {
        Listing::Denylisted
    } else if safelist.contains(identity, path, now_ms) {
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
            invalid_token: false,
        }
    }

    fn item(kind: ListKind, value: &str, expires_at_ms: Option<u64>) -> ListItem {
        ListItem {
            kind,
            value: value.to_owned(),
            expires_at_ms,
        }
    }

    #[test]
    fn each_kind_of_entry_lists_a_request() {
        let list = List::from_items(&[
            item(ListKind::Ip, "10.0.0.0/8", None),
            item(ListKind::Ip, "2001:db8::/32", None),
            item(ListKind::Ip, "192.0.2.9/32", None),
            item(ListKind::User, "root", None),
            item(ListKind::ApiKey, &api_key_digest("k-1"), None),
            item(ListKind::Path, "/internal/**", None),
        ]);
        let at = 0;
        assert!(list.contains(&identity("10.2.3.4", None, None), "/", at));
        assert!(list.contains(&identity("2001:db8::7", None, None), "/", at));
        assert!(list.contains(&identity("192.0.2.9", None, None), "/", at));
        assert!(list.contains(&identity("192.0.2.1", Some("root"), None), "/", at));
        assert!(list.contains(&identity("192.0.2.1", None, Some("k-1")), "/", at));
        assert!(list.contains(&identity("192.0.2.1", None, None), "/internal/a/b", at));
        assert!(!list.contains(&identity("192.0.2.1", Some("ann"), Some("k-2")), "/api", at));
    }

    #[test]
    fn an_entry_stops_applying_when_it_expires() {
        let list = List::from_items(&[
            item(ListKind::User, "ann", Some(1_000)),
            item(ListKind::Ip, "10.0.0.0/8", Some(1_000)),
            item(ListKind::Path, "/p", Some(1_000)),
        ]);
        let ann = identity("192.0.2.1", Some("ann"), None);
        let net = identity("10.1.1.1", None, None);
        assert!(list.contains(&ann, "/", 999));
        assert!(list.contains(&net, "/", 999));
        assert!(list.contains(&identity("192.0.2.1", None, None), "/p", 999));
        assert!(!list.contains(&ann, "/", 1_000));
        assert!(!list.contains(&net, "/", 1_000));
        assert!(!list.contains(&identity("192.0.2.1", None, None), "/p", 1_000));
    }

    #[test]
    fn the_denylist_wins() {
        let both = List::from_items(&[item(ListKind::User, "ann", None)]);
        let who = identity("192.0.2.1", Some("ann"), None);
        assert_eq!(listing(&both, &both, &who, "/", 0), Listing::Denylisted);
        assert_eq!(
            listing(&both, &List::default(), &who, "/", 0),
            Listing::Safelisted
        );
        assert_eq!(
            listing(&List::default(), &List::default(), &who, "/", 0),
            Listing::Neither
        );
    }
}
