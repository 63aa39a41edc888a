//! The outside surface over HTTP (axum): `/metrics`, `/healthz` (alive), `/readyz` (store open,
//! a model loaded, partitions assigned, broker reachable) and
//! `GET /v1/users/{user_id}/recommendations?k=` (the pull path, same scoring as the push path).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::daemon::Shared;
use crate::serve::{recommend_users, Recommendation};

/// Largest `k` the API serves.
pub const MAX_K: usize = 1000;

/// The router over the daemon's shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/users/{user_id}/recommendations", get(recommendations))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(shared)
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let counts = s.store.counts();
    s.metrics.store_users.set(counts.users as i64);
    s.metrics.store_items.set(counts.items as i64);
    s.metrics.store_interactions.set(counts.interactions as i64);
    s.metrics.dirty_users.set(s.dirty.len() as i64);
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

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
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
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

async fn recommendations(
    State(s): State<Arc<Shared>>,
    Path(user_id): Path<String>,
    query: Result<Query<RecQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(StatusCode::BAD_REQUEST, "k must be a positive integer");
    };
    let k = q.k.unwrap_or(s.config.serve.k);
    if k == 0 || k > MAX_K {
        return error(
            StatusCode::BAD_REQUEST,
            format!("k must be between 1 and {MAX_K}"),
        );
    }
    if user_id.is_empty() || user_id.len() > crate::ingest::event::MAX_ID_BYTES {
        return error(StatusCode::BAD_REQUEST, "user_id must be 1 to 256 bytes");
    }
    let shared = s.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Recommendation>> {
        let Some(u) = shared.store.user_index(&user_id)? else {
            return Ok(None);
        };
        let live = shared.registry.current();
        Ok(recommend_users(&shared.store, live.as_deref(), &[u], k)?.pop())
    })
    .await;
    match result {
        Ok(Ok(Some(rec))) => Json(rec).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "unknown user"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "scoring failed"),
    }
}

impl Shared {
    /// `Ok` when ready to serve, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.registry.current().is_none() {
            return Err("no model loaded yet");
        }
        if self.health.partitions.load(Ordering::Acquire) == 0 {
            return Err("no partitions assigned");
        }
        if !self.health.broker_up.load(Ordering::Acquire) {
            return Err("kafka brokers unreachable");
        }
        Ok(())
    }
}
