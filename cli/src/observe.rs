//! What the limiter is doing: `top` (the stats, redrawn), `watch` (the stats stream, a line
//! an event) and `hints`.

use std::io::{IsTerminal, Write};

use sluice_protocol::admin::{HintsBody, StatsBody, StatsEvent, TopClient};

use crate::args::{Top, Watch};
use crate::client::parse;
use crate::exit::{Done, Failure};
use crate::table::render;
use crate::Context;

fn percent(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

fn clients(title: &str, top: &[TopClient]) -> String {
    let rows: Vec<Vec<String>> = top
        .iter()
        .map(|c| {
            vec![
                format!("{} {}", c.client.kind, c.client.value),
                c.count.to_string(),
            ]
        })
        .collect();
    render(&[title, "COUNT"], &rows)
}

/// The stats as tables: per rule, per tier, and the top clients.
pub fn stats_table(stats: &StatsBody) -> String {
    let mut text = format!(
        "window {}: {} → {}, {} controller{}, {} decisions\n\n",
        stats.window,
        stats.from,
        stats.to,
        stats.controllers,
        if stats.controllers == 1 { "" } else { "s" },
        stats.decisions
    );
    let rules: Vec<Vec<String>> = stats
        .rules
        .iter()
        .map(|r| {
            vec![
                r.rule.clone(),
                r.allowed.to_string(),
                r.limited.to_string(),
                r.shadow_limited.to_string(),
                percent(r.near_limit_ratio),
                percent(r.max_used_ratio),
                r.clients.to_string(),
                r.limited_clients.to_string(),
            ]
        })
        .collect();
    text.push_str(&render(
        &[
            "RULE",
            "ALLOWED",
            "LIMITED",
            "SHADOW",
            "NEAR LIMIT",
            "MOST USED",
            "CLIENTS",
            "LIMITED CLIENTS",
        ],
        &rules,
    ));
    let tiers: Vec<Vec<String>> = stats
        .tiers
        .iter()
        .map(|t| {
            vec![
                t.tier.clone(),
                t.allowed.to_string(),
                t.limited.to_string(),
                t.shadow_limited.to_string(),
                t.refused.to_string(),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&render(
        &["TIER", "ALLOWED", "LIMITED", "SHADOW", "REFUSED"],
        &tiers,
    ));
    let usage: Vec<Vec<String>> = stats
        .rules
        .iter()
        .filter_map(|r| Some((format!("rule {}", r.rule), r.usage.as_ref()?)))
        .chain(
            stats
                .tiers
                .iter()
                .filter_map(|t| Some((format!("tier {}", t.tier), t.usage.as_ref()?))),
        )
        .map(|(name, u)| {
            vec![
                name,
                u.reserved.to_string(),
                u.settlements.to_string(),
                u.returned.to_string(),
                u.overshoot.to_string(),
                u.charged.to_string(),
            ]
        })
        .collect();
    if !usage.is_empty() {
        text.push('\n');
        text.push_str(&render(
            &[
                "USAGE",
                "RESERVED",
                "SETTLED",
                "RETURNED",
                "OVERSHOOT",
                "CHARGED",
            ],
            &usage,
        ));
    }
    text.push('\n');
    text.push_str(&clients("TOP LIMITED", &stats.top_limited));
    text.push('\n');
    text.push_str(&clients("TOP REQUESTING", &stats.top_requesting));
    if !stats.top_usage.is_empty() {
        text.push('\n');
        text.push_str(&clients("TOP USAGE", &stats.top_usage));
    }
    if stats.top_error_bound > 0 {
        text.push_str(&format!(
            "(top counts are at most {} over the truth)\n",
            stats.top_error_bound
        ));
    }
    text
}

pub fn top(context: &Context<'_>, top: &Top) -> Result<Done, Failure> {
    let path = format!("/stats?window={}&top={}", top.window.window, top.top);
    let render = |body: &str| -> Result<String, Failure> {
        if context.json {
            Ok(crate::pretty(body))
        } else {
            Ok(stats_table(&parse(body)?))
        }
    };
    if top.once {
        return render(&context.client.get(&path)?.body).map(Done::ok);
    }
    let terminal = std::io::stdout().is_terminal();
    let mut first = true;
    loop {
        let text = match context.client.get(&path) {
            Ok(answer) => render(&answer.body)?,
            // The first call says whether this can work at all (a token, stats kept); later
            // ones may fail for a moment while the controller restarts.
            Err(refusal) if first => return Err(refusal.into()),
            Err(refusal) => format!("sluice: {}\n", Failure::from(refusal)),
        };
        let mut out = std::io::stdout().lock();
        let screen = if terminal {
            "\x1b[2J\x1b[H"
        } else if first {
            ""
        } else {
            "\n"
        };
        let header = format!(
            "sluice top: every {}, Ctrl-C to stop (--once prints once)\n",
            sluice_protocol::duration::format_millis(
                u64::try_from(top.interval.as_millis()).unwrap_or(u64::MAX)
            )
        );
        if write!(out, "{screen}{header}{text}")
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (`sluice top | head`).
            return Ok(Done::ok(""));
        }
        first = false;
        std::thread::sleep(top.interval);
    }
}

/// One event as one line: when, the configuration's version, the state, the decisions
/// since the event before, and per rule.
pub fn event_line(event: &StatsEvent) -> String {
    let rates = &event.rates;
    let mut line = format!(
        "{}  configuration {}  {}  allowed {}  limited {}  shadow {}  refused {}  in {} ms",
        event.at,
        event.version,
        event.state.state.as_str(),
        rates.allowed,
        rates.limited,
        rates.shadow_limited,
        rates.refused,
        rates.interval_ms
    );
    let rules: Vec<String> = rates
        .rules
        .iter()
        .filter(|r| r.allowed + r.limited + r.shadow_limited > 0)
        .map(|r| {
            format!(
                "{} {}/{}/{}",
                r.rule, r.allowed, r.limited, r.shadow_limited
            )
        })
        .collect();
    if !rules.is_empty() {
        line.push_str(&format!("  | allowed/limited/shadow: {}", rules.join(", ")));
    }
    line
}

pub fn watch(context: &Context<'_>, watch: &Watch) -> Result<Done, Failure> {
    let path = format!(
        "/stats/stream?window={}&top={}",
        watch.window.window, watch.top
    );
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    let mut reader_gone = false;
    let stopped = context.client.events(&path, |event, data| {
        if event != "stats" {
            return true;
        }
        let line = if context.json {
            data.replace('\n', " ")
        } else {
            match serde_json::from_str::<StatsEvent>(data) {
                Ok(event) => event_line(&event),
                Err(error) => format!("(an event that does not read: {error})"),
            }
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            reader_gone = true;
            return false;
        }
        seen += 1;
        watch.count.is_none_or(|count| seen < count)
    })?;
    if stopped || reader_gone {
        Ok(Done::ok(""))
    } else {
        Err(Failure::refused(format!(
            "the controller ended the stream after {seen} events (it is stopping)"
        )))
    }
}

pub fn hints(context: &Context<'_>, window: &str) -> Result<Done, Failure> {
    let answer = context.client.get(&format!("/hints?window={window}"))?;
    context.show(&answer, |body| {
        let hints: HintsBody = parse(body)?;
        let rows: Vec<Vec<String>> = hints
            .hints
            .iter()
            .map(|h| vec![h.rule.clone(), h.kind.clone(), h.message.clone()])
            .collect();
        Ok(format!(
            "hints over {}:\n{}",
            hints.window,
            render(&["RULE", "KIND", "HINT"], &rows)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::admin::{RuleStats, TierStats, UsageStats};
    use sluice_protocol::ClientId;

    fn rule(name: &str, usage: Option<UsageStats>) -> RuleStats {
        RuleStats {
            rule: name.to_owned(),
            allowed: 3,
            limited: 0,
            shadow_limited: 0,
            near_limit: 0,
            near_limit_ratio: 0.0,
            max_used_ratio: 0.0,
            clients: 1,
            limited_clients: 0,
            usage,
        }
    }

    #[test]
    fn usage_shows_only_when_a_usage_rule_reserved_or_settled() {
        let usage = UsageStats {
            reserved: 3000,
            settlements: 3,
            returned: 1700,
            overshoot: 500,
            charged: 1800,
        };
        let mut stats = StatsBody {
            window: "1m".to_owned(),
            from: String::new(),
            to: String::new(),
            controllers: 1,
            decisions: 3,
            rules: vec![rule("requests", None), rule("tokens", Some(usage.clone()))],
            tiers: vec![TierStats {
                tier: "gold".to_owned(),
                allowed: 3,
                limited: 0,
                shadow_limited: 0,
                refused: 0,
                usage: Some(usage),
            }],
            top_limited: Vec::new(),
            top_requesting: Vec::new(),
            top_error_bound: 0,
            top_usage: vec![TopClient {
                client: ClientId {
                    kind: "ip".to_owned(),
                    value: "10.0.0.1".to_owned(),
                },
                count: 1800,
                error: 0,
            }],
        };
        let text = stats_table(&stats);
        let line = |start: &str| {
            text.lines()
                .find(|line| line.starts_with(start))
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_else(|| panic!("no line {start} in\n{text}"))
        };
        assert_eq!(
            line("rule tokens"),
            ["rule", "tokens", "3000", "3", "1700", "500", "1800"]
        );
        assert_eq!(line("tier gold")[2..], ["3000", "3", "1700", "500", "1800"]);
        assert_eq!(line("ip 10.0.0.1"), ["ip", "10.0.0.1", "1800"]);
        assert!(!text.contains("rule requests"), "{text}");

        stats.rules.truncate(1);
        stats.tiers[0].usage = None;
        stats.top_usage.clear();
        let text = stats_table(&stats);
        assert!(
            !text.contains("USAGE") && !text.contains("TOP USAGE"),
            "{text}"
        );
    }
}
