//! The root context of a worker: configures the filter, owns the batch callouts, the reads
//! of the controller's configuration and the reports to it, and hands each request in a
//! batch its verdict. Everything it asks of Envoy goes through [`Host`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use sluice_protocol::config::Reported;
use sluice_protocol::rule_index::RuleIndex;
use sluice_protocol::rules::{failure_mode_for, matched_headers};
use sluice_protocol::FilterView;
use sluice_protocol::{
    Check, Decision, LeaseReturn, Rule, Settlement, CHECK_PATH, CONFIG_PATH, MAX_CALL_BODY_BYTES,
    MAX_REQUEST_FIGURES, MAX_SETTLEMENTS_PER_CALL, RELEASE_PATH, REPORTER_HEADER, REPORT_PATH,
};

/// This build's release (the workspace's semantic version), as its log and callouts name it.
pub const FILTER_VERSION: &str = env!("CARGO_PKG_VERSION");
const FILTER_USER_AGENT: &str = concat!("sluice-filter/", env!("CARGO_PKG_VERSION"));
/// Lease returns one release call carries at most (the controller's bound on a call).
const MAX_RETURNS_PER_CALL: usize = 1_024;
/// Settlements waiting that make Envoy's worker send them at once rather than with its
/// next tick (within the controller's [`MAX_SETTLEMENTS_PER_CALL`]).
const SETTLEMENTS_BATCH: usize = 256;
/// Most settlements a worker keeps waiting; beyond it (a host that calls out only from its
/// tick, under a load of usage rules) the oldest are dropped and their reservations stand.
const MAX_PENDING_SETTLEMENTS: usize = 8 * MAX_SETTLEMENTS_PER_CALL;

use crate::batch::{self, Batcher, Completed, Member, Outgoing, Slot};
use crate::config::{FailureMode, FilterConfig};
use crate::decision::{self, Counted, Failure, Verdict};
use crate::denial;
use crate::flavour;
use crate::host::{BufferType, Flavour, Host, LogLevel, MapType};
use crate::lease::Leases;
use crate::lists::List;
use crate::report::Tally;

/// Most requests that may wait for a batch on one worker; past it they get the failure mode.
pub const MAX_WAITING: usize = 10_000;
/// How often the root looks for a lost batch (and, while requests are held for a leaky
/// bucket's slot, how often it looks for the ones that are due).
pub const WATCHDOG_TICK_MS: u32 = 1_000;
pub const DELAY_TICK_MS: u32 = 5;
/// How often a worker reports to the controller (when it has anything to say).
pub const REPORT_EVERY_MS: u64 = 1_000;
/// Least time left of a batch's deadline for which it is tried on another controller.
const MIN_RETRY_MS: u64 = 10;

/// Largest callout reply read (the controller answers at most 1024 decisions).
const MAX_REPLY_BYTES: usize = 4 << 20;

/// The filter's counters in Envoy's stats (`wasmcustom.sluice_*`, summed over workers).
#[derive(Debug, Clone, Copy)]
pub enum Metric {
    /// Requests decided by the controller or the denial cache.
    Checks,
    Allowed,
    Limited,
    ShadowLimited,
    FailureAllowed,
    FailureDenied,
    DenialCacheHits,
    CalloutErrors,
    Safelisted,
    Denylisted,
    TokenRejected,
    /// Reads of the controller's configuration that it answered (changed or not).
    ConfigReads,
    /// Requests refused with 401 for an API key the controller does not know.
    UnknownApiKey,
    /// Batches sent once more after their callout found no controller.
    CalloutRetries,
    /// Requests admitted from a lease of a leased rule's quota, without a callout.
    LeasedAdmissions,
    /// Signatures of JWTs the filter's own verifier checked (up to 1.6 ms of CPU each for
    /// RS256); tokens answered from its caches are not counted.
    TokenSignatureChecks,
}

impl Metric {
    const ALL: [Metric; 16] = [
        Metric::Checks,
        Metric::Allowed,
        Metric::Limited,
        Metric::ShadowLimited,
        Metric::FailureAllowed,
        Metric::FailureDenied,
        Metric::DenialCacheHits,
        Metric::CalloutErrors,
        Metric::Safelisted,
        Metric::Denylisted,
        Metric::TokenRejected,
        Metric::ConfigReads,
        Metric::UnknownApiKey,
        Metric::CalloutRetries,
        Metric::LeasedAdmissions,
        Metric::TokenSignatureChecks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Checks => "sluice_checks",
            Metric::Allowed => "sluice_allowed",
            Metric::Limited => "sluice_limited",
            Metric::ShadowLimited => "sluice_shadow_limited",
            Metric::FailureAllowed => "sluice_failure_allowed",
            Metric::FailureDenied => "sluice_failure_denied",
            Metric::DenialCacheHits => "sluice_denial_cache_hits",
            Metric::CalloutErrors => "sluice_callout_errors",
            Metric::Safelisted => "sluice_safelisted",
            Metric::Denylisted => "sluice_denylisted",
            Metric::TokenRejected => "sluice_token_rejected",
            Metric::ConfigReads => "sluice_config_reads",
            Metric::UnknownApiKey => "sluice_unknown_api_key",
            Metric::CalloutRetries => "sluice_callout_retries",
            Metric::LeasedAdmissions => "sluice_leased_admissions",
            Metric::TokenSignatureChecks => "sluice_token_signature_checks",
        }
    }
}

/// Metric ids as Envoy gave them; a metric Envoy would not define is not counted.
pub struct Metrics([Option<u32>; Metric::ALL.len()]);

impl Metrics {
    fn define(host: &dyn Host) -> Self {
        Metrics(Metric::ALL.map(|metric| host.define_counter(metric.name()).ok()))
    }

