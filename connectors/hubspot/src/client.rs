//! HTTP to HubSpot: authentication (private-app token or OAuth with proactive refresh),
//! the shared rate limiter, and the classification of HubSpot's error responses into
//! [`ConnectorError`]s.
//!
//! Every API request goes through [`Client::send`]: wait on the limiter, attach the bearer
//! token, and on a 401 with OAuth refresh once and send once more.

use std::time::Duration;

use optout_core::http::{excerpt, retry_after, transport_error};
use optout_core::{ConnectorError, Secret, Timestamp};
use reqwest::header::{DATE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;

use crate::limit::{Kind, Limiter, until_utc_midnight};

/// Refresh an OAuth access token once this share of its lifetime has passed, so requests
/// never go out with a token about to expire.
const REFRESH_AT: f64 = 0.8;

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    auth: Auth,
    limiter: Limiter,
}

enum Auth {
    PrivateApp(Secret),
    OAuth(OAuth),
}

struct OAuth {
    client_id: String,
    client_secret: Secret,
    /// HubSpot may hand out a new refresh token with each refresh; the latest is kept.
    refresh_token: std::sync::Mutex<Secret>,
    /// Held across a refresh so concurrent requests wait for one refresh, not start many.
    access: tokio::sync::Mutex<Option<Access>>,
}

struct Access {
    token: Secret,
    refresh_at: Instant,
    /// Tells a 401 on a token that was already replaced from one on the current token.
    generation: u64,
}

/// A response the caller handles itself: a success, or a refusal of the request (400,
/// 404, 409…) whose meaning depends on the endpoint.
pub(crate) struct Response {
    pub status: StatusCode,
    pub body: String,
    /// The server's clock (`Date` header), second resolution.
    pub date: Option<Timestamp>,
}

impl Response {
    pub(crate) fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ConnectorError> {
        serde_json::from_str(&self.body).map_err(|e| {
            ConnectorError::Transient(format!(
                "unexpected response from HubSpot ({e}): {}",
                excerpt(&self.body)
            ))
        })
    }

    /// This response as an error, unless it is a success.
    pub(crate) fn success(self) -> Result<Response, ConnectorError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.into_error())
        }
    }

    /// A refusal of the request: sending it again fails the same way.
    pub(crate) fn into_error(self) -> ConnectorError {
        ConnectorError::Rejected(format!("{}: {}", self.status, describe(&self.body)))
    }
}

impl Client {
    pub(crate) fn new(
        base_url: &str,
        timeout: Duration,
        limiter: Limiter,
        token: Option<Secret>,
        oauth: Option<(String, Secret, Secret)>,
    ) -> Self {
        let auth = match (token, oauth) {
            (Some(t), _) => Auth::PrivateApp(t),
            (None, Some((client_id, client_secret, refresh_token))) => Auth::OAuth(OAuth {
                client_id,
                client_secret,
                refresh_token: std::sync::Mutex::new(refresh_token),
                access: tokio::sync::Mutex::new(None),
            }),
            (None, None) => unreachable!("the constructor checks that credentials are configured"),
        };
        Client {
            http: optout_core::http::client(timeout),
            base: base_url.trim_end_matches('/').to_string(),
            auth,
            limiter,
        }
    }

