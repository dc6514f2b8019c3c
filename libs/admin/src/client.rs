//! A client of the coordinator's admin API, used by the `ferry` CLI.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;

/// Why a call failed. Each message is one sentence.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No coordinator answered.
    #[error("cannot reach a coordinator at {addrs} ({reason}); check --coordinator (or FERRY_COORDINATOR) and that a coordinator is running")]
    Unreachable {
        /// Every address tried.
        addrs: String,
        /// The last transport error.
        reason: String,
    },
    /// The coordinator refused; its sentence.
    #[error("{0}")]
    Api(String),
    /// The coordinator refused with 404: no such table or dup there; its sentence.
    #[error("{0}")]
    NotFound(String),
    /// The answer was not what this CLI understands.
    #[error("the coordinator at {addr} gave an answer this ferry cannot read ({reason}); are the CLI and the coordinator the same version?")]
    BadAnswer {
        /// Who answered.
        addr: String,
        /// Decoder message.
        reason: String,
    },
}

/// Talks to the first coordinator of a list that answers.
pub struct AdminClient {
    bases: Vec<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `addrs` are `host:port` or `http://host:port`; tried in order.
    pub fn new(addrs: &[String], timeout: Duration) -> Result<AdminClient, ClientError> {
        let bases = addrs
            .iter()
            .map(|a| a.trim().trim_end_matches('/'))
            .filter(|a| !a.is_empty())
            .map(|a| {
                if a.starts_with("http://") || a.starts_with("https://") {
                    a.to_string()
                } else {
                    format!("http://{a}")
                }
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| ClientError::Unreachable {
                addrs: addrs.join(","),
                reason: e.to_string(),
            })?;
        Ok(AdminClient { bases, http })
    }

    /// Which receiver takes each partition of `table` (the remote cluster's answer).
    pub async fn table_receivers(
        &self,
        table: &str,
    ) -> Result<crate::api::TableReceivers, ClientError> {
        self.get(&format!("/v1/tables/{table}/receivers")).await
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(reqwest::Method::GET, path, None::<&()>).await
    }

    /// POST `body` to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// PUT `body` to `path`.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    /// DELETE `path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(reqwest::Method::DELETE, path, None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut last = String::from("no address given");
        for base in &self.bases {
            let mut req = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = if e.is_timeout() {
                        "no answer in time".to_string()
                    } else if e.is_connect() {
                        "connection refused".to_string()
                    } else {
                        e.without_url().to_string()
                    };
                    continue;
                }
            };
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| ClientError::BadAnswer {
                addr: base.clone(),
                reason: e.without_url().to_string(),
            })?;
            if status.is_success() {
                return serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer {
                    addr: base.clone(),
                    reason: e.to_string(),
                });
            }
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) if status == reqwest::StatusCode::NOT_FOUND => ClientError::NotFound(b.error),
                Ok(b) => ClientError::Api(b.error),
                Err(_) => ClientError::Api(format!(
                    "the coordinator at {base} refused the request ({status}: {})",
                    String::from_utf8_lossy(&bytes).trim()
                )),
            });
        }
        Err(ClientError::Unreachable {
            addrs: self.bases.join(","),
            reason: last,
        })
    }
}
