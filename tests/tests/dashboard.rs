//! The dashboard in a real headless Chromium against the controller binary: the page comes
//! from the controller alone and calls nothing else, traffic shows in its live chart without
//! a reload, its forms change the configuration through the admin API and show the API's
//! errors next to the fields they name, the `read` role changes nothing, and the token is
//! never in a URL.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_e2e::browser::{self, Browser, Page};
use sluice_e2e::controller::{ADMIN_TOKEN, READ_TOKEN};
use sluice_e2e::{http, Controller};

const CONFIGURATION: &str = r#"
[[tiers]]
name = "pro"
limit = 100
window = "1m"

[[rules]]
name = "per-client"
limit = 3
window = "1m"
"#;

/// Long enough for a loaded machine; every wait polls and ends as soon as it holds.
const WAIT: Duration = Duration::from_secs(30);
/// How long what must not follow a click is watched for: a click's request leaves the page
/// at once, and the page records it (and the controller answers it) within milliseconds.
const QUIET: Duration = Duration::from_secs(2);

/// Checks `unchanged` every 50 ms for [`QUIET`], failing with `what` and its message the
/// first time it does not hold.
#[track_caller]
fn stays_so_for_a_while(what: &str, mut unchanged: impl FnMut() -> Result<(), String>) {
    let until = std::time::Instant::now() + QUIET;
    loop {
        if let Err(change) = unchanged() {
            panic!("{what}: {change}");
        }
        if std::time::Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The methods of the requests the page sent to URLs ending in `suffix`.
fn methods_sent(page: &Page<'_>, suffix: &str) -> Vec<String> {
    page.sent(suffix)
        .into_iter()
        .map(|(method, _)| method)
        .collect()
}

/// Opens the dashboard and signs in with `token`, as a person would: typing it in.
fn open<'a>(browser: &'a Browser, controller: &Controller, token: &str) -> Page<'a> {
    let page = browser.new_page();
    page.goto(&controller.admin_url("/dashboard"));
    page.type_into("#login-form input[name=token]", token);
    page.click("#login-form button[type=submit]");
    page.wait_for(
        "the dashboard signed in and its stream live",
        WAIT,
        "!document.querySelector('#app').hidden \
         && document.querySelector('#connection').textContent === 'live' \
         && document.querySelector('#rules tbody tr')",
    );
    page
}

/// Every request the page made went to the controller's admin address, and none carried
/// the token in its URL; the token is in this tab's session storage only.
fn assert_stayed_home(page: &Page<'_>, controller: &Controller, token: &str) {
    let requests = page.requests();
    let home = controller.admin_url("/");
    assert!(
        requests.iter().any(|url| url.ends_with("/dashboard")),
        "the page's own request was recorded: {requests:?}"
    );
    for url in &requests {
        assert!(
            url.starts_with(&home),
            "the page requested {url}, not on {home}: {requests:?}"
        );
        assert!(!url.contains(token), "the token is in the URL {url}");
    }
    let href = page.eval("location.href");
    assert!(!href.as_str().unwrap_or_default().contains(token), "{href}");
    assert_eq!(page.eval("localStorage.length"), json!(0));
    assert_eq!(
        page.eval("sessionStorage.getItem('sluice.token')"),
        json!(token)
    );
    // Nothing thrown, nothing refused by the page's Content-Security-Policy (a load from
    // elsewhere is stopped before it is a request), no load failed.
    let console = page.console();
    let bad: Vec<_> = console
        .iter()
        .filter(|line| {
            line.starts_with("exception")
                || line.starts_with("console.error")
                || (line.contains(" error: ")
                    // The API's own refusals (a 400 the page shows) are answers, not failures.
                    && !line.contains("the server responded with a status of 4"))
                || line.contains("Content Security Policy")
        })
        .collect();
    assert!(bad.is_empty(), "the page went wrong: {bad:?}");
}

