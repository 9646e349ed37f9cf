//! Every answer of the boot HTTP listener reported to the [`Observer`]: the
//! route, status and body bytes, once the body is sent or the client went
//! away during it. The log gets a line per download, as TFTP's transfers do.

use std::{
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::Method,
    middleware::{self, Next},
    response::Response,
    Router,
};
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tracing::info;

use super::{ScriptFiles, SCRIPT_PATH};
use crate::{
    api::PREFIX,
    observe::{HttpFile, Observer, Route},
    policy::Mac,
};

/// `router` with every answer reported to `observer`.
pub fn observed(router: Router, observer: Arc<Observer>) -> Router {
    router.layer(middleware::from_fn_with_state(observer, observe))
}

async fn observe(State(observer): State<Arc<Observer>>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let Some(SocketAddr::V4(client)) = client.filter(|_| observer.is_on()) else {
        return next.run(request).await;
    };
    let head = request.method() == Method::HEAD;
    let path = request.uri().path().to_owned();
    let route = route_of(&path);
    let mac = mac_of(route, &path, request.uri().query());
    let started = Instant::now();
    let mut response = next.run(request).await;
    let script_files = response
        .extensions_mut()
        .remove::<ScriptFiles>()
        .map(|f| f.0)
        .unwrap_or_default();
    let report = Report {
        observer,
        client: *client.ip(),
        mac,
        route,
        path,
        status: response.status().as_u16(),
        head,
        started,
        script_files,
    };
    let (parts, body) = response.into_parts();
    let counted = Counted {
        inner: body,
        sent: 0,
        ended: false,
        report: Some(report),
    };
    Response::from_parts(parts, Body::new(counted))
}

fn route_of(path: &str) -> Route {
    if path == SCRIPT_PATH {
        Route::Script
    } else if path.starts_with(PREFIX) && path.ends_with("/provisioned") {
        Route::Provisioned
    } else {
        Route::File
    }
}

/// The machine a request names itself: the script's and files' `mac=`,
/// the MAC in a `provisioned` call's path.
fn mac_of(route: Route, path: &str, query: Option<&str>) -> Option<Mac> {
    match route {
        // Files: the default script's URLs carry `?mac=` too.
        Route::Script | Route::File => query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("mac="))
            .and_then(|v| percent_encoding::percent_decode_str(v).decode_utf8().ok())
            .and_then(|v| v.parse().ok()),
        Route::Provisioned => path.rsplit('/').nth(1)?.parse().ok(),
    }
}

/// What is reported once the body is done with.
struct Report {
    observer: Arc<Observer>,
    client: Ipv4Addr,
    mac: Option<Mac>,
    route: Route,
    path: String,
    status: u16,
    head: bool,
    started: Instant,
    script_files: Vec<String>,
}

impl Report {
    fn send(self, bytes: u64, complete: bool) {
        let file = HttpFile {
            route: self.route,
            path: self.path,
            status: self.status,
            bytes,
            complete,
            ms: self.started.elapsed().as_millis() as u64,
        };
        if self.route == Route::File && !self.head {
            info!(
                client = %self.client, path = %file.path, status = file.status, bytes, complete,
                ms = file.ms, "HTTP: file answered"
            );
        }
        if self.head {
            // A HEAD downloads nothing: counted, not a step of the boot.
            self.observer.count_http(&file);
        } else {
            self.observer
                .http(self.client, self.mac, file, self.script_files);
        }
    }
}

/// A response body that counts what leaves and reports when dropped.
struct Counted {
    inner: Body,
    sent: u64,
    ended: bool,
    report: Option<Report>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(report) = self.report.take() {
            let complete = self.ended || self.inner.is_end_stream();
            report.send(self.sent, complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_their_route_and_machine() {
        assert_eq!(route_of("/boot.ipxe"), Route::Script);
        assert_eq!(
            route_of("/api/v1/machines/52:54:00:00:00:01/provisioned"),
            Route::Provisioned
        );
        assert_eq!(route_of("/linux/vmlinuz"), Route::File);
        let mac = Some(Mac([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(
            mac_of(
                Route::Script,
                "/boot.ipxe",
                Some("arch=uefi-x64&mac=52%3A54%3A00%3A00%3A00%3A01")
            ),
            mac
        );
        assert_eq!(
            mac_of(
                Route::Provisioned,
                "/api/v1/machines/52:54:00:00:00:01/provisioned",
                None
            ),
            mac
        );
        assert_eq!(mac_of(Route::Script, "/boot.ipxe", Some("mac=nope")), None);
        assert_eq!(
            mac_of(Route::File, "/vmlinuz", Some("mac=52:54:00:00:00:01")),
            mac
        );
        assert_eq!(mac_of(Route::File, "/vmlinuz", None), None);
    }
}
