//! `/machines` and `/profiles`: the inventory, read and changed.

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use super::{error, field_error, mac_from, Answer, ApiError, ApiState};
use crate::{
    control::MachineView,
    inventory::{MachineRecord, ProfileRecord, Selector},
    policy::Mac,
};

/// Bodies larger than this are refused: a bulk change of 100,000 MACs fits.
pub const MAX_BODY: usize = 4 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineFilter {
    /// Labels: `rack=r12,role=db`.
    selector: Option<String>,
    profile: Option<String>,
    netboot: Option<bool>,
}

pub async fn list(State(state): State<ApiState>, Query(filter): Query<MachineFilter>) -> Answer {
    let selector = filter
        .selector
        .as_deref()
        .map(str::parse::<Selector>)
        .transpose()
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("selector: {e}")))?;
    let machines: Vec<MachineView> = state
        .control
        .machines()
        .into_iter()
        .filter(|m| selector.as_ref().is_none_or(|s| m.record.matches(s)))
        .filter(|m| {
            let profile = m.record.profile.as_ref();
            filter.profile.as_ref().is_none_or(|p| profile == Some(p))
        })
        .filter(|m| filter.netboot.is_none_or(|n| m.record.netboot == n))
        .collect();
    Ok(Json(machines).into_response())
}

pub async fn show(State(state): State<ApiState>, Path(mac): Path<String>) -> Answer {
    let mac = mac_from(&mac)?;
    match state.control.machine(mac) {
        Some(m) => Ok(with_etag(m.record.revision, Json(m))),
        None => Err(error(StatusCode::NOT_FOUND, format!("no machine {mac}"))),
    }
}

/// PUT: the whole record; fields left out take their defaults.
pub async fn put(
    State(state): State<ApiState>,
    Path(mac): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let mac = mac_from(&mac)?;
    let mut value: Value = parse(&body)?;
    adopt_mac(&mut value, mac)?;
    write_one(&state, value, &headers)
}

/// PATCH: a JSON merge patch (RFC 7386) over the record as it is (the
/// file's entry, or a new record, if the API has none yet).
pub async fn patch(
    State(state): State<ApiState>,
    Path(mac): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let mac = mac_from(&mac)?;
    let patch: Value = parse(&body)?;
    if !patch.is_object() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "a PATCH body is a JSON object of the fields to change",
        ));
    }
    let mut value = serde_json::to_value(current(&state, mac)).expect("a record serialises");
    merge(&mut value, &patch);
    adopt_mac(&mut value, mac)?;
    write_one(&state, value, &headers)
}

