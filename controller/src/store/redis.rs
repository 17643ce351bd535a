//! Counters in Redis, one Lua script per strategy (see `lua/`), run with EVALSHA (the
//! `redis` crate reloads a script that the server does not know). Time comes from Redis
//! `TIME` inside the scripts, so controllers with skewed clocks agree.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{LimitSpec, LimitState, Outcome, Store, StoreError};

const FIXED_WINDOW: &str = include_str!("../../../lua/fixed_window.lua");

pub struct RedisStore {
    /// A multiplexed connection that reconnects by itself; cloning shares it.
    connection: ConnectionManager,
    url_for_logs: String,
    fixed_window: Script,
}

impl RedisStore {
    /// Prepares a store for `url`. The connection is made on first use, so the controller
    /// starts (and reports not ready) while Redis is still coming up.
    pub fn new(url: &str, response_timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(response_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(RedisStore {
            connection,
            url_for_logs: redact_password(url),
            fixed_window: Script::new(FIXED_WINDOW),
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    fn describe(&self) -> String {
        format!("redis at {}", self.url_for_logs)
    }

    async fn fixed_window(&self, limits: &[LimitSpec], cost: u64) -> Result<Outcome, StoreError> {
        let mut invocation = self.fixed_window.prepare_invoke();
        invocation.arg(cost);
        for spec in limits {
            invocation
                .key(&spec.key)
                .arg(spec.limit)
                .arg(spec.window_ms);
        }
        let reply: Vec<i64> = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        decode_fixed_window(&reply, limits.len())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.connection.clone())
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Reply(format!("PING answered {pong:?}")))
        }
    }
}

/// Decodes the reply of `lua/fixed_window.lua` for `limits` limits.
fn decode_fixed_window(reply: &[i64], limits: usize) -> Result<Outcome, StoreError> {
    let malformed = || StoreError::Reply(format!("fixed_window returned {reply:?}"));
    let [allowed, denied_by, per_limit @ ..] = reply else {
        return Err(malformed());
    };
    if per_limit.len() != limits * 2 {
        return Err(malformed());
    }
    let denied_by = match (*allowed, *denied_by) {
        (1, 0) => None,
        (0, index) if index >= 1 && (index as usize) <= limits => Some(index as usize - 1),
        _ => return Err(malformed()),
    };
    let states = per_limit
        .chunks_exact(2)
        .map(|pair| LimitState {
            count: pair[0].max(0) as u64,
            reset_ms: pair[1].max(0) as u64,
        })
        .collect();
    Ok(Outcome { denied_by, states })
}

fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_allowed_and_denied_replies() {
        let allowed = decode_fixed_window(&[1, 0, 3, 900, 7, 50_000], 2).unwrap();
        assert_eq!(allowed.denied_by, None);
        assert_eq!(
            allowed.states[1],
            LimitState {
                count: 7,
                reset_ms: 50_000
            }
        );
        let denied = decode_fixed_window(&[0, 2, 3, 900, 10, 50_000], 2).unwrap();
        assert_eq!(denied.denied_by, Some(1));
    }

    #[test]
    fn refuses_malformed_replies() {
        for reply in [
            &[][..],
            &[1],
            &[1, 0, 3],
            &[0, 0, 3, 900],
            &[0, 3, 3, 900],
            &[2, 0, 1, 1],
        ] {
            assert!(decode_fixed_window(reply, 1).is_err(), "{reply:?}");
        }
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact_password("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(
            redact_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