fn check(controller: &Controller, ip: &str) -> bool {
    let body = json!({ "checks": [{ "client": { "kind": "ip", "value": ip }, "path": "/" }] });
    let reply = http::post_check(&controller.url("/v1/check"), &body).expect("check answer");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    answer["decisions"][0]["allowed"]
        .as_bool()
        .unwrap_or_else(|| panic!("no decision in {answer}"))
}

#[test]
fn traffic_shows_in_the_live_chart_without_a_reload_and_the_page_calls_only_the_controller() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(CONFIGURATION, None);
    let browser = Browser::start();
    let page = open(&browser, &controller, ADMIN_TOKEN);
    // A reload would lose this.
    page.eval("window.sluiceTestMark = 'the same page'");
    page.wait_for(
        "the chart drawing events",
        WAIT,
        "Number(document.querySelector('#chart-overall').dataset.points) >= 1",
    );
    assert_eq!(
        page.eval("document.querySelector('#chart-overall').dataset.countLimited"),
        json!("0"),
        "nothing was limited before the test sent traffic"
    );

    let allowed = (0..10).filter(|_| check(&controller, "192.0.2.7")).count();
    assert_eq!(allowed, 3, "3 per minute per client");

    page.wait_for(
        "the 3 allowed and 7 limited decisions in the live chart",
        WAIT,
        "document.querySelector('#chart-overall').dataset.countAllowed === '3' \
         && document.querySelector('#chart-overall').dataset.countLimited === '7'",
    );
    // The limited line left the baseline somewhere.
    let drawn = page.eval(
        "Array.from(document.querySelector('#chart-overall polyline[data-series=limited]')\
         .getAttribute('points').split(' ')).some(p => Number(p.split(',')[1]) < 159)",
    );
    assert_eq!(drawn, json!(true), "the limited series is drawn above zero");
    page.wait_for(
        "the rule's minute, the top limited client and the tier in the live panels",
        WAIT,
        "(() => { const row = document.querySelector('#rules-live tr[data-rule=\"per-client\"]'); \
           return row && row.cells[4].textContent === '3' && row.cells[5].textContent === '7'; })() \
         && document.querySelector('#top-limited li[data-client=\"ip:192.0.2.7\"]') \
         && document.querySelector('#tiers-live tr[data-tier=\"default\"]')",
    );
    assert_eq!(
        page.eval("window.sluiceTestMark"),
        json!("the same page"),
        "the page was not reloaded"
    );
    assert_eq!(page.text("#state-value"), "NORMAL");
    assert!(
        page.requests()
            .iter()
            .any(|url| url.ends_with("/v1/admin/stats/stream")),
        "the figures came by the stream: {:?}",
        page.requests()
    );
    assert_stayed_home(&page, &controller, ADMIN_TOKEN);
}

