//! An in-process Azure Key Vault (HTTPS, test CA) and its token endpoints, answering the
//! calls the `azure` provider makes with the REST API's envelopes and errors
//! (learn.microsoft.com: Key Vault REST 7.4 "Get Secret Versions", "Get Secret",
//! "Authentication, requests and responses"; Microsoft identity platform client
//! credentials flow; managed identity IMDS and App Service token endpoints):
//!
//! - `GET /secrets/{name}/versions?api-version=7.4[&maxresults=N]`, paged with `nextLink`
//!   (`$skiptoken`), items in id order (not creation order, as the real API);
//! - `GET /secrets/{name}/{version}?api-version=7.4` (403 `SecretDisabled` for a disabled one);
//! - `GET /secrets?api-version=7.4&maxresults=1`;
//! - a request without a valid bearer gets 401 with the `WWW-Authenticate` challenge;
//! - `POST /{tenant}/oauth2/v2.0/token` (client secret or workload identity assertion);
//! - `GET /metadata/identity/oauth2/token` (IMDS shape, `Metadata: true`) and
//!   `GET /msi/token` (App Service shape, `X-IDENTITY-HEADER`).
//!
//! Counts calls per endpoint; can throttle (429 + Retry-After), break (500), reject every
//! token, or send a challenge for another resource.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::http::{self, Req, Resp, Server};
use super::tls::TestCa;

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const CLIENT_ID: &str = "0f7e5c2a-1d2b-4c3d-9e8f-a1b2c3d4e5f6";
pub const CLIENT_SECRET: &str = "cs~Q8w.Lp2-client-secret-value";
pub const ASSERTION: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZHNvIn0.c2lnbmF0dXJl";
pub const IDENTITY_HEADER: &str = "app-service-identity-header-7c1d";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Normal,
    Throttled(u64),
    Broken,
    /// The vault rejects every bearer token (401 with a challenge).
    RejectTokens,
}

struct SecretVersion {
    id: String,
    value: String,
    enabled: bool,
    created: i64,
}

#[derive(Default)]
struct State {
    /// name -> versions.
    secrets: HashMap<String, Vec<SecretVersion>>,
    denied: HashSet<String>,
    tokens: HashSet<String>,
    issued: usize,
    /// The resource the challenge names.
    resource: String,
    page_size: usize,
    mode: Option<Mode>,
    calls: HashMap<&'static str, usize>,
    /// Every `Authorization` header the vault saw (for "no bearer before the challenge").
    authorizations: Vec<Option<String>>,
}

