//! A headless Chromium in a test's namespace, driven through ChromeDriver's WebDriver
//! protocol (W3C WebDriver over HTTP/JSON).
//!
//! [`Browser::start`] runs `chromedriver` inside a namespace (so that the browser it starts
//! reaches what listens on that namespace's loopback, such as the coordinator's admin API)
//! and opens a session on a fresh profile in the scratch directory. The test process talks to
//! ChromeDriver over a TCP connection opened from inside the namespace: a short-lived thread
//! enters it (`setns`) just to connect, and the socket stays in that namespace afterwards.
//! The requests are plain HTTP/1.1 with `Connection: close`, one per command.
//!
//! Dropping the [`Browser`] ends the session (ChromeDriver closes Chromium), then
//! ChromeDriver by its pid, then any Chromium process still running on this browser's
//! profile directory, by pid.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::scratch::ScratchDir;
use crate::{skipping_allowed, target_profile_dir};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The port ChromeDriver listens on, on the loopback of the namespace it runs in.
pub const DRIVER_PORT: u16 = 9515;
/// How long ChromeDriver and a new session may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read from ChromeDriver (a screenshot of a large window is a few MiB).
const MAX_ANSWER: u64 = 64 << 20;
/// The key of an element reference in WebDriver's JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whether Chromium and ChromeDriver are installed.
///
/// Returns `true` when both are. Otherwise, on a developer's machine, prints one line saying
/// what is missing and returns `false`; the caller then returns early.
///
/// # Panics
/// When they are missing and skipping is not allowed (`CI=true` or
/// `MESHLINK_REQUIRE_NETNS=1`, see [`crate::require_root`]).
pub fn require_browser() -> bool {
    let missing: Vec<&str> = [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")]
        .into_iter()
        .filter(|(path, _)| !Path::new(path).is_file())
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    assert!(
        skipping_allowed(|k| std::env::var(k).ok()),
        "this test needs a browser ({install}), and CI=true or MESHLINK_REQUIRE_NETNS=1 forbids \
         skipping it"
    );
    let _ = writeln!(std::io::stderr(), "skipped: needs a browser: {install}");
    false
}

/// Where a test's artefacts (screenshots) go: `$MESHLINK_TEST_ARTEFACTS/<test>` if set, else
/// `<target>/test-artefacts/<test>`. Unlike the scratch directory it is kept after a test
/// that passes.
///
/// # Panics
/// When the directory cannot be made.
pub fn artefacts_dir(test: &str) -> PathBuf {
    let base = match std::env::var_os("MESHLINK_TEST_ARTEFACTS") {
        Some(dir) => PathBuf::from(dir),
        None => target_profile_dir()
            .parent()
            .map_or_else(target_profile_dir, Path::to_path_buf)
            .join("test-artefacts"),
    };
    let dir = base.join(test);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A WebDriver command that failed: ChromeDriver's error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebDriverError {
    /// The HTTP status.
    pub status: u16,
    /// WebDriver's error code (`no such element`, `javascript error`, ...).
    pub error: String,
    /// Its message.
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.message)
    }
}

/// A headless Chromium session, through ChromeDriver in a namespace.
#[derive(Debug)]
pub struct Browser {
    ns: NsRef,
    session: Option<String>,
    profile: PathBuf,
    driver: Process,
}

