//! The outside surface over HTTP (axum): `/metrics`, `/healthz` (alive), `/readyz` (the rules
//! of `health::Readiness::serving`), open to all; and behind a bearer token (`auth`)
//! `GET /v1/users/{user_id}/recommendations?k=&exclude=` (the pull path, ranked by the same
//! code as the push path) and `GET /v1/users/{user_id}/history`.

mod auth;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::activity::Activity;
use crate::health::{Health, Readiness};
use crate::items::ItemRules;
use crate::live::LiveModelSlot;
use crate::metrics::Metrics;
use crate::serve::recommend_hiding;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::wire::{Recommendation, MAX_ID_BYTES};

pub use auth::Auth;

/// Largest `k` the API serves.
pub const MAX_K: usize = 1000;

/// Most item ids a pull may exclude.
pub const MAX_EXCLUDE: usize = 1000;

/// What the HTTP surface uses: the store and live model (pull scoring), the activity record
/// (queue size), metrics, and health (readiness).
pub struct Http {
    /// Who may use `/v1/`.
    pub auth: Arc<Auth>,
    pub default_k: usize,
    /// Permits for pull scorings running at once (`http.max_concurrent_pulls`).
    pub pulls: Arc<tokio::sync::Semaphore>,
    pub store: Arc<Store>,
    /// Role `serve`: only the owner of a user's partition answers for them.
    pub ownership: Arc<crate::ownership::Ownership>,
    /// Where the other replicas answer (a pull for their users is redirected there).
    pub directory: Arc<crate::members::Directory>,
    pub instance_id: String,
    pub live: Arc<LiveModelSlot>,
    pub activity: Arc<Activity>,
    /// Which items may be recommended.
    pub items: Arc<ItemRules>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

impl Http {
    /// Serves on `listener` until shutdown.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        axum::serve(listener, router(Arc::new(self)))
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await?;
        Ok(())
    }

    fn readiness(&self) -> Result<(), &'static str> {
        Readiness::read(&self.health).serving()
    }
}

