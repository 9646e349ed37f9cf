//! What the observer knows, over the API: `GET /metrics` (Prometheus text),
//! `GET /api/v1/machines/{mac}/boots` and the rack view `GET /api/v1/boots`.

use std::time::Duration;

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::{error, mac_from, Answer, ApiError, ApiState};
use crate::observe::{metrics::to_prometheus_text, now_ms};

/// The content type Prometheus expects of the text format.
const EXPOSITION_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Machines listed as slowest and failed unless `slowest=` says otherwise.
const DEFAULT_SLOWEST: usize = 10;

/// Prometheus's older text format, for clients that do not ask for OpenMetrics.
const PROMETHEUS_TEXT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics when the scraper asks for it (Prometheus does), else
/// Prometheus's text format 0.0.4 (curl, promtool).
pub async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Answer {
    observing(&state)?;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let text = tokio::task::spawn_blocking(move || state.observer.exposition())
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(if openmetrics {
        ([(header::CONTENT_TYPE, EXPOSITION_TYPE)], text).into_response()
    } else {
        let text = to_prometheus_text(&text);
        ([(header::CONTENT_TYPE, PROMETHEUS_TEXT_TYPE)], text).into_response()
    })
}

pub async fn machine_boots(State(state): State<ApiState>, Path(mac): Path<String>) -> Answer {
    observing(&state)?;
    let mac = mac_from(&mac)?;
    let boots = state.observer.boots(mac);
    Ok(Json(json!({ "mac": mac.to_string(), "boots": boots })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RackQuery {
    /// `10m`, `2h`, `90s`, `1d` ago, or Unix milliseconds.
    since: Option<String>,
    slowest: Option<usize>,
}

pub async fn rack(State(state): State<ApiState>, Query(q): Query<RackQuery>) -> Answer {
    observing(&state)?;
    let since = match q.since.as_deref() {
        None => now_ms().saturating_sub(3_600_000),
        Some(text) => since_ms(text, now_ms()).map_err(|e| error(StatusCode::BAD_REQUEST, e))?,
    };
    let slowest = q.slowest.unwrap_or(DEFAULT_SLOWEST);
    // O(machines) under the timelines' lock: off the async workers.
    let view = tokio::task::spawn_blocking(move || state.observer.rack(since, slowest))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(view).into_response())
}

fn observing(state: &ApiState) -> Result<(), ApiError> {
    if state.observer.is_on() {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            "metrics and boot timelines are off (pxed runs with --no-observe)",
        ))
    }
}

/// `since=`: a duration ago (`90s`, `10m`, `2h`, `1d`) or Unix milliseconds.
fn since_ms(text: &str, now_ms: u64) -> Result<u64, String> {
    let bad = || {
        format!(
            "since: {text:?} is neither a duration ago (90s, 10m, 2h, 1d) nor Unix milliseconds"
        )
    };
    if text.chars().all(|c| c.is_ascii_digit()) && !text.is_empty() {
        return text.parse().map_err(|_| bad());
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    let ago = (unit.as_millis() as u64).checked_mul(n).ok_or_else(bad)?;
    Ok(now_ms.saturating_sub(ago))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_ago_or_an_instant() {
        let now = 10_000_000;
        assert_eq!(since_ms("90s", now), Ok(now - 90_000));
        assert_eq!(since_ms("10m", now), Ok(now - 600_000));
        assert_eq!(since_ms("2h", now), Ok(now - 7_200_000));
        assert_eq!(since_ms("1d", now), Ok(0));
        assert_eq!(since_ms("1234", now), Ok(1234));
        for bad in ["", "m", "10x", "-5m", "1.5h", "99999999999999999d"] {
            assert!(since_ms(bad, now).is_err(), "{bad}");
        }
    }
}
