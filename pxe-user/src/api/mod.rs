//! The operator API: JSON over HTTP on a management listener (`--api`),
//! every request authenticated with the bearer token of `--api-token-file`.
//! Handlers only translate: every change goes through [`Control`], which
//! makes it durable and consistent on every path before the answer leaves.
//! docs/API.md lists every endpoint with examples.

mod boots;
mod machines;

use std::{net::Ipv4Addr, sync::Arc};

use axum::{
    extract::{Path, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    control::{ChangeError, Control},
    lease::{Lease, LeaseState},
    observe::Observer,
    policy::Mac,
};

/// Everything under this prefix.
pub const PREFIX: &str = "/api/v1";

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub control: Arc<Control>,
    /// The bearer token every request must carry.
    pub token: Arc<str>,
    /// The programs' attachments, for `/health`: (interface, how).
    pub attached: Arc<[(String, String)]>,
    /// Metrics and boot timelines.
    pub observer: Arc<Observer>,
    /// `GET /metrics` answers without the token (`--metrics-public`).
    pub metrics_public: bool,
}

/// The API's routes, behind the token check.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/machines", get(machines::list))
        .route("/machines:bulk", post(machines::bulk))
        .route(
            "/machines/{mac}",
            get(machines::show)
                .put(machines::put)
                .patch(machines::patch)
                .delete(machines::delete),
        )
        .route("/profiles", get(machines::profiles))
        .route(
            "/profiles/{name}",
            get(machines::profile).put(machines::put_profile),
        )
        .route("/leases", get(leases))
        .route("/leases/{ip}", get(lease))
        .route("/machines/{mac}/boots", get(boots::machine_boots))
        .route("/boots", get(boots::rack))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        // The installer's call carries its machine's token instead.
        .route("/machines/{mac}/provisioned", post(provisioned));
    let mut metrics = Router::new().route("/metrics", get(boots::metrics));
    if !state.metrics_public {
        metrics = metrics.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    }
    Router::new()
        .nest(PREFIX, api)
        .merge(metrics)
        // axum's own limit (2 MiB) would refuse a large bulk call first,
        // and in plain text.
        .layer(axum::extract::DefaultBodyLimit::max(machines::MAX_BODY))
        .with_state(state)
}

/// The routes the boot HTTP listener also serves: machines reach that one,
/// not the management listener.
pub fn boot_network_router(control: Arc<Control>) -> Router {
    Router::new()
        .route(
            &format!("{PREFIX}/machines/{{mac}}/provisioned"),
            post(provisioned_on_boot_network),
        )
        .with_state(control)
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Answer {
    match bearer(request.headers()) {
        Some(token) if constant_time_eq(token.as_bytes(), state.token.as_bytes()) => {
            Ok(next.run(request).await)
        }
        Some(_) => Err(error(StatusCode::UNAUTHORIZED, "the bearer token is wrong")),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "an Authorization: Bearer TOKEN header is required (the token of --api-token-file)",
        )),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error answer: `{"error": "..."}`, and the field when one is to blame.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(field) => json!({ "error": self.message, "field": field }),
            None => json!({ "error": self.message }),
        };
        (self.status, Json(body)).into_response()
    }
}

/// What a handler answers: a response, or an error that says why.
pub type Answer = Result<Response, ApiError>;

pub fn error(status: StatusCode, message: impl std::fmt::Display) -> ApiError {
    ApiError {
        status,
        message: message.to_string(),
        field: None,
    }
}

/// A 422 that names the field to blame.
pub fn field_error(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: format!("{field}: {message}"),
        field: Some(field.to_owned()),
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::Invalid { field, message } => return field_error(field, message),
            ChangeError::NoMachine(_) => StatusCode::NOT_FOUND,
            ChangeError::Conflict(_) => StatusCode::CONFLICT,
            ChangeError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
            ChangeError::BadToken => StatusCode::FORBIDDEN,
            ChangeError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        error(status, e)
    }
}

/// A MAC from the path, or a 400 that says so.
pub fn mac_from(text: &str) -> Result<Mac, ApiError> {
    text.parse()
        .map_err(|e: String| error(StatusCode::BAD_REQUEST, format!("mac: {e}")))
}

