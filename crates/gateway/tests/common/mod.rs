//! Helpers shared by the gateway's integration tests.
#![allow(dead_code)] // each test binary uses its own part

pub mod browser;

use serde_json::Value as Json;

/// An API call with the admin `token` (if any): status and JSON body.
pub fn api(method: &str, url: &str, token: Option<&str>, body: Option<Json>) -> (u16, Json) {
    let header = token.map(|t| format!("Bearer {t}"));
    api_with_header(method, url, header.as_deref(), body)
}

/// An API call with this exact `Authorization` header (if any): status and JSON body.
pub fn api_with_header(method: &str, url: &str, authorization: Option<&str>, body: Option<Json>) -> (u16, Json) {
    let mut req = ureq::request(method, url);
    if let Some(a) = authorization {
        req = req.set("Authorization", a);
    }
    let r = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Json::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Json::Null)),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}
