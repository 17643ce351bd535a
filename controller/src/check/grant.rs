//! Grant tokens: what a worker presents to give a lease's unused quota back, or to settle a
//! usage rule's reservation. The controller that grants a lease (or takes a reservation)
//! writes into its token everything a return needs (the limits it was taken from, as the
//! store counted them, and until when it holds) and signs it, so a return needs no
//! configuration (the rule may be gone: a configuration change is when workers return
//! most) and names nothing the controller did not grant.
//!
//! Layout before the signature: `<kind>|<id>|<until ms>|<rule>|<units>|<limits>|<holder>`,
//! the kind `g` for a lease's grant and `r` for a reservation, the limits `;`-separated,
//! each `<key>,<strategy>,<limit>,<period ms>,<extra>,<cost>,<counted in>`. The holder is
//! last: it is the worker's own name, of any bytes (empty for a reservation).

use sluice_protocol::{Strategy, MAX_USAGE};

use crate::keys;
use crate::store::Refund;
use crate::strategy::Params;

/// Requests one grant holds at most (a lease is about a second of one worker's traffic).
const MAX_UNITS: u64 = 1_000_000_000;

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A lease of requests: what it did not admit may be given back.
    Lease,
    /// A usage rule's reservation: settled once with what the response reported.
    Reservation,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Lease => "g",
            TokenKind::Reservation => "r",
        }
    }

    fn most_units(self) -> u64 {
        match self {
            TokenKind::Lease => MAX_UNITS,
            TokenKind::Reservation => MAX_USAGE,
        }
    }
}
/// Limits one grant names at most: the enforced rules of one request.
const MAX_LIMITS: usize = 64;

/// One limit a lease was taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedLimit<'a> {
    pub key: &'a str,
    pub params: Params,
    /// What one request costs under it.
    pub cost: u64,
    /// A fixed window's start, the window the lease was counted in; 0 for the buckets.
    pub counted_in: u64,
}

/// Whom a usage reservation was taken for, carried to its settlement for the stats: the
/// tier's label and the client's (`kind:value`). Empty for leases and for reservations
/// signed before it was carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taker<'a> {
    pub tier: &'a str,
    pub client: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantToken<'a> {
    pub kind: TokenKind,
    pub id: &'a str,
    /// When the lease ends, by the store's clock: a return after it gives nothing back.
    pub until_ms: u64,
    /// The rule that spoke for the decision the lease came with (for the metrics).
    pub rule: &'a str,
    pub units: u64,
    pub limits: Vec<GrantedLimit<'a>>,
    /// A lease's holder; a reservation has none.
    pub holder: &'a str,
    pub taker: Taker<'a>,
}