    pub(crate) async fn post(
        &self,
        kind: Kind,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, ConnectorError> {
        self.send(kind, Method::POST, path, Some(body)).await
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Response, ConnectorError> {
        self.send(Kind::Other, Method::GET, path, None).await
    }

    /// Sends one API request. Rate limits, authentication, permission and server failures
    /// come back as errors; other answers (2xx and the remaining 4xx) as a [`Response`].
    async fn send(
        &self,
        kind: Kind,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, ConnectorError> {
        let url = format!("{}{}", self.base, path);
        let mut reauthenticated = false;
        loop {
            self.limiter.acquire(kind).await?;
            let (token, generation) = self.bearer().await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.expose());
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(transport_error)?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let text = resp.text().await.map_err(transport_error)?;
            if status == StatusCode::UNAUTHORIZED
                && !reauthenticated
                && let Auth::OAuth(o) = &self.auth
            {
                // The token was revoked or expired early: refresh once, send once more.
                tracing::info!(
                    path,
                    "HubSpot answered 401; refreshing the OAuth token once"
                );
                reauthenticated = true;
                o.invalidate(generation).await;
                continue;
            }
            return classify(status, &headers, text);
        }
    }

    /// The bearer token to send, refreshing an OAuth token that is near its expiry.
    async fn bearer(&self) -> Result<(Secret, u64), ConnectorError> {
        let o = match &self.auth {
            Auth::PrivateApp(t) => return Ok((t.clone(), 0)),
            Auth::OAuth(o) => o,
        };
        let mut access = o.access.lock().await;
        if let Some(a) = access.as_ref()
            && Instant::now() < a.refresh_at
        {
            return Ok((a.token.clone(), a.generation));
        }
        let generation = access.as_ref().map_or(1, |a| a.generation + 1);
        let (token, lifetime) = self.refresh(o).await?;
        *access = Some(Access {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.mul_f64(REFRESH_AT),
            generation,
        });
        Ok((token, generation))
    }

    /// `POST /oauth/v3/token` with the refresh token. Not rate limited by us: HubSpot's API
    /// limits do not count the OAuth endpoints.
    async fn refresh(&self, o: &OAuth) -> Result<(Secret, Duration), ConnectorError> {
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            refresh_token: Option<String>,
            expires_in: u64,
        }
        let refresh_token = o.refresh_token.lock().expect("refresh token lock").clone();
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", o.client_id.as_str()),
            ("client_secret", o.client_secret.expose()),
            ("refresh_token", refresh_token.expose()),
        ];
        let resp = self
            .http
            .post(format!("{}/oauth/v3/token", self.base))
            .form(&form)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(transport_error)?;
        if matches!(status.as_u16(), 400 | 401 | 403) {
            // A refused refresh token does not heal by retrying: an operator must act.
            return Err(ConnectorError::Unauthorized(format!(
                "HubSpot refused the OAuth refresh ({status}): {}",
                describe(&text)
            )));
        }
        let resp = classify(status, &headers, text)?.success()?;
        let t: TokenResponse = resp.json()?;
        if let Some(new) = t.refresh_token.filter(|r| !r.is_empty()) {
            *o.refresh_token.lock().expect("refresh token lock") = Secret::new(new);
        }
        tracing::debug!(
            expires_in = t.expires_in,
            "refreshed the HubSpot OAuth access token"
        );
        Ok((
            Secret::new(t.access_token),
            Duration::from_secs(t.expires_in.max(1)),
        ))
    }
}

impl Client {
    /// Whether the token is an OAuth access token (whose scopes HubSpot tells).
    pub(crate) fn is_oauth(&self) -> bool {
        matches!(self.auth, Auth::OAuth(_))
    }

    /// For an OAuth app: the current access token's scopes and seconds left
    /// (`GET /oauth/v1/access-tokens/{token}`). `None` for a private-app token: HubSpot
    /// tells nothing of its scopes. The token is in the URL's path, so no error message
    /// names the URL.
    pub(crate) async fn token_scopes(&self) -> Result<Option<(Vec<String>, u64)>, ConnectorError> {
        #[derive(Deserialize)]
        struct Info {
            #[serde(default)]
            scopes: Vec<String>,
            #[serde(default)]
            expires_in: u64,
        }
        if !self.is_oauth() {
            return Ok(None);
        }
        let (token, _) = self.bearer().await?;
        let url = format!("{}/oauth/v1/access-tokens/{}", self.base, token.expose());
        let resp = self.http.get(&url).send().await.map_err(|e| {
            ConnectorError::Transient(format!(
                "cannot read the access token's metadata ({})",
                if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                }
            ))
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(ConnectorError::Unauthorized(format!(
                "HubSpot does not know the access token ({status}): {}",
                describe(&text)
            )));
        }
        let info: Info = serde_json::from_str(&text).map_err(|e| {
            ConnectorError::Transient(format!("unexpected access-token metadata ({e})"))
        })?;
        Ok(Some((info.scopes, info.expires_in)))
    }
}

impl OAuth {
    /// Forgets the access token that drew a 401, unless a newer one replaced it already.
    async fn invalidate(&self, generation: u64) {
        let mut access = self.access.lock().await;
        if access.as_ref().is_some_and(|a| a.generation == generation) {
            *access = None;
        }
    }
}