impl Browser {
    /// Starts ChromeDriver in `ns` and a headless Chromium session with a fresh profile in
    /// `dir`, its window `width` x `height`.
    ///
    /// # Panics
    /// When ChromeDriver does not come up or refuses the session; the message carries its log.
    pub fn start(ns: &NsRef, dir: &ScratchDir, width: u32, height: u32) -> Browser {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", profile.display()));
        let mut cmd = ns.daemon_command(CHROMEDRIVER);
        cmd.arg(format!("--port={DRIVER_PORT}")).arg(format!(
            "--log-path={}",
            dir.join("chromedriver.log").display()
        ));
        let driver = Process::spawn(
            &format!("chromedriver in {}", ns.name()),
            cmd,
            &dir.join("chromedriver.out"),
            Stdout::Log,
        );
        let mut browser = Browser {
            ns: ns.clone(),
            session: None,
            profile,
            driver,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let answer = browser.exchange("GET", "/status", None);
            match answer {
                Ok(Ok(v)) if v["ready"] == true => break,
                _ if Instant::now() > deadline => panic!(
                    "chromedriver not ready within {START_TIMEOUT:?} (last: {answer:?}); log:\n{}",
                    browser.driver.log_tail(40)
                ),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let args = [
            "--headless".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-quic".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--hide-scrollbars".to_string(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser.profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let session = browser
            .call("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver refused a session: {e}; log:\n{}",
                    browser.driver.log_tail(40)
                )
            });
        let id = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session has no sessionId: {session}"))
            .to_owned();
        browser.session = Some(id);
        browser
    }

    fn session_path(&self, rest: &str) -> String {
        let id = self.session.as_deref().expect("a session");
        format!("/session/{id}{rest}")
    }

    /// One WebDriver command; its answer's `value`.
    ///
    /// # Errors
    /// ChromeDriver's error answer as a [`WebDriverError`].
    ///
    /// # Panics
    /// When ChromeDriver cannot be reached or answers something that is not WebDriver JSON.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, WebDriverError> {
        self.exchange(method, path, body).unwrap_or_else(|e| {
            panic!("{method} {path} to chromedriver in {}: {e}", self.ns.name())
        })
    }

    /// One request to ChromeDriver; `Err` when it cannot be reached or its answer is not
    /// WebDriver JSON.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Result<Value, WebDriverError>, String> {
        let mut stream = connect_in(
            &self.ns,
            SocketAddr::from((Ipv4Addr::LOCALHOST, DRIVER_PORT)),
        )
        .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .map_err(|e| format!("set a read timeout: {e}"))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{DRIVER_PORT}\r\nConnection: close\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .map_err(|e| format!("send: {e}"))?;
        // ChromeDriver keeps the connection open whatever the request says: the answer ends
        // where its length says.
        let mut raw = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        while !answer_complete(&raw) {
            let n = stream
                .read(&mut buf)
                .map_err(|e| format!("read the answer: {e}"))?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if raw.len() as u64 > MAX_ANSWER {
                return Err(format!("answer over {MAX_ANSWER} bytes"));
            }
        }
        let (status, value) = parse_answer(&raw)?;
        let value = value.get("value").cloned().unwrap_or(Value::Null);
        if status >= 400 {
            return Ok(Err(WebDriverError {
                status,
                error: value["error"].as_str().unwrap_or("").to_owned(),
                message: value["message"].as_str().unwrap_or("").to_owned(),
            }));
        }
        Ok(Ok(value))
    }

    /// A session command that must succeed.
    fn command(&self, method: &str, rest: &str, body: Option<&Value>) -> Value {
        let path = self.session_path(rest);
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {rest}: {e}"))
    }