#[test]
fn a_rule_made_and_edited_in_the_form_is_in_the_controllers_configuration() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(CONFIGURATION, None);
    let browser = Browser::start();
    let page = open(&browser, &controller, ADMIN_TOKEN);

    page.type_into("#rule-form [data-field=name]", "from-the-form");
    page.type_into("#rule-form [data-field=limit]", "42");
    page.type_into("#rule-form [data-field=window]", "30s");
    page.type_into("#rule-form [data-field='match.path_prefix']", "/api/");
    page.type_into("#rule-form [data-field='match.methods']", "GET, POST");
    page.click("#rule-form button[type=submit]");
    page.wait_for(
        "the new rule in the page's table",
        WAIT,
        "document.querySelector('#rules tr[data-rule=\"from-the-form\"]')",
    );
    let reply = controller.admin("GET", "/v1/admin/rules/from-the-form", None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let rule = reply.json();
    assert_eq!(rule["limit"], 42, "{rule}");
    assert_eq!(rule["window"], "30s", "{rule}");
    assert_eq!(rule["match"]["path_prefix"], "/api/", "{rule}");
    assert_eq!(rule["match"]["methods"], json!(["GET", "POST"]), "{rule}");
    // The change is in the audit the page shows, by the token's name.
    page.wait_for(
        "the change in the page's audit",
        WAIT,
        "Array.from(document.querySelectorAll('#audit tbody tr')).some(r => \
           r.cells[1].textContent === 'test' && r.cells[2].textContent === 'rule.create' \
           && r.cells[3].textContent === 'from-the-form')",
    );

    page.click("#rules tr[data-rule=\"from-the-form\"] button.edit");
    page.wait_for(
        "the form filled for editing",
        WAIT,
        "document.querySelector('#rule-form').dataset.editing === 'from-the-form' \
         && document.querySelector('#rule-form [data-field=limit]').value === '42'",
    );
    page.type_into("#rule-form [data-field=limit]", "43");
    page.click("#rule-form button[type=submit]");
    page.wait_for(
        "the edited rule in the page's table",
        WAIT,
        "(document.querySelector('#rules tr[data-rule=\"from-the-form\"]') || {cells: []}).cells[3]\
           ?.textContent === '43'",
    );
    let rule = controller
        .admin("GET", "/v1/admin/rules/from-the-form", None)
        .json();
    assert_eq!(rule["limit"], 43, "{rule}");
    assert_eq!(rule["window"], "30s", "the rest is kept: {rule}");

    // Delete asks once more, then deletes. The first click's handler has run once the
    // button asks; from then on no DELETE leaves the page and the rule stays.
    let delete = "#rules tr[data-rule=\"from-the-form\"] button.delete";
    page.click(delete);
    page.wait_for(
        "the delete button asking once more",
        WAIT,
        &format!(
            "(b => b && b.dataset.armed === '1' && b.textContent === 'really delete?')\
             (document.querySelector({}))",
            json!(delete)
        ),
    );
    stays_so_for_a_while("one click does not delete", || {
        let sent = methods_sent(&page, "/v1/admin/rules/from-the-form");
        if sent.iter().any(|method| method == "DELETE") {
            return Err(format!("the page sent {sent:?}"));
        }
        match controller
            .admin("GET", "/v1/admin/rules/from-the-form", None)
            .status
        {
            200 => Ok(()),
            status => Err(format!("the rule answers {status}")),
        }
    });
    page.click(delete);
    page.wait_for(
        "the rule gone from the page",
        WAIT,
        "!document.querySelector('#rules tr[data-rule=\"from-the-form\"]')",
    );
    assert_eq!(
        controller
            .admin("GET", "/v1/admin/rules/from-the-form", None)
            .status,
        404
    );
    assert_stayed_home(&page, &controller, ADMIN_TOKEN);
}

#[test]
fn editing_a_rule_in_the_form_keeps_what_the_form_does_not_show() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(CONFIGURATION, None);
    let rule = json!({
        "name": "rich", "limit": 500, "window": "1m", "cost": 2, "failure_mode": "deny",
        "leased": { "share_percent": 10 },
        "match": { "host": "api.example.com", "path_prefix": "/v1/" },
    });
    let made = controller.admin("POST", "/v1/admin/rules", Some(&rule));
    assert_eq!(made.status, 201, "{}", made.body);
    let browser = Browser::start();
    let page = open(&browser, &controller, ADMIN_TOKEN);
    page.wait_for(
        "the rule in the page's table",
        WAIT,
        "document.querySelector('#rules tr[data-rule=\"rich\"]')",
    );
    page.click("#rules tr[data-rule=\"rich\"] button.edit");
    page.wait_for(
        "the form filled for editing",
        WAIT,
        "document.querySelector('#rule-form').dataset.editing === 'rich'",
    );
    page.type_into("#rule-form [data-field=limit]", "600");
    // A field the form shows, emptied, is removed.
    page.type_into("#rule-form [data-field='match.path_prefix']", "");
    page.click("#rule-form button[type=submit]");
    page.wait_for(
        "the edited rule in the page's table",
        WAIT,
        "(document.querySelector('#rules tr[data-rule=\"rich\"]') || {cells: []}).cells[3]\
           ?.textContent === '600'",
    );
    let edited = controller.admin("GET", "/v1/admin/rules/rich", None).json();
    assert_eq!(
        edited,
        json!({
            "name": "rich", "strategy": "fixed_window", "scope": "client", "limit": 600,
            "window": "1m", "cost": 2, "failure_mode": "deny",
            "leased": { "share_percent": 10 },
            "match": { "host": "api.example.com" },
        })
    );
}