pub struct KeyVaultServer {
    _server: Server,
    /// `https://localhost:PORT`: the vault and the authority host at once.
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl KeyVaultServer {
    pub async fn start(ca: &TestCa) -> KeyVaultServer {
        let state = Arc::new(Mutex::new(State {
            resource: "https://localhost".to_string(),
            page_size: 25,
            ..State::default()
        }));
        let handler_state = Arc::clone(&state);
        let server = http::serve(
            Some(Arc::clone(&ca.server)),
            Arc::new(move |req| handle(&handler_state, req)),
        )
        .await;
        let url = format!("https://localhost:{}", server.addr.port());
        KeyVaultServer {
            _server: server,
            url,
            state,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds a version created at `created` (Unix seconds); returns its id.
    pub fn add_version(&self, name: &str, value: &str, enabled: bool, created: i64) -> String {
        let mut st = self.state();
        st.issued += 1;
        // Ids are 32 hex digits that do not sort by creation time.
        let id = format!(
            "{:032x}",
            (st.issued as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
        );
        st.secrets
            .entry(name.to_string())
            .or_default()
            .push(SecretVersion {
                id: id.clone(),
                value: value.to_string(),
                enabled,
                created,
            });
        id
    }

    pub fn set_enabled(&self, name: &str, id: &str, enabled: bool) {
        let mut st = self.state();
        let v = st
            .secrets
            .get_mut(name)
            .unwrap()
            .iter_mut()
            .find(|v| v.id == id)
            .unwrap();
        v.enabled = enabled;
    }

    pub fn deny(&self, name: &str) {
        self.state().denied.insert(name.to_string());
    }

    pub fn set_page_size(&self, n: usize) {
        self.state().page_size = n;
    }

    pub fn set_resource(&self, resource: &str) {
        self.state().resource = resource.to_string();
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state().mode = Some(mode);
    }

    /// Calls so far: "challenge" (401s), "versions", "get", "list", "token-client-secret",
    /// "token-workload", "token-imds", "token-app-service", "token-rejected".
    pub fn calls(&self, endpoint: &str) -> usize {
        self.state().calls.get(endpoint).copied().unwrap_or(0)
    }

    pub fn token_calls(&self) -> usize {
        let st = self.state();
        st.calls
            .iter()
            .filter(|(k, _)| k.starts_with("token-"))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.state().authorizations.clone()
    }

    /// Every token the endpoints issued.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state().tokens.iter().cloned().collect()
    }
}

fn count(st: &mut State, endpoint: &'static str) {
    *st.calls.entry(endpoint).or_insert(0) += 1;
}

fn kv_error(status: u16, code: &str, message: &str) -> Resp {
    Resp::json(status, json!({"error": {"code": code, "message": message}}))
}

fn issue(st: &mut State, kind: &str) -> String {
    st.issued += 1;
    let token = format!("eyJ0eXAiOiJKV1QifQ.{kind}-access-token-{}.sig", st.issued);
    st.tokens.insert(token.clone());
    token
}

fn handle(state: &Mutex<State>, req: Req) -> Resp {
    let mut st = state.lock().unwrap();
    let path = req.path.clone();
    if path == format!("/{TENANT}/oauth2/v2.0/token") || path.ends_with("/oauth2/v2.0/token") {
        return aad_token(&mut st, &req);
    }
    if path == "/metadata/identity/oauth2/token" {
        count(&mut st, "token-imds");
        if req.header("metadata") != Some("true") {
            return Resp::json(
                400,
                json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
            );
        }
        if req.query.get("api-version").map(String::as_str) != Some("2018-02-01")
            || req.query.get("resource") != Some(&st.resource)
        {
            return Resp::json(
                400,
                json!({"error": "invalid_resource", "error_description": "AADSTS500011: The resource principal was not found"}),
            );
        }
        let token = issue(&mut st, "imds");
        return Resp::json(
            200,
            json!({
                "access_token": token, "client_id": CLIENT_ID, "expires_in": "86399", "expires_on": "1893456000",
                "ext_expires_in": "86399", "not_before": "1764583200", "resource": st.resource, "token_type": "Bearer"
            }),
        );
    }
    if path == "/msi/token" {
        count(&mut st, "token-app-service");
        if req.header("x-identity-header") != Some(IDENTITY_HEADER) {
            return Resp::json(
                401,
                json!({"statusCode": 401, "message": "Unauthorized request: X-IDENTITY-HEADER is missing or invalid"}),
            );
        }
        if req.query.get("api-version").map(String::as_str) != Some("2019-08-01")
            || req.query.get("resource") != Some(&st.resource)
        {
            return Resp::json(
                400,
                json!({"statusCode": 400, "message": "Invalid resource or api-version"}),
            );
        }
        let token = issue(&mut st, "app-service");
        let expires_on = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        return Resp::json(
            200,
            json!({
                "access_token": token, "expires_on": expires_on.to_string(), "resource": st.resource,
                "token_type": "Bearer", "client_id": CLIENT_ID
            }),
        );
    }
    vault(&mut st, &req)
}

fn aad_token(st: &mut State, req: &Req) -> Resp {
    let form = req.form();
    let scope_ok = form.get("scope") == Some(&format!("{}/.default", st.resource));
    let tenant_ok = req.path == format!("/{TENANT}/oauth2/v2.0/token");
    let aad_error = |status: u16, error: &str, description: &str| {
        Resp::json(
            status,
            json!({
                "error": error, "error_description": format!("{description}\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2026-12-01 10:00:00Z"),
                "error_codes": [7000215], "timestamp": "2026-12-01 10:00:00Z", "trace_id": "0000", "correlation_id": "1111"
            }),
        )
    };
    if req.method != "POST" || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        count(st, "token-rejected");
        return aad_error(
            400,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        );
    }
    if !tenant_ok {
        count(st, "token-rejected");
        return aad_error(400, "invalid_tenant", "AADSTS90002: Tenant not found.");
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) || !scope_ok {
        count(st, "token-rejected");
        return aad_error(
            400,
            "invalid_request",
            "AADSTS700016: Application not found in the directory, or invalid scope.",
        );
    }
    let kind = if let Some(secret) = form.get("client_secret") {
        if secret != CLIENT_SECRET {
            count(st, "token-rejected");
            return aad_error(
                401,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            );
        }
        count(st, "token-client-secret");
        "client-secret"
    } else {
        let type_ok = form.get("client_assertion_type").map(String::as_str)
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
        if !type_ok || form.get("client_assertion").map(String::as_str) != Some(ASSERTION) {
            count(st, "token-rejected");
            return aad_error(
                400,
                "invalid_client",
                "AADSTS700024: Client assertion is not within its valid time range.",
            );
        }
        count(st, "token-workload");
        "workload"
    };
    let token = issue(st, kind);
    Resp::json(
        200,
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}),
    )
}

