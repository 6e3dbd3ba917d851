//! Install tokens (`POST /v1/tokens`, `GET /v1/tokens`, `POST /v1/tokens/{id}/revoke`), reinstall
//! tokens (`POST /v1/machines/{id}/reinstall-token`, body like `POST /v1/tokens`) and `POST
//! /v1/machines/{id}/unrevoke`; the machine by id or hostname. Who may register or connect with
//! them is [`crate::auth`].

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rehost_proto::token::InstallToken;

use super::model::{
    CreateToken, CreatedReinstallToken, CreatedToken, Revoked, TokenList, Unrevoked,
};
use super::{blocking, internal, resolve, ApiError};
use crate::catalog::now;
use crate::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/machines/{id}/reinstall-token", post(reinstall_token))
        .route("/v1/machines/{id}/unrevoke", post(unrevoke))
}

async fn create_token(
    State(s): State<Arc<Shared>>,
    Json(req): Json<CreateToken>,
) -> Result<Json<CreatedToken>, ApiError> {
    let token = InstallToken::generate(s.pki.pin);
    let expires_at = req
        .expires_in_seconds
        .map(|e| now().saturating_add(e.min(i64::MAX as u64 / 2) as i64));
    let (id, t) = (token.id_hex(), token.clone());
    let desc = req.description.chars().take(200).collect::<String>();
    blocking(move || {
        s.catalog
            .create_token(&id, &t.secret, &desc, expires_at)
            .map_err(internal)
    })
    .await?;
    Ok(Json(CreatedToken {
        id: token.id_hex(),
        token: token.encode(),
        expires_at,
    }))
}

async fn tokens(State(s): State<Arc<Shared>>) -> Result<Json<TokenList>, ApiError> {
    let rows = blocking(move || s.catalog.tokens().map_err(internal)).await?;
    Ok(Json(TokenList { tokens: rows }))
}

async fn revoke_token(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    let id2 = id.clone();
    if !blocking(move || s.catalog.revoke_token(&id2).map_err(internal)).await? {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no token {id}")));
    }
    Ok(Json(Revoked { revoked: id }))
}

async fn reinstall_token(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<CreateToken>,
) -> Result<Json<CreatedReinstallToken>, ApiError> {
    let machine = resolve(&s, name).await?;
    let token = InstallToken::generate(s.pki.pin);
    let expires_at = req
        .expires_in_seconds
        .map(|e| now().saturating_add(e.min(i64::MAX as u64 / 2) as i64));
    let desc = req.description.chars().take(200).collect::<String>();
    let (t, m, s2) = (token.clone(), machine.clone(), s.clone());
    blocking(move || {
        s2.catalog
            .create_reinstall_token(&t.id_hex(), &t.secret, &desc, expires_at, &m)
            .map_err(internal)?
            .map_err(|why| ApiError(StatusCode::CONFLICT, why))
    })
    .await?;
    tracing::info!(%machine, token = %token.id_hex(), "reinstall token created");
    Ok(Json(CreatedReinstallToken {
        id: token.id_hex(),
        token: token.encode(),
        expires_at,
        machine_id: machine.to_string(),
    }))
}

async fn unrevoke(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Unrevoked>, ApiError> {
    let machine = resolve(&s, name).await?;
    let m = machine.clone();
    let was = blocking(move || s.catalog.unrevoke_machine(&m).map_err(internal))
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no machine {machine}")))?;
    if was {
        tracing::info!(%machine, "machine unrevoked: its agent may connect again");
    }
    Ok(Json(Unrevoked {
        machine_id: machine.to_string(),
        unrevoked: was,
    }))
}