/// What the API itself answers for the body the page last sent to `path`: the field and
/// the message the page must show next to it.
fn api_error(page: &Page<'_>, controller: &Controller, path: &str) -> (String, String) {
    let (method, body) = page
        .sent(path)
        .into_iter()
        .rev()
        .find(|(method, _)| method == "POST")
        .unwrap_or_else(|| panic!("the page sent nothing to {path}"));
    let token = format!("Bearer {ADMIN_TOKEN}");
    let reply = http::request(
        &method,
        &controller.admin_url(path),
        &[("authorization", token.as_str())],
        Some(body.clone()),
    )
    .expect("an answer");
    assert_eq!(reply.status, 400, "{body}: {}", reply.body);
    let error = reply.json();
    (
        error["field"].as_str().expect("a field").to_owned(),
        error["message"].as_str().expect("a message").to_owned(),
    )
}

/// The texts of the form's error slots, by the field they are for, that are not empty.
fn errors_shown(page: &Page<'_>, form: &str) -> Value {
    page.eval(&format!(
        "Object.fromEntries(Array.from(document.querySelectorAll('{form} .field-error'))\
           .filter(e => e.textContent !== '').map(e => [e.dataset.errorFor, e.textContent]))"
    ))
}

#[test]
fn a_bad_value_shows_the_apis_error_next_to_the_field_it_names() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(CONFIGURATION, None);
    let browser = Browser::start();
    let page = open(&browser, &controller, ADMIN_TOKEN);

    // A window that is not a duration.
    page.type_into("#rule-form [data-field=name]", "bad-window");
    page.type_into("#rule-form [data-field=limit]", "5");
    page.type_into("#rule-form [data-field=window]", "5 fortnights");
    page.click("#rule-form button[type=submit]");
    page.wait_for(
        "an error next to the window field",
        WAIT,
        "document.querySelector('#rule-form .field-error[data-error-for=\"window\"]').textContent",
    );
    let (field, message) = api_error(&page, &controller, "/v1/admin/rules");
    assert_eq!(field, "window");
    assert_eq!(
        errors_shown(&page, "#rule-form"),
        json!({ "window": message })
    );
    assert_eq!(
        page.eval(
            "document.querySelector('#rule-form [data-field=window]').getAttribute('aria-invalid')"
        ),
        json!("true")
    );
    assert_eq!(
        controller
            .admin("GET", "/v1/admin/rules/bad-window", None)
            .status,
        404,
        "a refused change changes nothing"
    );

    // A limit that is not a number: the API's error, now next to the limit.
    page.type_into("#rule-form [data-field=window]", "1m");
    page.type_into("#rule-form [data-field=limit]", "lots");
    page.click("#rule-form button[type=submit]");
    page.wait_for(
        "an error next to the limit field",
        WAIT,
        "document.querySelector('#rule-form .field-error[data-error-for=\"limit\"]').textContent",
    );
    let (field, message) = api_error(&page, &controller, "/v1/admin/rules");
    assert_eq!(field, "limit");
    assert_eq!(
        errors_shown(&page, "#rule-form"),
        json!({ "limit": message })
    );

    // A tier with a name the API refuses.
    page.type_into("#tier-form [data-field=name]", "no spaces allowed");
    page.type_into("#tier-form [data-field=limit]", "10");
    page.click("#tier-form button[type=submit]");
    page.wait_for(
        "an error next to the tier's name",
        WAIT,
        "document.querySelector('#tier-form .field-error[data-error-for=\"name\"]').textContent",
    );
    let (field, message) = api_error(&page, &controller, "/v1/admin/tiers");
    assert_eq!(field, "name");
    assert_eq!(
        errors_shown(&page, "#tier-form"),
        json!({ "name": message })
    );
    assert_stayed_home(&page, &controller, ADMIN_TOKEN);
}

