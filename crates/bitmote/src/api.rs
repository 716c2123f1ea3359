//! The gateway's HTTP API as the command line reaches it: the admin token from the data
//! directory, and errors in words.

use anyhow::Result;
use bitmote_proto::client::Gateway;

use crate::Global;

/// The gateway's API with its admin token (an error if the token cannot be read).
pub fn admin(g: &Global, url: &str) -> Result<Gateway> {
    Ok(Gateway::new(url).with_token_file(&g.data_dir().join("gateway").join("admin.token"))?)
}

/// A failed request, in words (`gateway answered 409: …`, `cannot reach the gateway: …`).
pub fn api_err(e: ureq::Error) -> anyhow::Error {
    anyhow::Error::new(bitmote_proto::client::ClientError::from(e))
}
