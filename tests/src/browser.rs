//! A real headless Chromium driven over the DevTools protocol, through a pipe
//! (`--remote-debugging-pipe`: commands on its fd 3, answers and events on its fd 4, each a
//! JSON text ended by a NUL byte). No WebDriver, no WebSocket, no Node: the protocol is JSON
//! and the harness already speaks JSON. Every request a page makes is recorded from the
//! protocol's `Network.requestWillBeSent`, so a test can say where the page went.
//!
//! Chromium comes from the OS packages (`make chromium`; `CHROMIUM` names another binary).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::required_file;

/// The flags every test browser runs with: headless, nothing fetched for itself.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-default-browser-check",
    "--password-store=basic",
    "--remote-debugging-pipe",
];

/// How long one protocol command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub fn chromium_binary() -> PathBuf {
    required_file(
        "CHROMIUM",
        std::path::Path::new("/usr/bin/chromium"),
        "run `make chromium` first; `make test` does",
    )
}

/// Browser tests take turns: two cores are not enough for several Chromiums at once.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Inbox {
    answers: HashMap<u64, Value>,
    /// Events, in the order they came: (session id, method, params).
    events: Vec<(String, String, Value)>,
    closed: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    arrived: Condvar,
}

pub struct Browser {
    child: Child,
    commands: Mutex<ChildStdin>,
    next_id: Mutex<u64>,
    shared: Arc<Shared>,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

impl Browser {
    /// Starts Chromium with a fresh profile in a temporary directory.
    pub fn start() -> Browser {
        let profile = tempfile::tempdir().expect("temp dir");
        let log = profile.path().join("chromium.log");
        let log_file = std::fs::File::create(&log).expect("create log");
        // The shell puts the two pipes on the fds Chromium reads and writes (3 and 4), and
        // then becomes Chromium, in a process group of its own so that it and its helpers
        // can be stopped together.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"exec 3<&0 4>&1 0</dev/null 1>&2; exec setsid "$0" "$@""#)
            .arg(chromium_binary())
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
        let commands = child.stdin.take().expect("chromium's command pipe");
        let answers = child.stdout.take().expect("chromium's answer pipe");
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            arrived: Condvar::new(),
        });
        let reader = Arc::clone(&shared);
        std::thread::spawn(move || {
            let mut answers = BufReader::new(answers);
            let mut message = Vec::new();
            loop {
                message.clear();
                match answers.read_until(0, &mut message) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if message.last() == Some(&0) {
                    message.pop();
                }
                let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                    continue;
                };
                let mut inbox = reader.inbox.lock().expect("inbox");
                if let Some(id) = value["id"].as_u64() {
                    inbox.answers.insert(id, value);
                } else if let Some(method) = value["method"].as_str() {
                    let session = value["sessionId"].as_str().unwrap_or_default().to_owned();
                    inbox
                        .events
                        .push((session, method.to_owned(), value["params"].clone()));
                }
                drop(inbox);
                reader.arrived.notify_all();
            }
            reader.inbox.lock().expect("inbox").closed = true;
            reader.arrived.notify_all();
        });
        let browser = Browser {
            child,
            commands: Mutex::new(commands),
            next_id: Mutex::new(0),
            shared,
            _profile: profile,
            log,
        };
        // The browser answers once it is up.
        browser.command(None, "Browser.getVersion", json!({}));
        browser
    }

    /// What Chromium wrote to its stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One protocol command (on a page's session, or the browser's), and its result;
    /// panics on an error answer or no answer within [`COMMAND_TIMEOUT`].
    fn command(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = {
            let mut next = self.next_id.lock().expect("id");
            *next += 1;
            *next
        };
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        {
            let mut commands = self.commands.lock().expect("command pipe");
            commands
                .write_all(&bytes)
                .and_then(|()| commands.flush())
                .unwrap_or_else(|e| panic!("{method}: chromium is gone ({e}):\n{}", self.log()));
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut inbox = self.shared.inbox.lock().expect("inbox");
        loop {
            if let Some(answer) = inbox.answers.remove(&id) {
                if let Some(error) = answer.get("error") {
                    panic!("{method} failed: {error}");
                }
                return answer["result"].clone();
            }
            assert!(
                !inbox.closed,
                "{method}: chromium closed its pipe:\n{}",
                self.log()
            );
            let now = Instant::now();
            assert!(
                now < deadline,
                "{method}: no answer within {COMMAND_TIMEOUT:?}"
            );
            inbox = self
                .shared
                .arrived
                .wait_timeout(inbox, deadline - now)
                .expect("inbox")
                .0;
        }
    }

    /// A new tab, attached, with its network recorded.
    pub fn new_page(&self) -> Page<'_> {
        let target = self.command(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = self.command(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        let page = Page {
            browser: self,
            session,
        };
        page.command("Network.enable", json!({}));
        page.command("Page.enable", json!({}));
        page.command("Runtime.enable", json!({}));
        page.command("Log.enable", json!({}));
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium closes itself and its helpers; the group is killed if it does not.
        if let Ok(mut commands) = self.commands.lock() {
            let _ = commands.write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
            let _ = commands.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tab of a [`Browser`].
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Page<'_> {
    fn command(&self, method: &str, params: Value) -> Value {
        self.browser.command(Some(&self.session), method, params)
    }

    /// Opens `url` and waits until the page has loaded.
    pub fn goto(&self, url: &str) {
        let answer = self.command("Page.navigate", json!({ "url": url }));
        assert!(
            answer.get("errorText").is_none(),
            "{url} could not be opened: {answer}"
        );
        self.wait_for(
            &format!("{url} loaded"),
            Duration::from_secs(30),
            "document.readyState === 'complete'",
        );
    }

    /// The value of a JavaScript expression (a promise is waited for); panics if it throws.
    pub fn eval(&self, expression: &str) -> Value {
        let answer = self.command(
            "Runtime.evaluate",
            json!({
                "expression": expression,
                "returnByValue": true,
                "awaitPromise": true,
            }),
        );
        if let Some(exception) = answer.get("exceptionDetails") {
            panic!("`{expression}` threw: {exception}");
        }
        answer["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy, at most `timeout`; panics with `what` (and
    /// the last value of `show`, when given) if it never is.
    pub fn wait_for(&self, what: &str, timeout: Duration, expression: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(&format!("Boolean({expression})"));
            if value == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?} (`{expression}`)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `text` into the field `selector` names, as a keyboard would (its old value
    /// first selected, so replaced).
    pub fn type_into(&self, selector: &str, text: &str) {
        let found = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return false; \
             e.focus(); if (e.select) e.select(); return true; }})()",
            s = json!(selector)
        ));
        assert_eq!(found, json!(true), "no field {selector}");
        if text.is_empty() {
            self.command(
                "Input.dispatchKeyEvent",
                json!({ "type": "keyDown", "key": "Backspace", "code": "Backspace",
                        "windowsVirtualKeyCode": 8 }),
            );
            self.command(
                "Input.dispatchKeyEvent",
                json!({ "type": "keyUp", "key": "Backspace", "code": "Backspace",
                        "windowsVirtualKeyCode": 8 }),
            );
        } else {
            self.command("Input.insertText", json!({ "text": text }));
        }
    }

    /// Clicks the element `selector` names, with the mouse, at its middle.
    pub fn click(&self, selector: &str) {
        let middle = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            s = json!(selector)
        ));
        let (Some(x), Some(y)) = (middle[0].as_f64(), middle[1].as_f64()) else {
            panic!("no element {selector} to click");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.command(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// The text of the element `selector` names (empty when there is none).
    pub fn text(&self, selector: &str) -> String {
        self.eval(&format!(
            "(document.querySelector({s}) || {{}}).textContent || ''",
            s = json!(selector)
        ))
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Every URL this page has requested so far (documents, scripts, fetches, streams…),
    /// in order.
    pub fn requests(&self) -> Vec<String> {
        let inbox = self.browser.shared.inbox.lock().expect("inbox");
        inbox
            .events
            .iter()
            .filter(|(session, method, _)| {
                *session == self.session && method == "Network.requestWillBeSent"
            })
            .filter_map(|(_, _, params)| params["request"]["url"].as_str().map(str::to_owned))
            .collect()
    }

    /// The requests this page made to URLs ending in `suffix`: method and body (empty when
    /// there was none), in order.
    pub fn sent(&self, suffix: &str) -> Vec<(String, String)> {
        let inbox = self.browser.shared.inbox.lock().expect("inbox");
        inbox
            .events
            .iter()
            .filter(|(session, method, _)| {
                *session == self.session && method == "Network.requestWillBeSent"
            })
            .map(|(_, _, params)| &params["request"])
            .filter(|request| {
                request["url"]
                    .as_str()
                    .is_some_and(|url| url.ends_with(suffix))
            })
            .map(|request| {
                (
                    request["method"].as_str().unwrap_or_default().to_owned(),
                    request["postData"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Messages the page wrote to its console, errors it threw, and what the browser logged
    /// about it (`<source> <level>: <text>`).
    pub fn console(&self) -> Vec<String> {
        let inbox = self.browser.shared.inbox.lock().expect("inbox");
        inbox
            .events
            .iter()
            .filter(|(session, _, _)| *session == self.session)
            .filter_map(|(_, method, params)| match method.as_str() {
                "Runtime.consoleAPICalled" => Some(format!(
                    "console.{}: {}",
                    params["type"].as_str().unwrap_or_default(),
                    params["args"]
                )),
                "Runtime.exceptionThrown" => {
                    Some(format!("exception: {}", params["exceptionDetails"]))
                }
                // The browser's own: refused loads (Content-Security-Policy), network errors.
                "Log.entryAdded" => Some(format!(
                    "{} {}: {}",
                    params["entry"]["source"].as_str().unwrap_or_default(),
                    params["entry"]["level"].as_str().unwrap_or_default(),
                    params["entry"]["text"].as_str().unwrap_or_default()
                )),
                _ => None,
            })
            .collect()
    }
}