#[test]
fn the_read_role_sees_everything_and_every_change_is_disabled() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(CONFIGURATION, None);
    let browser = Browser::start();
    let page = open(&browser, &controller, READ_TOKEN);

    assert!(
        page.text("#who").contains("(read)"),
        "{}",
        page.text("#who")
    );
    // Everything is shown.
    page.wait_for(
        "the rules, the tiers and the live figures",
        WAIT,
        "document.querySelector('#rules tr[data-rule=\"per-client\"]') \
         && document.querySelector('#tiers tr[data-tier=\"pro\"]') \
         && Number(document.querySelector('#chart-overall').dataset.points) >= 1 \
         && document.querySelector('#state-value').textContent === 'NORMAL'",
    );
    // Nothing can be changed.
    let forms = page
        .eval("Array.from(document.querySelectorAll('form.entity fieldset')).map(f => f.disabled)");
    assert_eq!(
        forms,
        json!([true, true, true, true]),
        "every form is disabled"
    );
    let buttons = page.eval(
        "Array.from(document.querySelectorAll('.admin-only')).map(b => [b.id || b.className, b.disabled])",
    );
    let buttons = buttons.as_array().expect("buttons");
    // The three state buttons, and edit and delete of the rule and of the tier.
    assert!(buttons.len() >= 7, "{buttons:?}");
    assert!(
        buttons.iter().all(|b| b[1] == json!(true)),
        "every change button is disabled: {buttons:?}"
    );
    assert!(!page
        .eval("document.querySelector('.read-only-note').hidden")
        .as_bool()
        .unwrap_or(true));
    // A disabled button does nothing when clicked: no request leaves the page (the API
    // would refuse the read role anyway, so the state alone could not tell), the state
    // stays, and the page shows no error.
    page.click("#state-degraded");
    stays_so_for_a_while("a disabled button does nothing", || {
        let sent = methods_sent(&page, "/v1/admin/state");
        if sent.iter().any(|method| method != "GET") {
            return Err(format!("the page sent {sent:?} to /v1/admin/state"));
        }
        let error = page.text("#state-error");
        if !error.is_empty() {
            return Err(format!("the page shows {error:?}"));
        }
        let state = controller.admin("GET", "/v1/admin/state", None).json();
        if state["state"] != "NORMAL" {
            return Err(format!("the state is {state}"));
        }
        Ok(())
    });
    assert_stayed_home(&page, &controller, READ_TOKEN);
}

#[test]
fn the_state_switch_and_a_new_api_key_shown_once() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(CONFIGURATION, None);
    let browser = Browser::start();
    let page = open(&browser, &controller, ADMIN_TOKEN);

    page.click("#state-degraded");
    page.wait_for(
        "the page showing DEGRADED",
        WAIT,
        "document.querySelector('#state-value').textContent === 'DEGRADED'",
    );
    let state = controller.admin("GET", "/v1/admin/state", None).json();
    assert_eq!(state["state"], "DEGRADED", "{state}");
    assert_eq!(
        state["automatic"], false,
        "an operator's state is pinned: {state}"
    );
    page.click("#state-automatic");
    page.wait_for(
        "the state handed back to the signal",
        WAIT,
        "document.querySelector('#state-detail').textContent.startsWith('automatic')",
    );
    assert_eq!(
        controller.admin("GET", "/v1/admin/state", None).json()["automatic"],
        true
    );

    page.type_into("#key-form [data-field=name]", "ci");
    page.type_into("#key-form [data-field=user]", "acme");
    page.type_into("#key-form [data-field=tier]", "pro");
    page.click("#key-form button[type=submit]");
    page.wait_for(
        "the new key shown",
        WAIT,
        "!document.querySelector('#new-key').hidden \
         && document.querySelector('#new-key-value').textContent.startsWith('sk_')",
    );
    let key = page.text("#new-key-value");
    let digest: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stored = controller
        .admin("GET", &format!("/v1/admin/api-keys/{digest}"), None)
        .json();
    assert_eq!(stored["user"], "acme", "{stored}");
    assert_eq!(stored["tier"], "pro", "{stored}");
    page.wait_for(
        "the key listed by its digest only",
        WAIT,
        &format!("document.querySelector('#api-keys tr[data-key=\"{digest}\"]')"),
    );
    assert!(
        !page
            .eval("document.querySelector('#api-keys').textContent")
            .as_str()
            .unwrap_or_default()
            .contains(&key),
        "the list holds no key in clear"
    );
    page.click("#new-key-dismiss");
    assert_eq!(page.text("#new-key-value"), "", "shown once, then gone");
    assert!(
        !page.requests().iter().any(|url| url.contains(&key)),
        "the key is in no URL"
    );
    assert_stayed_home(&page, &controller, ADMIN_TOKEN);
}