async fn provisioned(
    State(state): State<ApiState>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Answer {
    provisioned_by(&state.control, &mac, &headers, Some(&state.token))
}

async fn provisioned_on_boot_network(
    State(control): State<Arc<Control>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Answer {
    provisioned_by(&control, &mac, &headers, None)
}

/// Marks `mac` provisioned if the bearer token is its provisioning token
/// (or, on the management listener, the API token).
fn provisioned_by(
    control: &Control,
    mac: &str,
    headers: &HeaderMap,
    api_token: Option<&str>,
) -> Answer {
    let mac = mac_from(mac)?;
    let token = bearer(headers).ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "an Authorization: Bearer TOKEN header is required (the machine's {{provision_token}})",
        )
    })?;
    let record = match api_token {
        Some(admin) if constant_time_eq(token.as_bytes(), admin.as_bytes()) => {
            let own = control
                .provision_key()
                .ok_or(ChangeError::BadToken)?
                .token(mac);
            control.provisioned(mac, &own)?
        }
        _ => control.provisioned(mac, token)?,
    };
    Ok(Json(record).into_response())
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<serde_json::Value>,
}

async fn health(State(state): State<ApiState>) -> Response {
    let store = state.control.lease_store_failing();
    let checks = json!({
        "lease_store": Check { ok: store.is_none(), why: store, detail: None },
        "programs": Check {
            ok: true,
            why: None,
            detail: Some(json!(state
                .attached
                .iter()
                .map(|(i, how)| json!({ "interface": i, "attached": how }))
                .collect::<Vec<_>>())),
        },
    });
    let ok = checks
        .as_object()
        .is_some_and(|c| c.values().all(|v| v["ok"] == true));
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "status": if ok { "ok" } else { "failing" }, "checks": checks })),
    )
        .into_response()
}

/// A lease as the API shows it.
#[derive(Serialize)]
struct LeaseView {
    ip: Ipv4Addr,
    mac: String,
    /// Unix seconds.
    expires: u64,
    state: &'static str,
    hostname: Option<String>,
}

impl LeaseView {
    fn of(l: &Lease) -> Self {
        Self {
            ip: l.ip,
            mac: Mac(l.mac).to_string(),
            expires: l.expires,
            state: match l.state {
                LeaseState::Active => "active",
                LeaseState::Released => "released",
                LeaseState::Declined => "declined",
            },
            hostname: l.hostname.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFilter {
    mac: Option<String>,
    ip: Option<Ipv4Addr>,
    /// A network, e.g. 10.9.0.0/24.
    subnet: Option<ipnet::Ipv4Net>,
    state: Option<String>,
}

async fn leases(State(state): State<ApiState>, Query(filter): Query<LeaseFilter>) -> Answer {
    let mac = filter.mac.as_deref().map(mac_from).transpose()?;
    if let Some(s) = filter
        .state
        .as_deref()
        .filter(|s| !["active", "released", "declined"].contains(s))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("state: {s:?} is not active, released or declined"),
        ));
    }
    let views: Vec<LeaseView> = state
        .control
        .leases()
        .iter()
        .filter(|l| mac.is_none_or(|m| m.0 == l.mac))
        .filter(|l| filter.ip.is_none_or(|ip| ip == l.ip))
        .filter(|l| filter.subnet.is_none_or(|n| n.contains(&l.ip)))
        .map(LeaseView::of)
        .filter(|v| filter.state.as_deref().is_none_or(|s| s == v.state))
        .collect();
    Ok(Json(views).into_response())
}

async fn lease(State(state): State<ApiState>, Path(ip): Path<String>) -> Answer {
    let ip: Ipv4Addr = ip.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            format!("ip: {ip:?} is not an IPv4 address"),
        )
    })?;
    match state.control.leases().iter().find(|l| l.ip == ip) {
        Some(l) => Ok(Json(LeaseView::of(l)).into_response()),
        None => Err(error(StatusCode::NOT_FOUND, format!("no lease for {ip}"))),
    }
}