pub async fn delete(
    State(state): State<ApiState>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Answer {
    let mac = mac_from(&mac)?;
    state.control.delete_machine(mac, if_match(&headers)?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /machines:bulk`: one change for a list of MACs or a label selector.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bulk {
    #[serde(default)]
    macs: Vec<String>,
    selector: Option<String>,
    set: BulkSet,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkSet {
    profile: Option<String>,
    netboot: Option<bool>,
}

pub async fn bulk(State(state): State<ApiState>, body: Bytes) -> Answer {
    let bulk: Bulk = parse(&body)?;
    if bulk.set.profile.is_none() && bulk.set.netboot.is_none() {
        return Err(field_error("set", "name profile and/or netboot"));
    }
    let mut macs = bulk
        .macs
        .iter()
        .map(|m| mac_from(m))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(selector) = &bulk.selector {
        let selector: Selector = selector
            .parse()
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("selector: {e}")))?;
        let selected = state.control.machines().into_iter();
        macs.extend(
            selected
                .filter(|m| m.record.matches(&selector))
                .map(|m| m.record.mac),
        );
    }
    if macs.is_empty() {
        return Err(field_error("macs", "no machine is named or selected"));
    }
    macs.sort();
    macs.dedup();
    let records: Vec<MachineRecord> = macs
        .iter()
        .map(|mac| {
            let mut r = current(&state, *mac);
            if let Some(p) = &bulk.set.profile {
                r.profile = Some(p.clone());
            }
            if let Some(n) = bulk.set.netboot {
                r.netboot = n;
            }
            r
        })
        .collect();
    let written = state.control.put_machines(records, None)?;
    Ok(Json(json!({ "changed": written.len(), "machines": written })).into_response())
}

pub async fn profiles(State(state): State<ApiState>) -> Response {
    Json(state.control.profiles()).into_response()
}

pub async fn profile(State(state): State<ApiState>, Path(name): Path<String>) -> Answer {
    match state
        .control
        .profiles()
        .into_iter()
        .find(|p| p.name == name)
    {
        Some(p) => Ok(with_etag(p.revision, Json(p))),
        None => Err(error(StatusCode::NOT_FOUND, format!("no profile {name:?}"))),
    }
}

pub async fn put_profile(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let mut value: Value = parse(&body)?;
    if !value.is_object() {
        return Err(error(StatusCode::BAD_REQUEST, "the body is a JSON object"));
    }
    match value.get("name") {
        Some(Value::String(n)) if *n != name => {
            return Err(field_error(
                "name",
                format!("the body says {n:?}, the path {name:?}"),
            ))
        }
        _ => value["name"] = Value::String(name),
    }
    if let Some(object) = value.as_object_mut() {
        object.remove("revision");
    }
    let profile: ProfileRecord = from_value(value)?;
    let written = state.control.put_profile(profile, if_match(&headers)?)?;
    Ok(with_etag(written.revision, Json(written)))
}

/// The machine's record as it stands: the API's, the file's, or a new one.
fn current(state: &ApiState, mac: Mac) -> MachineRecord {
    state
        .control
        .machine(mac)
        .map_or_else(|| MachineRecord::new(mac), |m| m.record)
}

fn write_one(state: &ApiState, value: Value, headers: &HeaderMap) -> Answer {
    let record: MachineRecord = from_value(value)?;
    let mut written = state
        .control
        .put_machines(vec![record], if_match(headers)?)?;
    let record = written.pop().expect("one record written");
    Ok(with_etag(record.revision, Json(record)))
}

/// The path names the machine; a body that names another is refused.
fn adopt_mac(value: &mut Value, mac: Mac) -> Result<(), ApiError> {
    let Some(object) = value.as_object_mut() else {
        return Err(error(StatusCode::BAD_REQUEST, "the body is a JSON object"));
    };
    // What the server keeps is not the client's to set.
    object.remove("revision");
    object.remove("source");
    if let Some(named) = object.get("mac").and_then(Value::as_str) {
        if named.parse::<Mac>().ok() != Some(mac) {
            return Err(field_error(
                "mac",
                format!("the body says {named:?}, the path {mac}"),
            ));
        }
    }
    object.insert("mac".into(), Value::String(mac.to_string()));
    Ok(())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.len() > MAX_BODY {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY} bytes"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid: {e}"),
        )
    })
}

/// A 422 naming the field serde blames ("unknown field `netbot`", "arch
/// \"vax\" is unknown").
fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e))
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let (Some(target), Some(patch)) = (target.as_object_mut(), patch.as_object()) else {
        *target = patch.clone();
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// `If-Match: "N"`: the revision the caller read.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().trim_matches('"').parse().ok())
        .map(Some)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "If-Match: want a revision as the ETag gave it, e.g. \"3\"",
            )
        })
}

fn with_etag(revision: u64, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{revision}\"")) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_patch_replaces_merges_and_removes() {
        let mut v = json!({"a": 1, "labels": {"rack": "r1", "row": "2"}, "gone": true});
        merge(
            &mut v,
            &json!({"a": 2, "labels": {"rack": "r12", "row": null}, "gone": null}),
        );
        assert_eq!(v, json!({"a": 2, "labels": {"rack": "r12"}}));
    }
}
