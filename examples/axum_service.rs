//! Example 5: An axum service: a `VaultPgPool` injected as state, CRUD routes on `items`, and the
//! health route. Ctrl-C drains the server, then revokes the leases.
//!
//! `scripts/demo.sh axum_service`, then e.g.
//! `curl -s localhost:3000/health`, `curl -s -XPOST localhost:3000/items -d '{"name":"x"}'
//! -H 'content-type: application/json'`, `curl -s localhost:3000/items/1`.
//! BIND_ADDR changes the address (default 127.0.0.1:3000), VAULTPOOL_ROLE the role.

use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use vaultpool::axum::{HealthCheck, health};
use vaultpool::postgres::VaultPgPool;

/// The application state: each handler takes the part it needs (`FromRef`).
#[derive(Clone, FromRef)]
pub struct AppState {
    /// The database pool.
    pub db: VaultPgPool,
    /// What /health checks.
    pub health: HealthCheck,
}

/// An item as the API returns it.
#[derive(Serialize)]
pub struct Item {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// The credentials generation the request ran on (for watching rotations).
    pub generation: u64,
}

/// The body of POST and PUT.
#[derive(Deserialize)]
pub struct NewItem {
    /// The item's name.
    pub name: String,
}

type ApiResult<T> = Result<T, vaultpool::Error>;

async fn create_item(
    State(db): State<VaultPgPool>,
    Json(new): Json<NewItem>,
) -> ApiResult<(StatusCode, Json<Item>)> {
    let client = db.get().await?;
    let row = client
        .query_one(
            "INSERT INTO items (name) VALUES ($1) RETURNING id, name",
            &[&new.name],
        )
        .await
        .map_err(vaultpool::Error::query)?;
    Ok((
        StatusCode::CREATED,
        Json(Item {
            id: row.get(0),
            name: row.get(1),
            generation: client.generation().0,
        }),
    ))
}

async fn read_item(
    State(db): State<VaultPgPool>,
    Path(id): Path<i64>,
) -> ApiResult<Result<Json<Item>, StatusCode>> {
    let client = db.get().await?;
    let row = client
        .query_opt("SELECT id, name FROM items WHERE id = $1", &[&id])
        .await
        .map_err(vaultpool::Error::query)?;
    Ok(match row {
        Some(row) => Ok(Json(Item {
            id: row.get(0),
            name: row.get(1),
            generation: client.generation().0,
        })),
        None => Err(StatusCode::NOT_FOUND),
    })
}

async fn update_item(
    State(db): State<VaultPgPool>,
    Path(id): Path<i64>,
    Json(new): Json<NewItem>,
) -> ApiResult<StatusCode> {
    let client = db.get().await?;
    let n = client
        .execute(
            "UPDATE items SET name = $2 WHERE id = $1",
            &[&id, &new.name],
        )
        .await
        .map_err(vaultpool::Error::query)?;
    Ok(if n == 1 {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    })
}

async fn delete_item(State(db): State<VaultPgPool>, Path(id): Path<i64>) -> ApiResult<StatusCode> {
    let client = db.get().await?;
    let n = client
        .execute("DELETE FROM items WHERE id = $1", &[&id])
        .await
        .map_err(vaultpool::Error::query)?;
    Ok(if n == 1 {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    })
}

/// The service's routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/items", post(create_item))
        .route(
            "/items/{id}",
            get(read_item).put(update_item).delete(delete_item),
        )
        .route("/health", get(health))
        .with_state(state)
}

#[allow(dead_code)] // the integration test includes this file for `app` and runs no main
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vaultpool=info,axum_service=info".into()),
        )
        .init();
    let role = std::env::var("VAULTPOOL_ROLE").unwrap_or_else(|_| "immune-readwrite".into());
    let vault = vaultpool::vault::Client::from_env()?;
    let db = VaultPgPool::builder(&role)
        .vault(vault.clone())
        .build()
        .await?;
    let health = HealthCheck::new(vault).with(&db);
    let addr = std::env::var("BIND_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr} (role {role}); Ctrl-C to stop");
    axum::serve(
        listener,
        app(AppState {
            db: db.clone(),
            health,
        }),
    )
    .with_graceful_shutdown(vaultpool::axum::shutdown_signal())
    .await?;
    // The server has drained: now revoke the leases.
    db.close().await;
    println!("stopped; leases revoked");
    Ok(())
}