/// HubSpot's error body; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    message: Option<String>,
    category: Option<String>,
    policy_name: Option<String>,
    #[serde(default)]
    errors: Vec<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    /// `PROPERTY_DOESNT_EXIST`, `INVALID_OPTION` … on validation errors.
    code: Option<String>,
    #[serde(default)]
    context: serde_json::Map<String, serde_json::Value>,
}

fn parse_error(body: &str) -> ErrorBody {
    serde_json::from_str(body).unwrap_or_default()
}

/// `CATEGORY: message` from a HubSpot error body, or an excerpt of whatever came back.
pub(crate) fn describe(body: &str) -> String {
    let e = parse_error(body);
    match (e.category, e.message) {
        (Some(c), Some(m)) => excerpt(&format!("{c}: {m}")),
        (None, Some(m)) => excerpt(&m),
        _ => excerpt(body),
    }
}

/// What a whole-request 400 from a write says is wrong with the portal's properties
/// rather than with one contact: (code, property) for every `PROPERTY_DOESNT_EXIST` and
/// `INVALID_OPTION`. Read from `errors[]` (`code`, `context.propertyName`), else from the
/// list HubSpot embeds in `message` (`Property values were not valid: [{…"error":…,
/// "name":…}]`), with HubSpot's message. Empty when the refusal is about something else.
pub(crate) fn property_refusals(body: &str) -> Vec<(String, String, String)> {
    const CODES: [&str; 2] = ["PROPERTY_DOESNT_EXIST", "INVALID_OPTION"];
    let e = parse_error(body);
    let mut found: Vec<(String, String, String)> = (e.errors.iter())
        .filter_map(|d| {
            let code = d.code.clone().filter(|c| CODES.contains(&c.as_str()))?;
            let name = match d.context.get("propertyName") {
                Some(serde_json::Value::Array(a)) => a.first()?.as_str()?.to_string(),
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => return None,
            };
            Some((code, name, excerpt(d.message.as_deref().unwrap_or(""))))
        })
        .collect();
    if found.is_empty()
        && let Some(list) = (e.message.as_deref())
            .and_then(|m| m.split_once(": ["))
            .and_then(|(_, rest)| {
                serde_json::from_str::<serde_json::Value>(&format!("[{rest}")).ok()
            })
    {
        for v in list.as_array().into_iter().flatten() {
            if let (Some(code), Some(name)) = (v["error"].as_str(), v["name"].as_str())
                && CODES.contains(&code)
            {
                let message = excerpt(v["message"].as_str().unwrap_or(""));
                found.push((code.to_string(), name.to_string(), message));
            }
        }
    }
    found.dedup();
    found
}

fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: String,
) -> Result<Response, ConnectorError> {
    let code = status.as_u16();
    match code {
        429 => Err(rate_limited(headers, &body)),
        401 => Err(ConnectorError::Unauthorized(format!(
            "HubSpot refused the credentials (401): {}",
            describe(&body)
        ))),
        403 => Err(forbidden(&body)),
        // 423: a locked record; 477: a portal migration; 524: an origin timeout.
        408 | 423 | 477 | 500..=599 => Err(ConnectorError::Transient(format!(
            "{status}: {}",
            describe(&body)
        ))),
        _ => {
            let date = headers
                .get(DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| chrono::DateTime::parse_from_rfc2822(s).ok())
                .map(|d| Timestamp::from_millis(d.timestamp_millis()));
            Ok(Response { status, body, date })
        }
    }
}