    /// Loads `url` and waits for it to load.
    ///
    /// # Panics
    /// When it cannot be loaded.
    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({ "url": url })));
    }

    /// The first element matching the CSS selector `css`; `None` when there is none.
    ///
    /// # Panics
    /// When the command fails otherwise.
    pub fn find(&self, css: &str) -> Option<String> {
        let body = json!({"using": "css selector", "value": css});
        match self.call("POST", &self.session_path("/element"), Some(&body)) {
            Ok(v) => Some(
                v[ELEMENT_KEY]
                    .as_str()
                    .unwrap_or_else(|| panic!("element answer without a reference: {v}"))
                    .to_owned(),
            ),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {css}: {e}"),
        }
    }

    /// Types `text` into the element matching `css`.
    ///
    /// # Panics
    /// When there is no such element or it cannot take text.
    pub fn type_into(&self, css: &str, text: &str) {
        let el = self
            .find(css)
            .unwrap_or_else(|| panic!("no element {css} to type into"));
        self.command(
            "POST",
            &format!("/element/{el}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// Clicks the element matching `css`.
    ///
    /// # Panics
    /// When there is no such element or it cannot be clicked.
    pub fn click(&self, css: &str) {
        let el = self
            .find(css)
            .unwrap_or_else(|| panic!("no element {css} to click"));
        self.command("POST", &format!("/element/{el}/click"), Some(&json!({})));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns
    /// what it returns.
    ///
    /// # Panics
    /// When the script throws.
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// Runs `script` every 50 ms until it returns something other than `null` or `false`,
    /// and returns that; `Err` with the last value after `within`.
    ///
    /// # Panics
    /// When the script throws.
    pub fn wait_for(&self, within: Duration, script: &str) -> Result<Value, Value> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.execute(script, &[]);
            if !(v.is_null() || v == Value::Bool(false)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes a PNG screenshot of the window to `path`.
    ///
    /// # Panics
    /// When the screenshot cannot be taken or written.
    pub fn screenshot(&self, path: &Path) {
        let v = self.command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(
                v.as_str()
                    .unwrap_or_else(|| panic!("screenshot is not text")),
            )
            .unwrap_or_else(|e| panic!("screenshot is not base64: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        File::create(path)
            .and_then(|mut f| f.write_all(&png))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// What the page logged to its console since the last call (script errors, refused
    /// loads, policy violations): `[{level, message, timestamp}]`.
    ///
    /// # Panics
    /// When ChromeDriver cannot give the log.
    pub fn console_log(&self) -> Vec<Value> {
        let v = self.command("POST", "/se/log", Some(&json!({"type": "browser"})));
        v.as_array().cloned().unwrap_or_default()
    }

    /// The ChromeDriver process (for its log).
    pub fn driver(&mut self) -> &mut Process {
        &mut self.driver
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            let _ = self.exchange("DELETE", &format!("/session/{id}"), None);
        }
        self.driver.terminate();
        end_processes_using(&self.profile);
    }
}

/// Ends (by pid: SIGTERM, then SIGKILL after 2 s) every process whose command line names
/// `profile`: the Chromium processes of one browser, should any outlive its session.
fn end_processes_using(profile: &Path) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let needle = format!("--user-data-dir={}", profile.display());
    let find = || -> Vec<Pid> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
            })
            .map(Pid::from_raw)
            .collect()
    };
    for pid in find() {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !find().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in find() {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// A TCP connection to `addr` made from inside `ns`: a thread enters the namespace only to
/// connect (the socket belongs to the namespace it was made in, whichever thread uses it).
///
/// # Errors
/// When the namespace cannot be entered or nothing answers.
pub fn connect_in(ns: &NsRef, addr: SocketAddr) -> std::io::Result<TcpStream> {
    ns.within(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
}

/// Whether `raw` holds a whole HTTP/1.1 answer: its head, and a body of the
/// `Content-Length` it names, or a chunked body to its last chunk.
fn answer_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if head.contains("transfer-encoding: chunked") {
        return dechunk(body).is_ok();
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    // Without a length the answer ends with the connection.
    length.is_some_and(|n| body.len() >= n)
}

/// An HTTP/1.1 answer read to its end: the status and the JSON body (chunked or not).
fn parse_answer(raw: &[u8]) -> Result<(u16, Value), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|e| format!("head: {e}"))?;
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| format!("body is not JSON: {e}"))?
    };
    Ok((status, value))
}

/// The payload of a chunked body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size without end")?;
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            // No trailers: the blank line ends the body.
            return if body.starts_with(b"\r\n") {
                Ok(out)
            } else {
                Err("last chunk without its blank line".into())
            };
        }
        let chunk = body.get(..size).ok_or("chunk cut short")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("chunk without end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 404 Not Found\r\nContent-Length: 51\r\n\r\n\
            {\"value\":{\"error\":\"no such element\",\"message\":\"x\"}}";
        let (status, v) = parse_answer(plain).unwrap();
        assert_eq!(status, 404);
        assert_eq!(v["value"]["error"], "no such element");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\n{\"val\r\n9\r\nue\":true}\r\n0\r\n\r\n";
        let (status, v) = parse_answer(chunked).unwrap();
        assert_eq!((status, &v["value"]), (200, &Value::Bool(true)));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(answer_complete(plain) && answer_complete(chunked));
        assert!(!answer_complete(&plain[..plain.len() - 1]));
        assert!(!answer_complete(&chunked[..chunked.len() - 2]));
        assert!(dechunk(b"5\r\nab").is_err());
    }
}
