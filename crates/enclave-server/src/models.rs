//! `GET /v1/models` and `GET /v1/models/{id}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use enclave_gateway::Principal;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::state::AppState;

fn model_object(state: &AppState) -> Value {
    let mut model = json!({
        "id": state.config.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "enclave",
    });
    if let (Some(engine), Some(map)) = (state.engine(), model.as_object_mut()) {
        map.insert(
            "max_model_len".into(),
            json!(engine.engine().max_model_len()),
        );
    }
    model
}

/// The models the caller's tenant and key may use.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
) -> Json<Value> {
    let data: Vec<Value> = if state.visible_to(&caller) {
        vec![model_object(&state)]
    } else {
        Vec::new()
    };
    Json(json!({"object": "list", "data": data}))
}

pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id != state.config.served_model_name || !state.visible_to(&caller) {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(model_object(&state)))
}