/// A 429: the 10-second window, the per-second search limit, or the daily allowance.
fn rate_limited(headers: &HeaderMap, body: &str) -> ConnectorError {
    let e = parse_error(body);
    let hint = retry_after(headers);
    let message = e.message.unwrap_or_default();
    match e.policy_name.as_deref() {
        Some("DAILY") => ConnectorError::QuotaExhausted {
            retry_after: until_utc_midnight(),
            detail: "HubSpot's daily API limit for this portal is used up".into(),
        },
        Some("TEN_SECONDLY_ROLLING") => ConnectorError::RateLimited {
            retry_after: Some(hint.unwrap_or(Duration::from_secs(10))),
            policy: "TEN_SECONDLY_ROLLING".into(),
        },
        // Search answers "You have reached your secondly limit." without a policy name.
        _ if message.contains("secondly") => ConnectorError::RateLimited {
            retry_after: Some(hint.unwrap_or(Duration::from_secs(1))),
            policy: "SEARCH_SECONDLY".into(),
        },
        other => ConnectorError::RateLimited {
            retry_after: Some(hint.unwrap_or(Duration::from_secs(10))),
            policy: other.unwrap_or("http 429").to_string(),
        },
    }
}

/// A 403 names the scopes the token lacks in `errors[].context.requiredGranularScopes`
/// (older responses: `requiredScopes`).
fn forbidden(body: &str) -> ConnectorError {
    let e = parse_error(body);
    let scopes: Vec<String> = e
        .errors
        .iter()
        .flat_map(|d| ["requiredGranularScopes", "requiredScopes"].map(|k| d.context.get(k)))
        .flatten()
        .filter_map(|v| v.as_array())
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    let message = e
        .message
        .or_else(|| e.errors.iter().find_map(|d| d.message.clone()))
        .unwrap_or_else(|| excerpt(body));
    if scopes.is_empty() {
        ConnectorError::Forbidden(excerpt(&message))
    } else {
        ConnectorError::Forbidden(format!(
            "missing scope {} ({})",
            scopes.join(" or "),
            excerpt(&message)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    #[test]
    fn rate_limit_policies() {
        let none = HeaderMap::new();
        let ten = r#"{"status":"error","message":"You have reached your ten_secondly_rolling limit.","errorType":"RATE_LIMIT","policyName":"TEN_SECONDLY_ROLLING"}"#;
        let e = classify(status(429), &none, ten.into()).err().unwrap();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(10)));
        assert!(e.to_string().contains("TEN_SECONDLY_ROLLING"));

        let mut with_hint = HeaderMap::new();
        with_hint.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let e = classify(status(429), &with_hint, ten.into()).err().unwrap();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));

        let search = r#"{"status":"error","message":"You have reached your secondly limit.","errorType":"RATE_LIMIT"}"#;
        let e = classify(status(429), &none, search.into()).err().unwrap();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));

        let daily = r#"{"status":"error","message":"You have reached your daily limit.","errorType":"RATE_LIMIT","policyName":"DAILY"}"#;
        let e = classify(status(429), &none, daily.into()).err().unwrap();
        assert!(matches!(e, ConnectorError::QuotaExhausted { .. }) && e.is_alarm());
        assert!(e.retry_after().unwrap() <= Duration::from_secs(86_400));
    }

    #[test]
    fn statuses_map_to_what_the_caller_does_next() {
        let none = HeaderMap::new();
        for code in [500, 502, 503, 504, 524, 423, 477] {
            let e = classify(status(code), &none, "<html>".into())
                .err()
                .unwrap();
            assert!(matches!(e, ConnectorError::Transient(_)), "{code}: {e}");
        }
        let e = classify(
            status(401),
            &none,
            r#"{"message":"expired","category":"EXPIRED_AUTHENTICATION"}"#.into(),
        );
        assert!(
            matches!(e, Err(ConnectorError::Unauthorized(m)) if m.contains("EXPIRED_AUTHENTICATION"))
        );
        for code in [200, 207, 400, 404, 409] {
            assert!(
                classify(status(code), &none, "{}".into()).is_ok(),
                "{code} is for the caller"
            );
        }
    }

    #[test]
    fn forbidden_names_the_missing_scope() {
        let body = r#"{"status":"error","message":"This app hasn't been granted all required scopes to make this call.","errors":[{"message":"One or more of the following scopes are required.","context":{"requiredGranularScopes":["crm.objects.contacts.write"]}}],"category":"MISSING_SCOPES"}"#;
        let e = forbidden(body);
        assert!(
            matches!(&e, ConnectorError::Forbidden(m) if m.starts_with("missing scope crm.objects.contacts.write")),
            "{e}"
        );
        assert!(matches!(forbidden("nope"), ConnectorError::Forbidden(m) if m == "nope"));
    }
}