fn vault(st: &mut State, req: &Req) -> Resp {
    st.authorizations
        .push(req.header("authorization").map(str::to_string));
    let bearer = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string);
    let mode = st.mode.unwrap_or(Mode::Normal);
    let valid = bearer.as_ref().is_some_and(|t| st.tokens.contains(t)) && mode != Mode::RejectTokens;
    if !valid {
        count(st, "challenge");
        let message = if bearer.is_none() {
            "AKV10000: Request is missing a Bearer or PoP token."
        } else {
            "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/..., found https://sts.windows.net/other/."
        };
        return kv_error(401, "Unauthorized", message).with_header(
            "www-authenticate",
            &format!(
                "Bearer authorization=\"https://login.microsoftonline.com/{TENANT}\", resource=\"{}\"",
                st.resource
            ),
        );
    }
    if req.query.get("api-version").map(String::as_str) != Some("7.4") {
        return kv_error(
            400,
            "BadParameter",
            "The request URI contains an invalid api-version parameter.",
        );
    }
    match mode {
        Mode::Throttled(secs) => {
            return kv_error(429, "Throttled", "Request was not processed because too many requests were received. Reason: A generic throttling error has occurred.")
                .with_header("retry-after", &secs.to_string());
        }
        Mode::Broken => return kv_error(500, "InternalServerError", "An unexpected error occurred."),
        _ => {}
    }
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["secrets"] => {
            count(st, "list");
            Resp::json(200, json!({"value": [], "nextLink": null}))
        }
        ["secrets", name, "versions"] => {
            count(st, "versions");
            let name = name.to_string();
            if st.denied.contains(&name) {
                return forbidden(&name, "list");
            }
            let Some(versions) = st.secrets.get(&name) else {
                return not_found(&name);
            };
            let mut items: Vec<&SecretVersion> = versions.iter().collect();
            items.sort_by(|a, b| a.id.cmp(&b.id));
            let page = req
                .query
                .get("maxresults")
                .and_then(|m| m.parse().ok())
                .unwrap_or(st.page_size)
                .min(st.page_size);
            let skip: usize = req
                .query
                .get("$skiptoken")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let host = req.header("host").unwrap_or("localhost");
            let value: Vec<Value> = items
                .iter()
                .skip(skip)
                .take(page)
                .map(|v| json!({
                    "id": format!("https://{host}/secrets/{name}/{}", v.id),
                    "attributes": {"enabled": v.enabled, "created": v.created, "updated": v.created, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
                    "tags": {}
                }))
                .collect();
            let next = (skip + page < items.len()).then(|| {
                format!(
                    "https://{host}/secrets/{name}/versions?api-version=7.4&$skiptoken={}&maxresults={page}",
                    skip + page
                )
            });
            Resp::json(200, json!({"value": value, "nextLink": next}))
        }
        ["secrets", name, version] => {
            count(st, "get");
            let name = name.to_string();
            if st.denied.contains(&name) {
                return forbidden(&name, "get");
            }
            let Some(v) = st
                .secrets
                .get(&name)
                .and_then(|vs| vs.iter().find(|v| v.id == *version))
            else {
                return not_found(&name);
            };
            if !v.enabled {
                return Resp::json(
                    403,
                    json!({"error": {"code": "Forbidden", "message": "Operation get is not allowed on a disabled secret.", "innererror": {"code": "SecretDisabled"}}}),
                );
            }
            let host = req.header("host").unwrap_or("localhost");
            Resp::json(
                200,
                json!({
                    "value": v.value,
                    "id": format!("https://{host}/secrets/{name}/{}", v.id),
                    "attributes": {"enabled": true, "created": v.created, "updated": v.created, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
                    "tags": {}
                }),
            )
        }
        _ => kv_error(404, "NotFound", "The requested resource was not found."),
    }
}

fn not_found(name: &str) -> Resp {
    kv_error(
        404,
        "SecretNotFound",
        &format!(
            "A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command."
        ),
    )
}

fn forbidden(name: &str, op: &str) -> Resp {
    Resp::json(
        403,
        json!({"error": {
            "code": "Forbidden",
            "message": format!("The user, group or application 'appid={CLIENT_ID};oid=5b3c;iss=https://sts.windows.net/{TENANT}/' does not have secrets {op} permission on key vault 'test;location=westeurope'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287 (secret {name})"),
            "innererror": {"code": "AccessDenied"}
        }}),
    )
}