impl GrantToken<'_> {
    /// The token's text, to be signed.
    pub fn encode(&self) -> String {
        let limits: Vec<String> = self
            .limits
            .iter()
            .map(|limit| {
                format!(
                    "{},{},{},{},{},{},{}",
                    limit.key,
                    limit.params.strategy.as_str(),
                    limit.params.limit,
                    limit.params.period_ms,
                    limit.params.extra,
                    limit.cost,
                    limit.counted_in
                )
            })
            .collect();
        // The last field runs to the end, so it may hold anything: a lease's holder, or a
        // reservation's tier (a name, never with `|`) and client.
        let last = match self.kind {
            TokenKind::Lease => self.holder.to_owned(),
            TokenKind::Reservation if self.taker == Taker::default() => String::new(),
            TokenKind::Reservation => format!("{}|{}", self.taker.tier, self.taker.client),
        };
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.kind.prefix(),
            self.id,
            self.until_ms,
            self.rule,
            self.units,
            limits.join(";"),
            last
        )
    }

    /// A verified token's fields; `None` when it is not one this module wrote.
    pub fn parse(token: &str) -> Option<GrantToken<'_>> {
        let mut parts = token.splitn(7, '|');
        let kind = match parts.next()? {
            "g" => TokenKind::Lease,
            "r" => TokenKind::Reservation,
            _ => return None,
        };
        let id = parts.next()?;
        let until_ms = parts.next()?.parse().ok()?;
        let rule = parts.next()?;
        let units: u64 = parts.next()?.parse().ok()?;
        let limits = parts
            .next()?
            .split(';')
            .map(parse_limit)
            .collect::<Option<Vec<_>>>()?;
        let last = parts.next()?;
        let (holder, taker) = match kind {
            TokenKind::Lease => (last, Taker::default()),
            TokenKind::Reservation => match last.split_once('|') {
                Some((tier, client)) => ("", Taker { tier, client }),
                None if last.is_empty() => ("", Taker::default()),
                None => return None,
            },
        };
        let well_formed = id.len() == 32
            && id.bytes().all(|b| b.is_ascii_hexdigit())
            && (1..=kind.most_units()).contains(&units)
            && (1..=MAX_LIMITS).contains(&limits.len());
        well_formed.then_some(GrantToken {
            kind,
            id,
            until_ms,
            rule,
            units,
            limits,
            holder,
            taker,
        })
    }

    /// What giving back `unused` of the grant's requests at `now_ms` asks of the store.
    pub fn refunds(&self, unused: u64, now_ms: u64) -> Vec<Refund> {
        // Remembered past the token's end, by more than controllers' clocks differ.
        let remember_ms = self.until_ms.saturating_sub(now_ms).saturating_add(60_000);
        self.limits
            .iter()
            .map(|limit| Refund {
                key: limit.key.to_owned(),
                params: limit.params,
                units: limit.cost.saturating_mul(unused),
                counted_in: limit.counted_in,
                grant: self.id.to_owned(),
                remember_ms,
                holder: self.holder.to_owned(),
            })
            .collect()
    }
}

fn parse_limit(text: &str) -> Option<GrantedLimit<'_>> {
    let mut fields = text.split(',');
    let key = fields.next()?;
    let strategy = match fields.next()? {
        "fixed_window" => Strategy::FixedWindow,
        "token_bucket" => Strategy::TokenBucket,
        "gcra" => Strategy::Gcra,
        _ => return None,
    };
    let mut number = || fields.next()?.parse::<u64>().ok();
    let (limit, period_ms, extra, cost, counted_in) =
        (number()?, number()?, number()?, number()?, number()?);
    if fields.next().is_some() || !keys::is_limit_key(strategy, key) {
        return None;
    }
    Some(GrantedLimit {
        key,
        params: Params {
            strategy,
            limit,
            period_ms,
            extra,
            penalty: None,
        },
        cost,
        counted_in,
    })
}