    pub fn add(&self, host: &dyn Host, metric: Metric, by: u64) {
        if by == 0 {
            return;
        }
        if let Some(Some(id)) = self.0.get(metric as usize) {
            let _ = host.increment_metric(*id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }
}

/// What the root context of a worker shares with the requests on that worker. Each Envoy
/// worker runs its own VM, so this is single-threaded.
pub struct Worker {
    pub config: FilterConfig,
    pub batcher: RefCell<Batcher>,
    /// The shared queue a request pokes to wake the root (batching only).
    pub wake_queue: Option<u32>,
    /// The worker's root context: a callout made for many requests belongs to it (one a
    /// request's context makes may go with that context).
    root_context_id: u32,
    pub metrics: Metrics,
    /// The controller's configuration as last read.
    pub view: RefCell<ControllerView>,
    /// What the next report to the controller says (see [`crate::report`]).
    pub tally: RefCell<Tally>,
    /// Callouts requests made of their own (batching off), by token: Envoy delivers every
    /// reply to the root context, which hands these on.
    stream_calls: RefCell<HashMap<u32, u32>>,
    /// Concurrency leases to give back from the next tick (ngx_wasm_module: a callout from
    /// `on_log` traps there).
    pending_releases: RefCell<Vec<String>>,
    /// Leases' unused quota to give back with the next tick's release call.
    pending_returns: RefCell<Vec<LeaseReturn>>,
    /// Usage reservations to settle with the next release call.
    pending_settlements: RefCell<Vec<Settlement>>,
    /// Checks counted for the log sample (see [`Worker::sampled_for_log`]).
    checks_seen: Cell<u64>,
    /// Quota leased to this worker (leased rules only).
    pub leases: RefCell<Leases>,
    /// Requests admitted from leases and not yet in the metrics.
    leased_uncounted: Cell<u64>,
    /// When a failed decision was last logged (0: never), and the failures since.
    failure_log: Cell<(u64, u64)>,
    /// This worker's name as a lease holder: unique per VM.
    pub lease_holder: String,
}

pub fn log(host: &dyn Host, level: LogLevel, message: &str) {
    host.log(level, message);
}

impl Worker {
    /// Whether the next check is one of the `share` the controllers log if limited. Only
    /// those carry the request id: the rest of the checks go without it, as short as before.
    pub fn sampled_for_log(&self, share: f64) -> bool {
        if share <= 0.0 {
            return false;
        }
        let seen = self.checks_seen.get().wrapping_add(1);
        self.checks_seen.set(seen);
        sluice_protocol::sampled(seen, share)
    }

    /// Logs `message()` at debug, if the configuration's `log_level` asks for debug lines.
    pub fn debug(&self, host: &dyn Host, message: impl FnOnce() -> String) {
        if host.log_level() <= LogLevel::Debug {
            host.log(LogLevel::Debug, &message());
        }
    }

    /// The verdict for the controller's decision on a request, and how it counts (the caller
    /// adds it to the metrics, a batch at a time); remembers a denial for the denial cache.
    /// `request_id` is asked for only when the verdict is a local reply (it goes in the body).
    /// A lease that came with the decision is kept when `sent_at_ms` (when its check left)
    /// is known.
    pub fn settle(
        &self,
        host: &dyn Host,
        decision: &Decision,
        fingerprint: u64,
        sent_at_ms: Option<u64>,
        request_id: impl FnOnce() -> Option<String>,
    ) -> (Verdict, Counted) {
        if let Some(sent_at_ms) = sent_at_ms {
            let mut leases = self.leases.borrow_mut();
            leases.answered(fingerprint);
            if decision.grant.is_some() {
                leases.hold(fingerprint, decision, sent_at_ms, host.now_ms());
            }
        }
        let replies = !decision.allowed && !self.config.shadow;
        let request_id = if replies { request_id() } else { None };
        let (verdict, counted) =
            decision::verdict_for_decision(&self.config, decision, request_id.as_deref());
        if let (Counted::Limited, Some(slots)) = (counted, self.config.denial_cache_slots) {
            if let Some(entry) = denial::entry_for(fingerprint, decision, host.now_ms()) {
                let key = denial::slot_key(fingerprint, slots);
                // Last writer wins; a lost write only costs a later callout.
                let _ = host.set_shared_data(&key, &denial::encode(&entry));
            }
        }
        (verdict, counted)
    }

    /// Tallies an invalid token from `ip`, when the controller wants them reported.
    pub fn invalid_token(&self, ip: &str) {
        if self.view.borrow().report.invalid_tokens {
            self.tally.borrow_mut().invalid_token(ip);
        }
    }

    /// Counts decided requests: one host call per kind, however many requests.
    pub fn count(&self, host: &dyn Host, counted: impl IntoIterator<Item = Counted>) {
        let mut tally = [0u64; 4];
        for outcome in counted {
            if let Some(n) = tally.get_mut(outcome as usize) {
                *n += 1;
            }
        }
        let [allowed, limited, shadow, refused] = tally;
        let metrics = &self.metrics;
        metrics.add(host, Metric::Checks, allowed + limited + shadow + refused);
        metrics.add(host, Metric::Allowed, allowed);
        metrics.add(host, Metric::Limited, limited);
        metrics.add(host, Metric::ShadowLimited, shadow);
        metrics.add(host, Metric::UnknownApiKey, refused);
    }

    /// Admits the request from a lease this worker holds for its kind, if it has one with
    /// requests left: the verdict, with the lease's rate-limit headers.
    /// Counted in the metrics a batch or a tick later ([`Worker::count_leased`]): a host
    /// call per request would be most of what a leased admission costs.
    pub fn leased_admission(
        &self,
        check: &Check,
        fingerprint: u64,
        now_ms: u64,
    ) -> Option<Verdict> {
        let decision = self.leases.borrow_mut().admit(fingerprint, now_ms)?;
        self.leased_uncounted.set(self.leased_uncounted.get() + 1);
        if let Some(policy) = &decision.policy {
            self.tally.borrow_mut().leased(
                fingerprint,
                &check.client,
                &policy.rule,
                check.tier.as_deref(),
            );
        }
        let (verdict, _) = decision::verdict_for_decision(&self.config, &decision, None);
        Some(verdict)
    }

    /// Adds the requests admitted from leases since the last time to the metrics.
    pub fn count_leased(&self, host: &dyn Host) {
        let admitted = self.leased_uncounted.replace(0);
        self.metrics.add(host, Metric::LeasedAdmissions, admitted);
        self.metrics.add(host, Metric::Allowed, admitted);
    }

    /// A denial the cache still holds for this check, as the 429 to send.
    pub fn cached_denial(
        &self,
        host: &dyn Host,
        check: &Check,
        fingerprint: u64,
        request_id: impl FnOnce() -> Option<String>,
    ) -> Option<Verdict> {
        let slots = self.config.denial_cache_slots?;
        if self.config.shadow {
            return None;
        }
        let bytes = host
            .shared_data(&denial::slot_key(fingerprint, slots))
            .ok()??;
        let shown = denial::lookup(&bytes, fingerprint, host.now_ms())?;
        self.metrics.add(host, Metric::DenialCacheHits, 1);
        // Before the worker's first read of the configuration (its first second) the cache,
        // shared by every worker, may already answer: the controller always wants those.
        let (reported, sample) = {
            let view = self.view.borrow();
            (
                view.version.is_none() || view.report.cached_denials,
                view.limited_log_sample,
            )
        };
        if reported {
            let mut tally = self.tally.borrow_mut();
            let request_id = if tally.sampled(sample) {
                crate::stream::request_id(host)
            } else {
                None
            };
            tally.cached_denial(
                &check.client,
                &shown.policy.rule,
                check.tier.as_deref(),
                request_id,
            );
        }
        self.count(host, [Counted::Limited]);
        Some(decision::cached_denial(
            self.config.headers,
            &shown,
            request_id().as_deref(),
        ))
    }

    /// What happens to this check if the controller cannot answer: the failure mode of
    /// the rules that apply to it, else the filter's.
    pub fn failure_mode_for(&self, check: &Check) -> FailureMode {
        let view = self.view.borrow();
        // Enforcement switched off: nothing is refused, not even for want of an answer.
        if !view.enforce {
            return FailureMode::Allow;
        }
        let rules = view
            .failure_index
            .candidates(check)
            .into_iter()
            .filter_map(|position| view.failure_rules.get(position as usize));
        failure_mode_for(rules, check, self.config.failure_mode)
    }

    /// The verdicts of requests (by their failure modes) whose callout failed; counted and
    /// logged once.
    pub fn failure_verdicts(
        &self,
        host: &dyn Host,
        failure: &Failure,
        modes: &[FailureMode],
    ) -> Vec<Verdict> {
        let denied = modes.iter().filter(|m| **m == FailureMode::Deny).count();
        let allowed = modes.len() - denied;
        // At most one line a second: while the controller or its store is down every batch
        // fails, and a line per batch would flood Envoy's log. The metrics count them all.
        let now = host.now_ms();
        let (last, unlogged) = self.failure_log.get();
        if last == 0 || now.saturating_sub(last) >= FAILURE_LOG_EVERY_MS {
            log_failure(host, failure, allowed, denied, unlogged);
            self.failure_log.set((now.max(1), 0));
        } else {
            self.failure_log.set((last, unlogged + 1));
        }
        let metrics = &self.metrics;
        metrics.add(host, Metric::CalloutErrors, 1);
        metrics.add(host, Metric::FailureAllowed, allowed as u64);
        metrics.add(host, Metric::FailureDenied, denied as u64);
        modes
            .iter()
            .map(|mode| decision::verdict_for_failure(*mode))
            .collect()
    }

    /// Takes the controller's answer to `GET /v1/config`: a new version, or `304` for the
    /// one held. `tag` is the answer's entity tag, sent back with the next read.
    fn take_view(&self, host: &dyn Host, status: Option<&str>, body: &[u8], tag: Option<String>) {
        let view = match status {
            Some("304") => {
                self.metrics.add(host, Metric::ConfigReads, 1);
                return;
            }
            Some("200") => FilterView::from_json(body).map_err(|e| format!("malformed ({e})")),
            other => Err(format!("status {}", other.unwrap_or("(none)"))),
        };
        match view {
            Ok((view, ignored)) => {
                self.metrics.add(host, Metric::ConfigReads, 1);
                if !ignored.is_empty() {
                    // A controller a release ahead: what it adds waits for this filter's
                    // upgrade, and the operator should know that it does.
                    log(
                        host,
                        LogLevel::Info,
                        &format!(
                            "configuration version {} carries fields this filter does not know \
                             (a newer controller); they are ignored until the filter is \
                             upgraded: {}",
                            view.version,
                            ignored.join(", ")
                        ),
                    );
                }
                let own = view
                    .rules
                    .iter()
                    .filter(|r| r.failure_mode.is_some())
                    .count();
                log(
                    host,
                    LogLevel::Info,
                    &format!(
                        "read configuration version {} from the controller: {} rules ({own} with \
                         a failure mode of their own), {} safelist and {} denylist entries",
                        view.version,
                        view.rules.len(),
                        view.safelist.len(),
                        view.denylist.len()
                    ),
                );
                let mut view = ControllerView::from(view);
                view.entity_tag = tag;
                if self.view.borrow().version != view.version {
                    // Leases hold for the configuration they were granted under.
                    // What they hold unused goes back at once (from the next tick where
                    // a callout from a callout's answer may trap).
                    let returns = self.leases.borrow_mut().clear(host.now_ms());
                    if !returns.is_empty() {
                        let unused: u64 = returns.iter().map(|r| r.unused).sum();
                        log(
                            host,
                            LogLevel::Info,
                            &format!(
                                "configuration version {} drops this worker's leases: giving \
                                 back {unused} requests' worth unused",
                                view.version.unwrap_or(0)
                            ),
                        );
                    }
                    match host.flavour() {
                        Flavour::Envoy => self.release(host, Vec::new(), returns, Vec::new()),
                        Flavour::Ngx => self.pending_returns.borrow_mut().extend(returns),
                    }
                }
                *self.view.borrow_mut() = view;
            }
            // The configuration last read stays; the next tick tries again.
            Err(why) => log(
                host,
                LogLevel::Debug,
                &format!("could not read the controller's configuration: {why}"),
            ),
        }
    }

    /// Calls the controller from the current context: `POST` with a JSON body (check,
    /// release), `GET` without one (the configuration), with `extra` headers.
    pub fn call_controller(
        &self,
        host: &dyn Host,
        path: &str,
        body: Option<&[u8]>,
        extra: &[(&str, &str)],
    ) -> Result<u32, String> {
        let timeout_ms = u64::try_from(self.config.timeout.as_millis()).unwrap_or(u64::MAX);
        self.call_controller_within(host, path, body, extra, timeout_ms)
    }

    /// [`Worker::call_controller`] with a timeout of `timeout_ms` instead of the configured one.
    pub fn call_controller_within(
        &self,
        host: &dyn Host,
        path: &str,
        body: Option<&[u8]>,
        extra: &[(&str, &str)],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        let config = &self.config;
        let mut headers = vec![
            (":method", if body.is_some() { "POST" } else { "GET" }),
            (":path", path),
            (":authority", config.controller_authority.as_str()),
        ];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        // Which release asks, for the controller's log and an operator mid-upgrade.
        headers.push(("user-agent", FILTER_USER_AGENT));
        if let Some(credential) = &config.controller_credential {
            headers.push(("authorization", credential.expose()));
        }
        headers.extend_from_slice(extra);
        let timeout_ms = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
        host.http_call(
            &config.controller_cluster,
            &headers,
            body.unwrap_or_default(),
            timeout_ms,
        )
        .map_err(|status| status.to_string())
    }

    /// Notes that the callout `token` is the request `context_id`'s own.
    pub fn stream_call_sent(&self, token: u32, context_id: u32) {
        self.stream_calls.borrow_mut().insert(token, context_id);
    }

    /// The request whose own callout `token` is, if it is one.
    pub fn take_stream_call(&self, token: u32) -> Option<u32> {
        self.stream_calls.borrow_mut().remove(&token)
    }

    /// Gives back the concurrency leases of a request that ended (from its `on_log`): at
    /// once in Envoy; from the root's next tick where a callout from `on_log` traps. Its
    /// usage settlements wait for the next release call: the tick's, or Envoy's at once when
    /// [`SETTLEMENTS_BATCH`] wait.
    pub fn release_at_end(
        &self,
        host: &dyn Host,
        context_id: u32,
        leases: Vec<String>,
        settled: Vec<Settlement>,
    ) {
        let settlements = {
            let mut pending = self.pending_settlements.borrow_mut();
            pending.extend(settled);
            if pending.len() > MAX_PENDING_SETTLEMENTS {
                let dropped = pending.len() - MAX_PENDING_SETTLEMENTS;
                pending.drain(..dropped);
                log(
                    host,
                    LogLevel::Warn,
                    &format!("{dropped} usage settlements dropped (too many waiting): their reservations stand as charged"),
                );
            }
            let send_now = host.flavour() == Flavour::Envoy && pending.len() >= SETTLEMENTS_BATCH;
            if send_now {
                let count = pending.len().min(MAX_SETTLEMENTS_PER_CALL);
                pending.drain(..count).collect()
            } else {
                Vec::new()
            }
        };
        match host.flavour() {
            Flavour::Envoy => {
                self.release(host, leases, Vec::new(), Vec::new());
                // Other requests' settlements too: sent as the root's, then back to this one.
                if !settlements.is_empty()
                    && host.set_effective_context(self.root_context_id).is_ok()
                {
                    self.release(host, Vec::new(), Vec::new(), settlements);
                    let _ = host.set_effective_context(context_id);
                }
            }
            Flavour::Ngx => self.pending_releases.borrow_mut().extend(leases),
        }
    }

    /// The settlements for the tick's release call, as many as one call carries.
    fn settlements_due(&self) -> Vec<Settlement> {
        let mut pending = self.pending_settlements.borrow_mut();
        let count = pending.len().min(MAX_SETTLEMENTS_PER_CALL);
        pending.drain(..count).collect()
    }

    /// Gives back concurrency slots (`leases`) and leases' unused quota (`returns`), and
    /// settles usage reservations, in one call.
    pub fn release(
        &self,
        host: &dyn Host,
        leases: Vec<String>,
        returns: Vec<LeaseReturn>,
        settlements: Vec<Settlement>,
    ) {
        if leases.is_empty() && returns.is_empty() && settlements.is_empty() {
            return;
        }
        let mut settlements = settlements;
        let mut body = decision::release_request(&leases, &returns, &settlements);
        // Within what the controller reads: the rest waits for the next call.
        while body.len() > MAX_CALL_BODY_BYTES && settlements.len() > 1 {
            let later = settlements.split_off(settlements.len() / 2);
            self.pending_settlements.borrow_mut().splice(0..0, later);
            body = decision::release_request(&leases, &returns, &settlements);
        }
        let settling = settlements.len();
        if let Err(status) = self.call_controller(host, RELEASE_PATH, Some(&body), &[]) {
            log(
                host,
                LogLevel::Warn,
                &format!("could not release concurrency slots, give leases back or settle {settling} usage reservations ({status}); slots free themselves when their lease expires, leased quota stays spent, reservations stand as charged"),
            );
        }
    }
}

/// What the filter holds of the controller's configuration: the rules (for their failure
/// modes and the headers they match on) and the lists, compiled, with their version.
#[derive(Debug)]
pub struct ControllerView {
    /// `None` until the first read.
    pub version: Option<u64>,
    pub rules: Vec<Rule>,
    /// The rules that name a failure mode, and their index: every request asks them which
    /// failure mode is its own, so it must not walk every rule.
    failure_rules: Vec<Rule>,
    failure_index: RuleIndex,
    /// The request headers the rules match on, sent with each check.
    pub matched_headers: Vec<String>,
    pub safelist: List,
    pub denylist: List,
    /// What the controller wants reported.
    pub report: Reported,
    /// The emergency switch (see [`FilterView::enforce`]).
    pub enforce: bool,
    /// The share of limited requests the controllers log (see
    /// [`FilterView::limited_log_sample`]).
    pub limited_log_sample: f64,
    /// Whether a rule in force is leased: checks then name this worker as a lease holder,
    /// and requests look for a lease first.
    pub leased: bool,
    /// Whether a rule in force counts usage: checks then say the worker settles (never to a
    /// controller that has no usage rules: a 0.1.0 controller refuses the field).
    pub settles: bool,
    /// The usage rules that reserve what the request body says (`reserve_from`), and their
    /// index: a request they may apply to is checked once its body is in.
    reserve_rules: Vec<Rule>,
    reserve_index: RuleIndex,
    /// The entity tag of the view held: the version, and protection's blocks when there
    /// are any (they change the lists, not the version).
    pub entity_tag: Option<String>,
}

impl Default for ControllerView {
    /// Before the first read: no rules, no lists, nothing to report, enforcing.
    fn default() -> Self {
        ControllerView {
            version: None,
            ..ControllerView::from(FilterView::default())
        }
    }
}

impl From<FilterView> for ControllerView {
    fn from(view: FilterView) -> Self {
        let leased = view
            .rules
            .iter()
            .any(|rule| rule.leased.is_some() && !rule.shadow);
        let settles = view.rules.iter().any(|rule| rule.usage.is_some());
        let reserve_rules: Vec<Rule> = view
            .rules
            .iter()
            .filter(|rule| {
                !rule.shadow
                    && rule
                        .usage
                        .as_ref()
                        .is_some_and(|usage| usage.reserve_from.is_some())
            })
            .cloned()
            .collect();
        let failure_rules: Vec<Rule> = view
            .rules
            .iter()
            .filter(|rule| rule.failure_mode.is_some())
            .cloned()
            .collect();
        ControllerView {
            version: Some(view.version),
            failure_index: RuleIndex::new(failure_rules.iter().map(|rule| &rule.matcher)),
            failure_rules,
            matched_headers: matched_headers(&view.rules),
            rules: view.rules,
            safelist: List::from_items(&view.safelist),
            denylist: List::from_items(&view.denylist),
            report: view.report,
            enforce: view.enforce,
            limited_log_sample: view.limited_log_sample,
            leased,
            settles,
            reserve_index: RuleIndex::new(reserve_rules.iter().map(|rule| &rule.matcher)),
            reserve_rules,
            entity_tag: None,
        }
    }
}

impl ControllerView {
    /// The request-body pointers of the `reserve_from` rules that may apply to `check`
    /// (distinct, at most [`MAX_REQUEST_FIGURES`]). A rule matched by tier counts when the
    /// check names no tier: an API key's tier is known only to the controller.
    pub fn request_pointers(&self, check: &Check) -> Vec<String> {
        if self.reserve_rules.is_empty() {
            return Vec::new();
        }
        let mut pointers: Vec<String> = Vec::new();
        for position in self.reserve_index.candidates(check) {
            let Some(rule) = self.reserve_rules.get(position as usize) else {
                continue;
            };
            let untiered = || {
                let mut any_tier = check.clone();
                any_tier.tier = rule.matcher.tiers.first().cloned();
                rule.applies_to(&any_tier)
            };
            let applies = rule.applies_to(check)
                || (check.tier.is_none() && !rule.matcher.tiers.is_empty() && untiered());
            let pointer = rule.usage.as_ref().and_then(|u| u.reserve_from.as_ref());
            if let (true, Some(pointer)) = (applies, pointer) {
                if !pointers.contains(pointer) && pointers.len() < MAX_REQUEST_FIGURES {
                    pointers.push(pointer.clone());
                }
            }
        }
        pointers
    }
}

/// Longest entity tag taken from the controller.
const MAX_ENTITY_TAG: usize = 64;

/// The `etag` of a callout's answer, if it is one a header can carry back.
fn entity_tag(host: &dyn Host) -> Option<String> {
    host.header(MapType::CallResponseHeaders, "etag")
        .ok()
        .flatten()
        .filter(|tag| tag.len() <= MAX_ENTITY_TAG && tag.iter().all(u8::is_ascii_graphic))
        .and_then(|tag| String::from_utf8(tag).ok())
}

/// Whether the request that waits on `slot` is still there. Envoy may run a batch's reply
/// in the same event-loop turn in which it finished a request whose client left: the
/// request's context then still exists for `set_effective_context`, but it has been
/// finished, and a local reply to it would act on a stream that is gone. The request drops
/// its end of the slot when it finishes, so the count tells.
pub fn still_here(slot: &Slot) -> bool {
    Rc::strong_count(slot) > 1
}

/// The `:status` and body of the callout response being delivered. A status that is not
/// text is no status (the reply then counts as a failure).
pub fn call_response(host: &dyn Host, body_size: usize) -> (Option<String>, Vec<u8>) {
    let status = host
        .header(MapType::CallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let body = host
        .buffer(BufferType::CallResponseBody, body_size.min(MAX_REPLY_BYTES))
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

/// Envoy's `x-request-id` of a request in a batch, read from the root (only for the body of
/// a local reply, so that allowed requests do not pay for it).
fn request_id_of(host: &dyn Host, member: &Member) -> Option<String> {
    if !still_here(&member.slot) {
        return None;
    }
    host.set_effective_context(member.context_id).ok()?;
    crate::stream::request_id(host)
}

/// The least time between two lines about failed decisions.
const FAILURE_LOG_EVERY_MS: u64 = 1_000;

fn log_failure(host: &dyn Host, failure: &Failure, allowed: usize, denied: usize, unlogged: u64) {
    let what = |n: usize| {
        if n == 1 {
            "the request".to_owned()
        } else {
            format!("{n} requests")
        }
    };
    let outcome = match (allowed, denied) {
        (allowed, 0) => format!("allowing {} (failure mode allow)", what(allowed)),
        (0, denied) => format!("refusing {} (failure mode deny)", what(denied)),
        (allowed, denied) => {
            format!("allowing {allowed} and refusing {denied} requests (by their failure modes)")
        }
    };
    let since = if unlogged > 0 {
        format!(" ({unlogged} more failures since the last line, not logged)")
    } else {
        String::new()
    };
    log(
        host,
        LogLevel::Warn,
        &format!("no decision, {outcome}: {failure}{since}"),
    );
}

/// A worker's root context.
pub struct Root {
    context_id: u32,
    worker: Option<Rc<Worker>>,
    /// Requests admitted for a later slot (leaky bucket), held until due.
    delayed: Vec<(u64, u32, Slot)>,
    /// The configuration read that is out, and when the last one left.
    config_call: Option<u32>,
    config_read_at_ms: u64,
    report_sent_at_ms: u64,
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

impl Root {
    pub fn new(context_id: u32) -> Self {
        Root {
            context_id,
            worker: None,
            delayed: Vec::new(),
            config_call: None,
            config_read_at_ms: 0,
            report_sent_at_ms: 0,
        }
    }

    /// The worker state requests share, once configured.
    pub fn worker(&self) -> Option<Rc<Worker>> {
        self.worker.clone()
    }

    /// Reads and checks the plugin configuration; `false` refuses it (Envoy then does not
    /// start the filter), with the reason in Envoy's log.
    pub fn configure(&mut self, host: &dyn Host) -> bool {
        let bytes = match host.buffer(BufferType::PluginConfiguration, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log(
                    host,
                    LogLevel::Error,
                    &format!("cannot read the plugin configuration: {status}"),
                );
                return false;
            }
        };
        let mut config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(error) => {
                log(host, LogLevel::Error, &error.to_string());
                return false;
            }
        };
        // Named, or found out without a call that could trap (`flavour::probe`).
        let flavour = config.host.unwrap_or_else(|| flavour::probe(host));
        host.adopt(flavour, config.log_level);
        if flavour == Flavour::Ngx && config.batching {
            // Its shared queues must be declared in nginx's configuration (ours have names
            // unique per VM) and never call `on_queue_ready`; nor can the root resume a
            // request there. One callout per request works.
            log(
                host,
                LogLevel::Info,
                "batching is off: ngx_wasm_module cannot wake a root context from a request; \
                 each request makes its own callout",
            );
            config.batching = false;
        }
        let wake_queue = if config.batching {
            // One queue per worker VM: a queue wakes the root that registered it, so the
            // name must differ between VMs. Workers start at the same moment and may read
            // the same clock; std's hasher keys are random per VM (WASI random_get).
            let name = format!("sluice-wake-{}-{:016x}", self.context_id, random_u64());
            match host.register_shared_queue(&name) {
                Ok(queue) => Some(queue),
                Err(status) => {
                    log(
                        host,
                        LogLevel::Error,
                        &format!("cannot register the batching queue: {status}"),
                    );
                    return false;
                }
            }
        } else {
            None
        };
        let batcher = Batcher::new(batch::Limits {
            max_batch: config.max_batch_size,
            max_in_flight: config.max_batches_in_flight,
            max_waiting: MAX_WAITING,
        });
        let metrics = Metrics::define(host);
        log(
            host,
            LogLevel::Info,
            &format!(
                "sluice filter {FILTER_VERSION} configured (controller {}, host {})",
                config.controller_authority,
                match flavour {
                    Flavour::Envoy => "envoy",
                    Flavour::Ngx => "ngx",
                }
            ),
        );
        self.worker = Some(Rc::new(Worker {
            config,
            batcher: RefCell::new(batcher),
            wake_queue,
            root_context_id: self.context_id,
            metrics,
            view: RefCell::new(ControllerView::default()),
            tally: RefCell::new(Tally::default()),
            stream_calls: RefCell::new(HashMap::new()),
            pending_releases: RefCell::new(Vec::new()),
            pending_returns: RefCell::new(Vec::new()),
            pending_settlements: RefCell::new(Vec::new()),
            checks_seen: Cell::new(0),
            leases: RefCell::new(Leases::default()),
            leased_uncounted: Cell::new(0),
            failure_log: Cell::new((0, 0)),
            // Random per VM, as the queue's name: unique among every worker of every Envoy.
            lease_holder: format!("{:016x}{:016x}", random_u64(), random_u64()),
        }));
        let _ = host.set_tick_period_ms(self.context_id, WATCHDOG_TICK_MS);
        true
    }

    pub fn on_queue_ready(&mut self, host: &dyn Host, queue_id: u32) {
        while let Ok(Some(_)) = host.dequeue_shared_queue(queue_id) {}
        if let Some(worker) = self.worker.clone() {
            self.send_next_batch(host, &worker);
        }
    }

    pub fn on_tick(&mut self, host: &dyn Host) {
        self.resume_due(host);
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let releases = std::mem::take(&mut *worker.pending_releases.borrow_mut());
        let mut returns = std::mem::take(&mut *worker.pending_returns.borrow_mut());
        returns.extend(worker.leases.borrow_mut().returns_due(host.now_ms()));
        // As many as the controller takes in one call; the rest with the next tick.
        if returns.len() > MAX_RETURNS_PER_CALL {
            let later = returns.split_off(MAX_RETURNS_PER_CALL);
            worker.pending_returns.borrow_mut().extend(later);
        }
        worker.release(host, releases, returns, worker.settlements_due());
        self.read_config_when_due(host, &worker);
        self.report_when_due(host, &worker);
        worker.leases.borrow_mut().sweep(host.now_ms());
        worker.count_leased(host);
        let limit = u64::try_from(worker.config.timeout.as_millis()).unwrap_or(u64::MAX);
        let overdue = worker
            .batcher
            .borrow_mut()
            .overdue(host.now_ms(), limit.saturating_add(1_000));
        if !overdue.is_empty() {
            self.fail(
                host,
                &worker,
                overdue,
                &Failure::Status("(none: the batch was lost)".into()),
            );
        }
        // Requests are sent when they wake the root or a reply comes in; should a wake-up
        // have been lost, the tick sends whatever still waits.
        self.send_next_batch(host, &worker);
    }

    /// The reply to a batch, to the configuration read, or to a release (which needs
    /// nothing).
    pub fn on_http_call_response(&mut self, host: &dyn Host, token: u32, body_size: usize) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let completed = worker.batcher.borrow_mut().complete_batch(token);
        let Some(Completed {
            members,
            sent_at_ms,
            retry,
        }) = completed
        else {
            if self.config_call == Some(token) {
                self.config_call = None;
                let (status, body) = call_response(host, body_size);
                let tag = entity_tag(host);
                worker.take_view(host, status.as_deref(), &body, tag);
            }
            return;
        };
        let (status, body) = call_response(host, body_size);
        match decision::decisions_from_reply(status.as_deref(), &body, members.len()) {
            Ok(decisions) => {
                worker.debug(host, || {
                    let allowed = decisions.iter().filter(|d| d.allowed).count();
                    format!(
                        "a batch of {} checks was decided: {allowed} allowed, {} denied",
                        decisions.len(),
                        decisions.len() - allowed
                    )
                });
                let (verdicts, counted): (Vec<Verdict>, Vec<Counted>) = members
                    .iter()
                    .zip(&decisions)
                    .map(|(member, decision)| {
                        worker.settle(host, decision, member.fingerprint, Some(sent_at_ms), || {
                            request_id_of(host, member)
                        })
                    })
                    .unzip();
                worker.count(host, counted);
                self.deliver(host, &worker, members, verdicts);
            }
            Err(failure) => {
                let members = match retry {
                    Some(request)
                        if decision::another_host_may_answer(status.as_deref(), &body) =>
                    {
                        match self.try_again(host, &worker, members, sent_at_ms, request) {
                            Ok(()) => return,
                            Err(members) => members,
                        }
                    }
                    _ => members,
                };
                self.fail(host, &worker, members, &failure);
            }
        }
        self.send_next_batch(host, &worker);
    }

    /// Sends a batch whose callout found no controller once more, within what is left of
    /// its deadline: Envoy's load balancer picks the next host, and outlier detection and
    /// health checks take the dead one out soon after. Gives the members back if there is
    /// no time left or the call cannot be made.
    fn try_again(
        &mut self,
        host: &dyn Host,
        worker: &Worker,
        members: Vec<Member>,
        sent_at_ms: u64,
        request: Vec<u8>,
    ) -> Result<(), Vec<Member>> {
        let deadline = u64::try_from(worker.config.timeout.as_millis()).unwrap_or(u64::MAX);
        let left = deadline.saturating_sub(host.now_ms().saturating_sub(sent_at_ms));
        if left < MIN_RETRY_MS {
            return Err(members);
        }
        let sent = host
            .set_effective_context(self.context_id)
            .map_err(|status| status.to_string())
            .and_then(|()| {
                worker.call_controller_within(host, CHECK_PATH, Some(&request), &[], left)
            });
        match sent {
            Ok(token) => {
                worker.metrics.add(host, Metric::CalloutRetries, 1);
                worker
                    .batcher
                    .borrow_mut()
                    .sent_retriable(token, members, sent_at_ms, None);
                Ok(())
            }
            Err(why) => {
                worker.debug(host, || format!("could not try the batch again: {why}"));
                Err(members)
            }
        }
    }

    /// Sends the batches that may leave now (see [`Batcher::next_batch`]). The callout is
    /// made with the root as Envoy's current context, so that it belongs to the root and
    /// outlives any one request.
    fn send_next_batch(&mut self, host: &dyn Host, worker: &Worker) {
        worker.count_leased(host);
        let (leased, settles) = {
            let view = worker.view.borrow();
            (view.leased, view.settles)
        };
        let lease_holder = leased.then_some(worker.lease_holder.as_str());
        loop {
            let next = worker
                .batcher
                .borrow_mut()
                .next_batch(lease_holder, settles);
            let Some(Outgoing { members, body }) = next else {
                return;
            };
            let sent = host
                .set_effective_context(self.context_id)
                .map_err(|status| status.to_string())
                .and_then(|()| worker.call_controller(host, CHECK_PATH, Some(&body), &[]))
                .map(|token| (token, body));
            match sent {
                Ok((token, body)) => worker.batcher.borrow_mut().sent_retriable(
                    token,
                    members,
                    host.now_ms(),
                    Some(body),
                ),
                Err(why) => self.fail(host, worker, members, &Failure::Dispatch(why)),
            }
        }
    }

    fn fail(&mut self, host: &dyn Host, worker: &Worker, members: Vec<Member>, failure: &Failure) {
        {
            let mut leases = worker.leases.borrow_mut();
            for member in &members {
                leases.answered(member.fingerprint);
            }
        }
        let modes: Vec<FailureMode> = members.iter().map(|m| m.failure_mode).collect();
        let verdicts = worker.failure_verdicts(host, failure, &modes);
        self.deliver(host, worker, members, verdicts);
    }

    /// Hands each request its verdict and resumes or answers it. A request whose client is
    /// gone is skipped; the concurrency slots it was given go back at once.
    fn deliver(
        &mut self,
        host: &dyn Host,
        worker: &Worker,
        members: Vec<Member>,
        verdicts: Vec<Verdict>,
    ) {
        let mut orphaned_leases = Vec::new();
        let mut orphaned_settlements = Vec::new();
        for (member, verdict) in members.into_iter().zip(verdicts) {
            if !still_here(&member.slot) || host.set_effective_context(member.context_id).is_err() {
                if let Verdict::Continue { leases, usage, .. } = verdict {
                    orphaned_leases.extend(leases);
                    // Never went upstream: nothing was used.
                    orphaned_settlements.extend(usage.into_iter().map(|reserved| Settlement {
                        reservation: reserved.token,
                        used: 0,
                    }));
                }
                continue;
            }
            match &verdict {
                Verdict::Continue { delay_ms, .. } if *delay_ms > 0 => {
                    self.delayed.push((
                        host.now_ms().saturating_add(*delay_ms),
                        member.context_id,
                        Rc::clone(&member.slot),
                    ));
                    *member.slot.borrow_mut() = Some(verdict);
                }
                Verdict::Continue { .. } => {
                    *member.slot.borrow_mut() = Some(verdict);
                    let _ = host.resume_request();
                }
                Verdict::Reply { .. } => {
                    if !crate::stream::send_reply(host, &verdict, &worker.config.grpc_status) {
                        let _ = host.resume_request();
                    }
                    *member.slot.borrow_mut() = Some(verdict);
                }
            }
        }
        if !orphaned_settlements.is_empty() {
            worker
                .pending_settlements
                .borrow_mut()
                .extend(orphaned_settlements);
        }
        if !orphaned_leases.is_empty() && host.set_effective_context(self.context_id).is_ok() {
            worker.release(host, orphaned_leases, Vec::new(), Vec::new());
        }
        if !self.delayed.is_empty() {
            let _ = host.set_tick_period_ms(self.context_id, DELAY_TICK_MS);
        }
    }

    /// Reads the controller's configuration every `config_poll_ms`, one read at a time,
    /// naming the version held: an unchanged configuration costs a `304`.
    fn read_config_when_due(&mut self, host: &dyn Host, worker: &Worker) {
        let Some(interval) = worker.config.config_poll else {
            return;
        };
        let interval = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let now = host.now_ms();
        let since = now.saturating_sub(self.config_read_at_ms);
        // A read whose answer never came is given up after a few intervals.
        let stuck = since >= interval.saturating_mul(4);
        // Envoy's timer can fire a few ms early.
        if since + 20 < interval || (self.config_call.is_some() && !stuck) {
            return;
        }
        self.config_read_at_ms = now;
        let held = {
            let view = worker.view.borrow();
            view.entity_tag
                .clone()
                .or_else(|| view.version.map(|v| format!("\"{v}\"")))
        };
        let extra: Vec<(&str, &str)> = held
            .as_deref()
            .map(|tag| ("if-none-match", tag))
            .into_iter()
            .collect();
        self.config_call = worker.call_controller(host, CONFIG_PATH, None, &extra).ok();
    }

    /// Sends what was tallied, once a second at most; nobody waits for the answer (a lost
    /// report is one second less of signal).
    fn report_when_due(&mut self, host: &dyn Host, worker: &Worker) {
        let now = host.now_ms();
        // Envoy's timer can fire a few ms early.
        if now.saturating_sub(self.report_sent_at_ms) + 20 < REPORT_EVERY_MS {
            return;
        }
        let Some(report) = worker.tally.borrow_mut().take() else {
            return;
        };
        self.report_sent_at_ms = now;
        let sent = serde_json::to_vec(&report)
            .map_err(|e| e.to_string())
            .and_then(|body| {
                // The controller counts each reporter once a period.
                let reporter = [(REPORTER_HEADER, worker.lease_holder.as_str())];
                worker.call_controller(host, REPORT_PATH, Some(&body), &reporter)
            });
        if let Err(why) = sent {
            worker.debug(host, || format!("could not send the report: {why}"));
        }
    }

    fn resume_due(&mut self, host: &dyn Host) {
        let now = host.now_ms();
        self.delayed.retain(|(due, context_id, slot)| {
            if *due > now {
                return true;
            }
            // Due: the verdict no longer waits (a request whose body is held reads that).
            if let Some(Verdict::Continue { delay_ms, .. }) = slot.borrow_mut().as_mut() {
                *delay_ms = 0;
            }
            if still_here(slot) && host.set_effective_context(*context_id).is_ok() {
                let _ = host.resume_request();
            }
            false
        });
        if self.delayed.is_empty() {
            let _ = host.set_tick_period_ms(self.context_id, WATCHDOG_TICK_MS);
        }
    }
}
