//! The outside surface over HTTP (axum): `/metrics`, `/healthz` (alive), `/readyz` (the rules
//! of `health::Readiness::serving`) and `GET /v1/users/{user_id}/recommendations?k=` (the pull
//! path, ranked by the same code as the push path).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::activity::Activity;
use crate::health::{Health, Readiness};
use crate::live::LiveModelSlot;
use crate::metrics::Metrics;
use crate::serve::recommend_users;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::wire::{Recommendation, MAX_ID_BYTES};

/// Largest `k` the API serves.
pub const MAX_K: usize = 1000;

/// What the HTTP surface uses: the store and live model (pull scoring), the activity record
/// (queue size), metrics, and health (readiness).
pub struct Http {
    pub default_k: usize,
    pub store: Arc<Store>,
    pub live: Arc<LiveModelSlot>,
    pub activity: Arc<Activity>,
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
        Readiness::read(&self.health, &self.live, &self.store).serving()
    }
}

/// The routes.
pub fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/users/{user_id}/recommendations", get(recommendations))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(http)
}

async fn metrics(State(s): State<Arc<Http>>) -> Response {
    s.metrics.set_store_counts(s.store.counts());
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
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

async fn recommendations(
    State(s): State<Arc<Http>>,
    Path(user_id): Path<String>,
    query: Result<Query<RecQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(StatusCode::BAD_REQUEST, "k must be a positive integer");
    };
    let k = q.k.unwrap_or(s.default_k);
    if k == 0 || k > MAX_K {
        return error(
            StatusCode::BAD_REQUEST,
            format!("k must be between 1 and {MAX_K}"),
        );
    }
    if user_id.is_empty() || user_id.len() > MAX_ID_BYTES {
        return error(StatusCode::BAD_REQUEST, "user_id must be 1 to 256 bytes");
    }
    let shared = s.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Recommendation>> {
        let Some(u) = shared.store.user_index(&user_id)? else {
            return Ok(None);
        };
        let live = shared.live.current();
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
