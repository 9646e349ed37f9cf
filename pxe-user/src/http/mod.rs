//! HTTP boot: the boot root over HTTP (GET/HEAD, single ranges, ETag and
//! Last-Modified validators), and per-machine iPXE scripts at `/boot.ipxe`.
//! Files come from the same confined [`BootRoot`] as TFTP. Every answer
//! is reported to the [`Observer`] once its body is sent (see [`observed`]).

mod observed;

pub use self::observed::observed;

use std::{net::SocketAddr, ops::RangeInclusive, sync::Arc, time::SystemTime};

use axum::{
    body::Body,
    extract::{ConnectInfo, Query, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use bytes::Bytes;
use serde::Deserialize;
use tracing::{info, warn};

use crate::{
    bootroot::{BootFile, BootRoot, OpenError},
    policy::{
        Arch, ClientKind, Decision, FileGate, Mac, Machine, ServerUrls, SharedPolicy,
        LOCAL_BOOT_SCRIPT,
    },
};

/// Path of the per-machine iPXE script.
pub const SCRIPT_PATH: &str = "/boot.ipxe";

#[derive(Clone)]
pub struct HttpState {
    pub root: Arc<BootRoot>,
    pub policy: SharedPolicy,
    /// This listener's own URLs, for the scripts it renders.
    pub urls: Arc<ServerUrls>,
    /// Refuses boot files to machines marked not to netboot, if set.
    pub gate: Option<Arc<dyn FileGate>>,
}

/// The files a served script names from this server, for the observer.
#[derive(Clone, Debug)]
pub struct ScriptFiles(pub Vec<String>);

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route(SCRIPT_PATH, get(ipxe_script))
        .fallback(boot_file)
        .with_state(state)
}

#[derive(Deserialize)]
struct ScriptQuery {
    mac: String,
    arch: Option<String>,
    uuid: Option<String>,
    /// The class the DHCP answer chose (the URL it gave names it).
    class: Option<String>,
}

async fn ipxe_script(State(state): State<HttpState>, Query(q): Query<ScriptQuery>) -> Response {
    let Ok(mac) = q.mac.parse::<Mac>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("mac={:?} is not a MAC address\n", q.mac),
        )
            .into_response();
    };
    let arch = q
        .arch
        .as_deref()
        .and_then(Arch::from_name)
        .unwrap_or(Arch::Other(u16::MAX));
    let machine = Machine {
        uuid: q.uuid.filter(|u| !u.is_empty()),
        class: q.class.filter(|c| !c.is_empty()),
        // Only iPXE fetches its script.
        ..Machine::new(mac, arch, ClientKind::Ipxe)
    };
    let script = match state
        .policy
        .current()
        .decide(&machine, &state.urls)
        .decision
    {
        Decision::Boot(spec) => {
            info!(%mac, arch = arch.name(), profile = %spec.profile, "HTTP: iPXE script served");
            spec.ipxe_script
        }
        Decision::LocalBoot => {
            info!(%mac, "HTTP: machine is provisioned; local-boot script served");
            LOCAL_BOOT_SCRIPT.to_owned()
        }
        Decision::Ignore => {
            info!(%mac, "HTTP: no profile for this machine");
            return (
                StatusCode::NOT_FOUND,
                "#!ipxe\necho pxed: no profile for this machine\nexit 1\n",
            )
                .into_response();
        }
    };
    let files = ScriptFiles(crate::observe::timeline::script_files(
        &script,
        &state.urls.http,
    ));
    let mut response = (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response();
    response.extensions_mut().insert(files);
    response
}

async fn boot_file(
    State(state): State<HttpState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let Ok(path) = percent_encoding::percent_decode_str(uri.path()).decode_utf8() else {
        return (StatusCode::BAD_REQUEST, "path is not UTF-8\n").into_response();
    };
    if let (Some(gate), SocketAddr::V4(client)) = (&state.gate, client) {
        if let Some(mac) = gate.refuses(*client.ip()) {
            info!(%mac, path = %path, "HTTP: refused: the machine is marked not to netboot");
            return (StatusCode::FORBIDDEN, "this machine boots from its disk\n").into_response();
        }
    }
    let file = match state.root.open_file(&path).await {
        Ok(f) => f,
        Err(OpenError::NotFound) => return (StatusCode::NOT_FOUND, "not found\n").into_response(),
        Err(OpenError::Denied(why)) => {
            warn!(path = %path, "HTTP: refused: {why}");
            return (StatusCode::FORBIDDEN, format!("refused: {why}\n")).into_response();
        }
        Err(OpenError::Io(e)) => {
            warn!(path = %path, "HTTP: reading failed: {e}");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server could not read the file\n",
            )
                .into_response();
        }
    };
    respond_with_file(&file, &headers)
}

/// The full file, a single range of it, or 304/416, per RFC 9110.
fn respond_with_file(file: &Arc<BootFile>, headers: &HeaderMap) -> Response {
    let etag = file.etag();
    let modified = httpdate::fmt_http_date(file.modified());
    let len = file.len();
    let mut response = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &modified)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");

    if not_modified(headers, &etag, file.modified()) {
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap();
    }
    let body = Bytes::from_owner(FileBytes(Arc::clone(file)));
    match requested_range(headers, &etag, len) {
        RangeAnswer::Whole => response
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from(body))
            .unwrap(),
        RangeAnswer::Part(range) => {
            let (start, end) = (*range.start(), *range.end());
            response = response
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .header(header::CONTENT_LENGTH, end - start + 1);
            response
                .body(Body::from(body.slice(start as usize..=end as usize)))
                .unwrap()
        }
        RangeAnswer::Unsatisfiable => response
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty())
            .unwrap(),
    }
}

/// The mapped file as an owner of bytes, so responses need no copy.
struct FileBytes(Arc<BootFile>);

impl AsRef<[u8]> for FileBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

fn not_modified(headers: &HeaderMap, etag: &str, modified: SystemTime) -> bool {
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        // If-None-Match wins over If-Modified-Since (RFC 9110 §13.1.3).
        return inm.split(',').any(|t| t.trim() == etag || t.trim() == "*");
    }
    let Some(since) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Ok(since) = httpdate::parse_http_date(since) else {
        return false;
    };
    // HTTP dates have whole seconds.
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    secs(modified) <= secs(since)
}

enum RangeAnswer {
    Whole,
    Part(RangeInclusive<u64>),
    Unsatisfiable,
}

fn requested_range(headers: &HeaderMap, etag: &str, len: u64) -> RangeAnswer {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Whole;
    };
    if let Some(if_range) = headers
        .get(header::IF_RANGE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
    {
        if if_range.trim() != etag {
            return RangeAnswer::Whole; // the client's copy is stale: send it all
        }
    }
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return RangeAnswer::Whole; // a Range we cannot read is ignored (RFC 9110 §14.2)
    };
    match parsed.validate(len) {
        Ok(ranges) if ranges.len() == 1 => RangeAnswer::Part(ranges[0].clone()),
        // Several ranges: the whole file is a valid answer and what boot clients use.
        Ok(_) => RangeAnswer::Whole,
        Err(_) => RangeAnswer::Unsatisfiable,
    }
}
