//! A headless Chromium for the browser tests, driven over WebDriver: each [`Browser`] starts
//! its own chromedriver on a free port and its own Chromium with a fresh profile, and kills
//! both when dropped, even after a failed assertion.
//!
//! Waiting is done by polling the page ([`Browser::wait_for`]) with a generous timeout, never
//! by sleeping, so a loaded machine makes a test slower, not flaky. Chromium and chromedriver
//! are Debian's `chromium` and `chromium-driver` (scripts/test installs them); `CHROMIUM` and
//! `CHROMEDRIVER` point elsewhere. Without them the tests fail and say what to install.

#![allow(dead_code)] // Not every test uses every helper.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::error::{CmdError, ErrorStatus};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// How long [`Browser::wait_for`] waits for the page to get where a test expects.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(100);
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);
const DRIVER_START_TRIES: usize = 3;
const STALE_RETRIES: usize = 20;

const CHROMIUM_DEFAULT: &str = "/usr/bin/chromium";
const CHROMEDRIVER_DEFAULT: &str = "/usr/bin/chromedriver";
const INSTALL_HINT: &str = "install Debian's browser packages: \
     `apt-get install chromium chromium-driver` (scripts/test installs them when missing)";

/// A program from the environment variable `var`, else `default`; fails the test if missing.
fn program(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.is_file(),
        "the browser tests need {} ({var}); it is not there: {INSTALL_HINT}",
        path.display()
    );
    path
}

/// Where screenshots go: `<target dir>/screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    // The test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("the path of the test binary");
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("screenshots")
}

/// chromedriver, in its own process group so that the browsers it started go with it.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Driver {
        let binary = program("CHROMEDRIVER", CHROMEDRIVER_DEFAULT);
        let mut last_error = String::new();
        for _ in 0..DRIVER_START_TRIES {
            let port = free_port();
            let mut command = Command::new(&binary);
            command
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            let child = command
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}; {INSTALL_HINT}", binary.display()));
            let mut driver = Driver { child, port };
            match driver.wait_ready().await {
                Ok(()) => return driver,
                Err(e) => last_error = e,
            }
        }
        panic!("chromedriver did not start: {last_error}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("building the HTTP client");
        let url = format!("http://127.0.0.1:{}/status", self.port);
        let deadline = Instant::now() + DRIVER_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("it exited with {status}"));
            }
            if let Ok(res) = http.get(&url).send().await {
                let body: Value = res.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    return Ok(());
                }
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Err(format!(
            "no answer on port {} within {DRIVER_START_TIMEOUT:?}",
            self.port
        ))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        // In case the group could not be signalled, the driver itself at least.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// One headless Chromium window.
pub struct Browser {
    client: Option<Client>,
    name: String,
    // Dropped after the client: the profile folder outlives the browser that uses it.
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `name` appears in failure messages and
    /// screenshot names.
    pub async fn start(name: &str) -> Browser {
        let chromium = program("CHROMIUM", CHROMIUM_DEFAULT);
        let driver = Driver::start().await;
        let profile = tempfile::tempdir().expect("a folder for the browser profile");
        let args = [
            "--headless".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--no-first-run".to_string(),
            "--disable-sync".to_string(),
            "--window-size=1280,860".to_string(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            // A dialog stays open, so the test sees it instead of WebDriver dismissing it.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|e| panic!("starting Chromium through chromedriver: {e}"));
        Browser {
            client: Some(client),
            name: name.to_string(),
            _driver: driver,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the browser is open")
    }

    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("[{}] opening {url}: {e}", self.name));
    }

    /// The value of the JavaScript expression `js` in the page.
    pub async fn eval(&self, js: &str) -> Value {
        match self
            .client()
            .execute(&format!("return ({js});"), vec![])
            .await
        {
            Ok(value) => value,
            Err(e) => self.fail(&format!("evaluating `{js}`: {e}")).await,
        }
    }

    /// Polls `js` until it is truthy and returns its value; fails the test after
    /// [`PAGE_TIMEOUT`] with what the page shows.
    pub async fn wait_for(&self, what: &str, js: &str) -> Value {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let value = self.eval(js).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "waited {PAGE_TIMEOUT:?} for {what}; `{js}` is {value}"
                ))
                .await;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Types `text` into the field `css` (appending to what is there).
    pub async fn type_into(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        if let Err(e) = field.send_keys(text).await {
            self.fail(&format!("typing into {css}: {e}")).await;
        }
    }

    pub async fn click(&self, css: &str) {
        // A page may replace the element between finding and clicking it: find it again.
        for _ in 0..STALE_RETRIES {
            let target = self.find(css).await;
            match target.click().await {
                Ok(()) => return,
                Err(CmdError::Standard(e)) if e.error == ErrorStatus::StaleElementReference => {}
                Err(e) => self.fail(&format!("clicking {css}: {e}")).await,
            }
        }
        self.fail(&format!(
            "{css} kept being replaced before it could be clicked"
        ))
        .await;
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.wait_for(
            &format!("{css} to be usable"),
            &format!(
                "(() => {{ const e = document.querySelector({}); return !!e && !e.disabled && e.offsetParent !== null; }})()",
                json!(css)
            ),
        )
        .await;
        match self.client().find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(e) => self.fail(&format!("finding {css}: {e}")).await,
        }
    }

    /// Fails the test if a JavaScript dialog (alert, confirm, prompt) is open.
    pub async fn assert_no_dialog(&self) {
        match self.client().get_alert_text().await {
            Err(CmdError::Standard(e)) if e.error == ErrorStatus::NoSuchAlert => {}
            Ok(text) => panic!("[{}] a dialog opened: {text:?}", self.name),
            Err(e) => panic!("[{}] checking for a dialog: {e}", self.name),
        }
    }

    /// Saves a PNG of the window as `<target>/screenshots/<file>.png` and prints the path.
    pub async fn screenshot(&self, file: &str) -> PathBuf {
        let png = self
            .client()
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("[{}] taking a screenshot: {e}", self.name));
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join(format!("{file}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("screenshot of the {}: {}", self.name, path.display());
        path
    }

    /// Fails the test with `why`, the page's visible text and a screenshot of the moment.
    async fn fail(&self, why: &str) -> ! {
        let client = self.client();
        let text = client
            .execute(
                "return document.body ? document.body.innerText : ''",
                vec![],
            )
            .await
            .map(|v| {
                v.as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(3000)
                    .collect::<String>()
            })
            .unwrap_or_else(|e| format!("(page text unavailable: {e})"));
        let shot = match client.screenshot().await {
            Ok(png) => {
                let dir = screenshot_dir();
                let path = dir.join(format!("failed-{}-{}.png", self.name, std::process::id()));
                let saved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, png));
                match saved {
                    Ok(()) => path.display().to_string(),
                    Err(e) => format!("(not saved: {e})"),
                }
            }
            Err(e) => format!("(none: {e})"),
        };
        panic!(
            "[{}] {why}\nscreenshot: {shot}\npage text:\n{text}",
            self.name
        );
    }

    /// Ends the WebDriver session (Chromium quits); the driver stops when dropped.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}