/// The routes.
pub fn router(http: Arc<Http>) -> Router {
    let gate = auth::Gate {
        auth: http.auth.clone(),
        metrics: http.metrics.clone(),
    };
    let api = Router::new()
        .route("/v1/users/{user_id}/recommendations", get(recommendations))
        .route("/v1/users/{user_id}/history", get(history))
        .route_layer(axum::middleware::from_fn_with_state(
            gate,
            auth::require_token,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(http)
}

async fn metrics(State(s): State<Arc<Http>>) -> Response {
    s.metrics.set_store_counts(s.store.counts());
    s.metrics
        .items_unavailable
        .set(s.items.unavailable() as i64);
    s.metrics.dirty_users.set(s.activity.waiting_count() as i64);
    s.metrics.ready.set(s.readiness().is_ok() as i64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<Arc<Http>>) -> Response {
    match s.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RecQuery {
    k: Option<usize>,
    /// Item ids never to recommend in this answer, comma-separated.
    exclude: Option<String>,
    /// Only items of this category (as the items topic gives them).
    category: Option<String>,
}

/// A pull's question, checked.
struct Pull {
    k: usize,
    /// Item ids never to recommend in this answer.
    exclude: Vec<String>,
    category: Option<String>,
}

impl Pull {
    /// Checks a query: a bad value is refused with what is wrong (a 400).
    fn read(q: RecQuery, default_k: usize) -> Result<Self, String> {
        let k = q.k.unwrap_or(default_k);
        if k == 0 || k > MAX_K {
            return Err(format!("k must be between 1 and {MAX_K}"));
        }
        let exclude: Vec<String> = q
            .exclude
            .unwrap_or_default()
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect();
        if exclude.len() > MAX_EXCLUDE {
            return Err(format!("exclude holds at most {MAX_EXCLUDE} item ids"));
        }
        if exclude.iter().any(|id| id.len() > MAX_ID_BYTES) {
            return Err(format!(
                "an excluded item id is longer than {MAX_ID_BYTES} bytes"
            ));
        }
        let category = q.category.filter(|c| !c.is_empty());
        if category.as_ref().is_some_and(|c| c.len() > MAX_ID_BYTES) {
            return Err(format!("category must be at most {MAX_ID_BYTES} bytes"));
        }
        Ok(Self {
            k,
            exclude,
            category,
        })
    }

    /// The same question, as a path below the user at another replica.
    fn path(&self) -> String {
        let mut path = format!("recommendations?k={}", self.k);
        if !self.exclude.is_empty() {
            let ids: Vec<String> = self.exclude.iter().map(|i| url_escape(i)).collect();
            path.push_str(&format!("&exclude={}", ids.join(",")));
        }
        if let Some(c) = &self.category {
            path.push_str(&format!("&category={}", url_escape(c)));
        }
        path
    }

    /// The store indices the answer may not hold, ascending: the hidden items (for a category,
    /// every item outside it too) and the excluded ones (an item the store does not know cannot
    /// be recommended anyway).
    fn hidden(&self, store: &Store, items: &ItemRules) -> anyhow::Result<Vec<u32>> {
        let mut hidden: Vec<u32> = match &self.category {
            Some(c) => items.hidden_outside(store, c),
            None => items.hidden(store).to_vec(),
        };
        for id in &self.exclude {
            hidden.extend(store.item_index(id)?);
        }
        hidden.sort_unstable();
        hidden.dedup();
        Ok(hidden)
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// An error to retry after a second (`Retry-After: 1`).
fn retry_later(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = error(status, msg);
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    r
}

async fn recommendations(
    State(s): State<Arc<Http>>,
    Path(user_id): Path<String>,
    query: Result<Query<RecQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(StatusCode::BAD_REQUEST, "k must be a positive integer");
    };
    let pull = match Pull::read(q, s.default_k) {
        Ok(pull) => pull,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    if user_id.is_empty() || user_id.len() > MAX_ID_BYTES {
        return error(StatusCode::BAD_REQUEST, "user_id must be 1 to 256 bytes");
    }
    if s.ownership.owner_of(&user_id).is_none() {
        return not_owned(&s, &user_id, &pull.path());
    }
    if !s.items.loaded() {
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "the items topic is still being read: retry",
        );
    }
    let Ok(permit) = s.pulls.clone().try_acquire_owned() else {
        s.metrics.pulls_refused.inc();
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            "too many pull requests at once: retry later",
        );
    };
    let shared = s.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Recommendation>> {
        let _permit = permit;
        let Some(u) = shared.store.user_index(&user_id)? else {
            return Ok(None);
        };
        let hidden = pull.hidden(&shared.store, &shared.items)?;
        // a running canary ranks its slice here too, as it does for pushed recommendations
        let models = shared.live.models();
        let side = models.side(&user_id);
        let model = models.for_side(side);
        let rec = recommend_hiding(&shared.store, model.map(|m| m.as_ref()), u, pull.k, &hidden)?;
        Ok(rec.map(|mut r| {
            r.canary = side == Some(crate::promotion::Side::Canary) && r.model_version.is_some();
            r
        }))
    })
    .await;
    match result {
        Ok(Ok(Some(rec))) => Json(rec).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "unknown user"),
        Ok(Err(e)) => internal_error(&format!("{e:#}")),
        Err(e) => internal_error(&e.to_string()),
    }
}

/// A user's stored history (item ids, oldest first), from their owner: what recommendations
/// are ranked from, for operators and for checking a fleet's state from outside.
async fn history(State(s): State<Arc<Http>>, Path(user_id): Path<String>) -> Response {
    if user_id.is_empty() || user_id.len() > MAX_ID_BYTES {
        return error(StatusCode::BAD_REQUEST, "user_id must be 1 to 256 bytes");
    }
    if s.ownership.owner_of(&user_id).is_none() {
        return not_owned(&s, &user_id, "history");
    }
    let shared = s.clone();
    let id = user_id.clone();
    let found = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<String>>> {
        shared.store.history_ids(&id)
    })
    .await;
    match found {
        Ok(Ok(Some(items))) => {
            Json(serde_json::json!({ "user_id": user_id, "items": items })).into_response()
        }
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "unknown user"),
        Ok(Err(e)) => internal_error(&format!("{e:#}")),
        Err(e) => internal_error(&e.to_string()),
    }
}

/// A pull for a user of a partition this replica does not own (a stale local copy is never
/// served): a redirect to the owner's address, or 503 with `Retry-After` while no other replica
/// announces the partition (it is moving: revoked, or being restored).
fn not_owned(s: &Http, user_id: &str, rest: &str) -> Response {
    let partition = s.ownership.partition_of(user_id);
    if let Some((owner, http)) = s.directory.owner_of(partition) {
        if owner != s.instance_id {
            let user: String = url_escape(user_id);
            let location = format!("{http}/v1/users/{user}/{rest}");
            if let Ok(v) = axum::http::HeaderValue::from_str(&location) {
                let mut r = error(
                    StatusCode::TEMPORARY_REDIRECT,
                    format!("partition {partition} is owned by {owner}"),
                );
                r.headers_mut().insert(axum::http::header::LOCATION, v);
                return r;
            }
        }
    }
    retry_later(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("partition {partition} of this user is moving between replicas: retry"),
    )
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A 500 that names a request id and nothing internal; the cause is logged under that id.
fn internal_error(cause: &str) -> Response {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = format!(
        "{:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    tracing::error!(request_id = %id, cause, "a pull request failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({ "error": "internal error", "request_id": id })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_500_names_a_request_id_and_nothing_internal() {
        let r = internal_error("sled: corrupt page 7 at /var/lib/multivaed/store");
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "internal error");
        assert!(v["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("sled") && !text.contains("/var/lib"),
            "{text}"
        );
    }
}