/// An open stats stream (a dashboard left open) does not hold the controller's graceful
/// shutdown up: on SIGTERM the stream ends and the controller exits.
#[test]
fn an_open_stream_ends_when_the_controller_stops() {
    use std::io::{Read, Write};
    let mut controller = Controller::start(CONFIGURATION, None);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", controller.admin_port))
        .expect("connect to the admin API");
    write!(
        stream,
        "GET /v1/admin/stats/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {ADMIN_TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send the request");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let mut seen = Vec::new();
    let mut read = |seen: &mut Vec<u8>| -> bool {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                seen.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(e) => panic!("reading the stream: {e}"),
        }
    };
    sluice_e2e::wait_until("the first event", WAIT, || {
        read(&mut seen);
        String::from_utf8_lossy(&seen).contains("event: stats")
    });
    let head = String::from_utf8_lossy(&seen).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &controller.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut open = true;
    sluice_e2e::wait_until("the stream to end after SIGTERM", WAIT, || {
        open = read(&mut seen);
        !open
    });
    sluice_e2e::wait_until("the controller to say it stopped", WAIT, || {
        controller.log().contains("shutting down")
    });
    controller.stop();
}

#[test]
fn settled_usage_shows_per_rule_tier_and_client_once_there_is_some() {
    let _turn = browser::one_at_a_time();
    let controller = Controller::start(
        r#"
[[rules]]
name = "llm-tokens"
limit = 100000
window = "1h"
usage = { json_pointer = "/usage/total_tokens", reserve = 1000 }
"#,
        None,
    );
    let browser = Browser::start();
    let page = open(&browser, &controller, ADMIN_TOKEN);
    page.wait_for(
        "the first stats event",
        WAIT,
        "Number(document.querySelector('#chart-overall').dataset.points) >= 1",
    );
    assert_eq!(
        page.eval("document.querySelector('#usage-panel').hidden"),
        json!(true),
        "no usage yet: the panel is hidden"
    );

    let body = json!({
        "checks": [{ "client": { "kind": "ip", "value": "192.0.2.9" }, "path": "/" }],
        "settles": true,
    });
    let decision = http::post_check(&controller.url("/v1/check"), &body)
        .expect("check answer")
        .json();
    let token = decision["decisions"][0]["usage"][0]["token"].clone();
    assert!(token.is_string(), "a reservation: {decision}");
    let settled = http::post_check(
        &controller.url("/v1/release"),
        &json!({ "settlements": [{ "reservation": token, "used": 1234 }] }),
    )
    .expect("release answer");
    assert_eq!(settled.status, 200, "{}", settled.body);

    page.wait_for(
        "the rule's and the tier's usage, and the client that used it",
        WAIT,
        "(() => { const row = document.querySelector('#usage-live tr[data-rule=\"llm-tokens\"]'); \
           const tier = document.querySelector('#usage-live tr[data-tier=\"default\"]'); \
           const client = document.querySelector('#top-usage li[data-client=\"ip:192.0.2.9\"]'); \
           return row && tier && client && !document.querySelector('#usage-panel').hidden \
             && row.cells[1].textContent === '1000' && row.cells[4].textContent === '234' \
             && row.cells[5].textContent === '1234' && client.textContent.includes('1234'); })()",
    );
    assert_stayed_home(&page, &controller, ADMIN_TOKEN);
}
