//! HTTP to the nodes of a sandbox: JSON in, JSON out, every request with a timeout.

use std::time::Duration;

use reqwest::Method;
use serde::Serialize;
use serde_json::Value;

use crate::{ClusterSandbox, SandboxError};

/// The cluster status endpoint.
pub(crate) const CLUSTER_PATH: &str = "/api/v1/cluster";

/// A node's answer: its status and its JSON body (`Value::Null` for an empty body; a non-2xx
/// body that is not JSON comes as a JSON string).
#[derive(Debug, Clone, PartialEq)]
pub struct JsonReply {
    /// The HTTP status.
    pub status: u16,
    /// The body, parsed.
    pub body: Value,
}

impl ClusterSandbox {
    /// The sandbox's HTTP client (no proxy, 2 s connect timeout, 5 s request timeout), for
    /// requests the helpers below do not cover.
    pub fn client(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET path` on node `i`, whatever the status; fails only when there is no answer or
    /// the body is not JSON.
    pub async fn get(&self, i: usize, path: &str) -> Result<JsonReply, SandboxError> {
        self.send(i, Method::GET, path, None::<&()>, None).await
    }

    /// `POST path` with a JSON body on node `i`, whatever the status.
    pub async fn post<B: Serialize + ?Sized>(
        &self,
        i: usize,
        path: &str,
        body: &B,
    ) -> Result<JsonReply, SandboxError> {
        self.send(i, Method::POST, path, Some(body), None).await
    }

    /// `GET path` on node `i`, expecting 2xx: the JSON body, or [`SandboxError::Status`]
    /// with the error envelope.
    pub async fn get_json(&self, i: usize, path: &str) -> Result<Value, SandboxError> {
        let reply = self.get(i, path).await?;
        self.expect_success(i, path, reply)
    }

    /// `POST path` with a JSON body on node `i`, expecting 2xx: the JSON body, or
    /// [`SandboxError::Status`] with the error envelope.
    pub async fn post_json<B: Serialize + ?Sized>(
        &self,
        i: usize,
        path: &str,
        body: &B,
    ) -> Result<Value, SandboxError> {
        let reply = self.post(i, path, body).await?;
        self.expect_success(i, path, reply)
    }

    /// `GET path` on node `i` with its own `timeout`, returning only the status (the body may
    /// be anything). A node held with SIGSTOP accepts the connection and never answers:
    /// this fails with an error whose [`SandboxError::is_timeout`] is true.
    pub async fn get_status(
        &self,
        i: usize,
        path: &str,
        timeout: Duration,
    ) -> Result<u16, SandboxError> {
        let url = format!("{}{path}", self.http_url(i));
        let response = self
            .http
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| SandboxError::Http {
                node: self.name(i).to_string(),
                method: "GET".into(),
                url,
                source,
            })?;
        Ok(response.status().as_u16())
    }

    /// Node `i`'s `GET /api/v1/cluster`: its view of the members and of Raft.
    pub async fn cluster_status(&self, i: usize) -> Result<Value, SandboxError> {
        self.get_json(i, CLUSTER_PATH).await
    }

    /// [`ClusterSandbox::get_json`] with its own request timeout.
    pub(crate) async fn get_json_within(
        &self,
        i: usize,
        path: &str,
        timeout: Duration,
    ) -> Result<Value, SandboxError> {
        let reply = self
            .send(i, Method::GET, path, None::<&()>, Some(timeout))
            .await?;
        self.expect_success(i, path, reply)
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<JsonReply, SandboxError> {
        let url = format!("{}{path}", self.http_url(i));
        let node = self.name(i).to_string();
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let http_error = |source| SandboxError::Http {
            node: node.clone(),
            method: method.to_string(),
            url: url.clone(),
            source,
        };
        let response = request.send().await.map_err(http_error)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(http_error)?;
        let body = match serde_json::from_str(&text) {
            _ if text.trim().is_empty() => Value::Null,
            Ok(body) => body,
            // An error that is not Cohort's JSON envelope (a proxy's, a framework's 405…)
            // still has a status worth reporting.
            Err(_) if !(200..300).contains(&status) => Value::String(text),
            Err(source) => {
                return Err(SandboxError::Json {
                    node,
                    url,
                    body: text,
                    source,
                })
            }
        };
        Ok(JsonReply { status, body })
    }

    fn expect_success(
        &self,
        i: usize,
        path: &str,
        reply: JsonReply,
    ) -> Result<Value, SandboxError> {
        if (200..300).contains(&reply.status) {
            Ok(reply.body)
        } else {
            Err(SandboxError::Status {
                node: self.name(i).to_string(),
                url: format!("{}{path}", self.http_url(i)),
                status: reply.status,
                body: reply.body.to_string(),
            })
        }
    }
}