/// The start of the fixed window a lease was counted in, from the store's answer: the
/// window ends `reset_ms` after `now_ms`, and windows end on multiples of `window_ms`, so the
/// nearest multiple is its end (exact while the controller's clock is within half a window of
/// the store's).
pub fn counted_in(now_ms: u64, reset_ms: u64, window_ms: u64) -> u64 {
    if window_ms == 0 {
        return 0;
    }
    let ends = now_ms.saturating_add(reset_ms);
    let nearest = ends.saturating_add(window_ms / 2) / window_ms * window_ms;
    nearest.saturating_sub(window_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(strategy: Strategy) -> String {
        keys::limit_key(strategy, "hot", None)
    }

    fn token<'a>(keys: &'a [String], holder: &'a str) -> GrantToken<'a> {
        GrantToken {
            kind: TokenKind::Lease,
            id: "0123456789abcdef0123456789abcdef",
            until_ms: 1_800_000_060_000,
            rule: "hot",
            units: 40,
            limits: vec![
                GrantedLimit {
                    key: &keys[0],
                    params: Params {
                        strategy: Strategy::FixedWindow,
                        limit: 1_000,
                        period_ms: 60_000,
                        extra: 0,
                        penalty: None,
                    },
                    cost: 2,
                    counted_in: 1_800_000_000_000,
                },
                GrantedLimit {
                    key: &keys[1],
                    params: Params {
                        strategy: Strategy::Gcra,
                        limit: 10,
                        period_ms: 1_000,
                        extra: 5,
                        penalty: None,
                    },
                    cost: 1,
                    counted_in: 0,
                },
            ],
            holder,
            taker: Taker::default(),
        }
    }

    #[test]
    fn a_token_reads_back_as_written_whatever_its_holder_holds() {
        let keys = [key(Strategy::FixedWindow), key(Strategy::Gcra)];
        for holder in ["worker-1.00000000000000ff", "a|b;c,d|", ""] {
            let written = token(&keys, holder);
            let text = written.encode();
            assert_eq!(GrantToken::parse(&text), Some(written), "{text}");
        }
        for client in ["", "api_key:a|b;c,d|", "ip:10.0.0.1"] {
            let reservation = GrantToken {
                kind: TokenKind::Reservation,
                units: MAX_USAGE,
                taker: Taker {
                    tier: if client.is_empty() { "" } else { "gold" },
                    client,
                },
                ..token(&keys, "")
            };
            let text = reservation.encode();
            assert!(text.starts_with("r|"));
            assert_eq!(GrantToken::parse(&text), Some(reservation), "{text}");
        }
        // A reservation signed before its taker was carried still reads.
        let before = GrantToken {
            kind: TokenKind::Reservation,
            ..token(&keys, "")
        };
        assert_eq!(before.encode().rsplit('|').next(), Some(""));
        assert_eq!(GrantToken::parse(&before.encode()), Some(before));
    }

    #[test]
    fn a_token_that_is_not_one_is_refused() {
        let keys = [key(Strategy::FixedWindow), key(Strategy::Gcra)];
        let text = token(&keys, "w").encode();
        let broken = [
            text.replacen("g|", "x|", 1),
            text.replacen("|40|", "|0|", 1),
            text.replacen("|40|", "|1000000001|", 1),
            text.replacen("0123456789abcdef0123", "0123456789abcdefXX23", 1),
            text.replacen(",gcra,", ",sliding_window_log,", 1),
            text.replacen(",gcra,", ",fixed_window,", 1),
            text.replacen(",2,1800000000000;", ",2,1800000000000,9;", 1),
            text.replacen(",2,", ",two,", 1),
            "g|0123456789abcdef0123456789abcdef|1|hot|40".to_owned(),
        ];
        for bad in broken {
            assert_ne!(bad, text);
            assert_eq!(GrantToken::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn refunds_give_back_each_limit_its_cost_of_the_unused_requests() {
        let keys = [key(Strategy::FixedWindow), key(Strategy::Gcra)];
        let written = token(&keys, "w");
        let refunds = written.refunds(7, 1_800_000_050_000);
        assert_eq!(refunds.len(), 2);
        assert_eq!((refunds[0].units, refunds[1].units), (14, 7));
        assert_eq!(refunds[0].counted_in, 1_800_000_000_000);
        assert_eq!(refunds[0].remember_ms, 70_000);
        assert!(refunds
            .iter()
            .all(|r| r.grant == written.id && r.holder == "w"));
    }

    #[test]
    fn the_window_counted_in_is_found_from_the_reset_despite_some_skew() {
        let start = 1_800_000_000_000;
        // Granted 25 s into a minute: the store says 35 s are left.
        for skew in [-29_000_i64, -1, 0, 1, 29_000] {
            let now = (start as i64 + 25_000 + skew) as u64;
            assert_eq!(counted_in(now, 35_000, 60_000), start, "skew {skew}");
        }
        assert_eq!(counted_in(start + 999, 1, 1_000), start);
        assert_eq!(counted_in(5, 5, 0), 0);
    }
}
