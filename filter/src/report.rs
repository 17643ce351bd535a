//! What a worker tells the controller once a second ([`sluice_protocol::Report`]): its
//! upstream's answers, for the automatic system state; invalid tokens by address, for
//! brute-force protection; the denials it answered from its cache, which the controller
//! did not see, for its stats and alerts. Only what the controller's view asks for is
//! tallied; nothing is when it asks for nothing.

use std::collections::HashMap;

use sluice_protocol::{
    AddressCount, CachedDenials, ClientId, LeasedAdmissions, Report, MAX_REPORTED_ADDRESSES,
};

/// Request ids of sampled cached denials one report names per client and rule, at most.
const MAX_SAMPLED_IDS: usize = 16;

/// Whose cached denial: client, rule, tier.
type Denied = (ClientId, String, Option<String>);

#[derive(Debug, Default)]
pub struct Tally {
    responses: u64,
    server_errors: u64,
    invalid_tokens: HashMap<String, u64>,
    cached_denials: HashMap<Denied, (u64, Vec<String>)>,
    /// Requests admitted from leases, by the lease's fingerprint.
    leased: HashMap<u64, LeasedAdmissions>,
    /// Cached denials seen, for sampling.
    denials_seen: u64,
    /// Invalid tokens from addresses (and cached denials of clients) past
    /// [`MAX_REPORTED_ADDRESSES`] in one second: not reported (a flood from that many
    /// addresses is for the denylist by network).
    pub dropped: u64,
}

impl Tally {
    /// One upstream answer with `status` (`:status` as Envoy gave it).
    pub fn response(&mut self, status: Option<&[u8]>) {
        self.responses += 1;
        if status.is_some_and(|s| s.len() == 3 && s.first() == Some(&b'5')) {
            self.server_errors += 1;
        }
    }

    /// One request with an invalid token from `ip` (as limits count it).
    pub fn invalid_token(&mut self, ip: &str) {
        if let Some(count) = self.invalid_tokens.get_mut(ip) {
            *count += 1;
        } else if self.invalid_tokens.len() < MAX_REPORTED_ADDRESSES {
            self.invalid_tokens.insert(ip.to_owned(), 1);
        } else {
            self.dropped += 1;
        }
    }

    /// Whether the next cached denial is one of the `sample` share the controllers log
    /// (every 1/sample-th, counting them).
    pub fn sampled(&mut self, sample: f64) -> bool {
        self.denials_seen += 1;
        sluice_protocol::sampled(self.denials_seen, sample)
    }

    /// One request refused from the denial cache, with its request id if it was sampled.
    pub fn cached_denial(
        &mut self,
        client: &ClientId,
        rule: &str,
        tier: Option<&str>,
        request_id: Option<String>,
    ) {
        let key = (client.clone(), rule.to_owned(), tier.map(str::to_owned));
        let entry = if let Some(entry) = self.cached_denials.get_mut(&key) {
            entry
        } else if self.cached_denials.len() < MAX_REPORTED_ADDRESSES {
            self.cached_denials.entry(key).or_default()
        } else {
            self.dropped += 1;
            return;
        };
        entry.0 += 1;
        if let Some(id) = request_id {
            if entry.1.len() < MAX_SAMPLED_IDS {
                entry.1.push(id);
            }
        }
    }

    /// One request admitted from the lease for `fingerprint`, of `client` (in `tier`), whose
    /// decision `rule` speaks for. Counted by fingerprint: nothing is allocated but for the
    /// first of a kind.
    pub fn leased(&mut self, fingerprint: u64, client: &ClientId, rule: &str, tier: Option<&str>) {
        if let Some(entry) = self.leased.get_mut(&fingerprint) {
            entry.count += 1;
        } else if self.leased.len() < MAX_REPORTED_ADDRESSES {
            self.leased.insert(
                fingerprint,
                LeasedAdmissions {
                    client: client.clone(),
                    rule: rule.to_owned(),
                    tier: tier.map(str::to_owned),
                    count: 1,
                },
            );
        } else {
            self.dropped += 1;
        }
    }

    /// The report of everything tallied since the last one, if there is anything.
    pub fn take(&mut self) -> Option<Report> {
        if self.responses == 0
            && self.invalid_tokens.is_empty()
            && self.cached_denials.is_empty()
            && self.leased.is_empty()
        {
            return None;
        }
        let mut invalid_tokens: Vec<AddressCount> = self
            .invalid_tokens
            .drain()
            .map(|(ip, count)| AddressCount { ip, count })
            .collect();
        invalid_tokens.sort_by(|a, b| a.ip.cmp(&b.ip));
        let mut cached_denials: Vec<CachedDenials> = self
            .cached_denials
            .drain()
            .map(
                |((client, rule, tier), (count, request_ids))| CachedDenials {
                    client,
                    rule,
                    tier,
                    count,
                    request_ids,
                },
            )
            .collect();
        cached_denials.sort_by(|a, b| (&a.client.value, &a.rule).cmp(&(&b.client.value, &b.rule)));
        let mut leased: Vec<LeasedAdmissions> =
            self.leased.drain().map(|(_, entry)| entry).collect();
        leased.sort_by(|a, b| (&a.client.value, &a.rule).cmp(&(&b.client.value, &b.rule)));
        let report = Report {
            responses: self.responses,
            server_errors: self.server_errors,
            invalid_tokens,
            cached_denials,
            leased,
        };
        self.responses = 0;
        self.server_errors = 0;
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_invalid_tokens_add_up_until_taken() {
        let mut tally = Tally::default();
        assert_eq!(tally.take(), None, "nothing seen, nothing sent");
        for status in [&b"200"[..], b"503", b"500", b"404", b"5", b"5000"] {
            tally.response(Some(status));
        }
        tally.response(None);
        tally.invalid_token("192.0.2.7");
        tally.invalid_token("192.0.2.7");
        tally.invalid_token("192.0.2.1");
        let report = tally.take().unwrap();
        assert_eq!((report.responses, report.server_errors), (7, 2));
        assert_eq!(
            report.invalid_tokens,
            vec![
                AddressCount {
                    ip: "192.0.2.1".into(),
                    count: 1
                },
                AddressCount {
                    ip: "192.0.2.7".into(),
                    count: 2
                },
            ]
        );
        assert_eq!(
            tally.take(),
            None,
            "taken: the next report starts from zero"
        );
    }

    #[test]
    fn one_report_names_a_bounded_number_of_addresses() {
        let mut tally = Tally::default();
        for i in 0..MAX_REPORTED_ADDRESSES + 10 {
            tally.invalid_token(&format!("10.0.{}.{}", i / 256, i % 256));
        }
        tally.invalid_token("10.0.0.0");
        let report = tally.take().unwrap();
        assert_eq!(report.invalid_tokens.len(), MAX_REPORTED_ADDRESSES);
        assert_eq!(
            tally.dropped, 10,
            "new addresses past the bound are dropped"
        );
        assert!(report
            .invalid_tokens
            .iter()
            .any(|a| a.ip == "10.0.0.0" && a.count == 2));
    }
}
