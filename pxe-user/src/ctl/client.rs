//! The API client of `pxed ctl`: one blocking HTTP call per request, the
//! token from the flags or the environment.

use std::{path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Context as _};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use super::{CtlArgs, DEFAULT_URL};

/// Characters left as they are in a path segment or query value.
pub(super) const KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b':');

pub(super) fn segment(text: &str) -> String {
    utf8_percent_encode(text, KEEP).to_string()
}

/// What the API answered to one call.
pub(super) struct Answer {
    pub(super) status: u16,
    /// The body as JSON (null when empty, a string when not JSON).
    pub(super) json: Value,
    /// The body as sent.
    pub(super) text: String,
}

/// An error answer: the API's `error` message, and its status.
pub(super) fn api_error(answer: &Answer) -> anyhow::Error {
    let status = answer.status;
    match answer.json["error"].as_str() {
        Some(message) => anyhow!("{message} (HTTP {status})"),
        None => anyhow!("the API answered HTTP {status}: {}", answer.text.trim()),
    }
}

/// Largest answer read: the machine list of a big site fits.
pub(super) const MAX_ANSWER: u64 = 256 << 20;

pub(super) struct Client {
    agent: ureq::Agent,
    /// `http://host:port/api/v1`.
    base: String,
    token: String,
}

impl Client {
    pub(super) fn new(args: &CtlArgs) -> anyhow::Result<Self> {
        let url = args.url.trim_end_matches('/');
        let url = url.strip_suffix(crate::api::PREFIX).unwrap_or(url);
        if !url.starts_with("http://") {
            bail!("--url {url}: want http://HOST:PORT (the API is plain HTTP, e.g. {DEFAULT_URL})");
        }
        let agent = ureq::Agent::config_builder()
            // Errors are answers to show, not failures of the call.
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(args.timeout.max(1))))
            // A management address: never through an http_proxy of the
            // environment, never redirected with the token elsewhere.
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("pxed-ctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Self {
            agent,
            base: format!("{url}{}", crate::api::PREFIX),
            token: token(args)?,
        })
    }

    pub(super) fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Answer> {
        self.ok(self.call("GET", path, query, None, None)?)
    }

    pub(super) fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> anyhow::Result<Answer> {
        self.ok(self.call(method, path, &[], body, if_match)?)
    }

    pub(super) fn ok(&self, answer: Answer) -> anyhow::Result<Answer> {
        if (200..300).contains(&answer.status) {
            Ok(answer)
        } else {
            Err(api_error(&answer))
        }
    }

    /// One call, whatever its status.
    pub(super) fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> anyhow::Result<Answer> {
        let mut url = format!("{}{path}", self.base);
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&segment(v));
        }
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "application/json");
        if let Some(rev) = if_match {
            request = request.header("If-Match", format!("\"{rev}\""));
        }
        let sent = match body {
            Some(b) => self.agent.run(
                request
                    .header("Content-Type", "application/json")
                    .body(b.to_string())?,
            ),
            None => self.agent.run(request.body(())?),
        };
        let mut response = sent.map_err(|e| {
            anyhow!("cannot reach the pxed API at {url}: {e} (is pxed running with --api there? --url or $PXED_API_URL names another)")
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .with_context(|| format!("reading the answer of {method} {url}"))?;
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()))
        };
        Ok(Answer { status, json, text })
    }
}

/// The token: --token-file, else $PXED_API_TOKEN, else $PXED_API_TOKEN_FILE.
pub(super) fn token(args: &CtlArgs) -> anyhow::Result<String> {
    let from_file = |path: PathBuf, how: &str| -> anyhow::Result<String> {
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("{how} {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() {
            bail!("{how} {}: the first line is empty", path.display());
        }
        Ok(token)
    };
    if let Some(path) = &args.token_file {
        return from_file(path.clone(), "--token-file");
    }
    if let Some(token) = std::env::var("PXED_API_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
    {
        return Ok(token);
    }
    if let Some(path) = std::env::var_os("PXED_API_TOKEN_FILE").filter(|p| !p.is_empty()) {
        return from_file(PathBuf::from(path), "$PXED_API_TOKEN_FILE");
    }
    bail!("no API token: give --token-file FILE (the file of pxed's --api-token-file), or set PXED_API_TOKEN or PXED_API_TOKEN_FILE")
}
