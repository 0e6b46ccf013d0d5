//! `POST /v1/config/reload`: reads the agent's config file again and applies the
//! difference (`crate::reload`). The answer is the reload's report: 200 when everything
//! that can change live was applied, 400 when the file is invalid or the plan failed its
//! checks (nothing changed), 500 when a step failed while applying (the report lists what
//! was applied and what was not). Every error answer carries the whole report besides
//! `error`.

use axum::extract::State as With;
use hyper::StatusCode;

use super::{ApiError, Reply, State, json};
use crate::reload::Outcome;

/// `POST /v1/config/reload`.
pub async fn reload(With(_state): With<State>) -> Reply {
    let Some(reloader) = crate::reload::get() else {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: "this agent has no config file to reload".to_owned(),
        });
    };
    let report = reloader.reload("api").await;
    let status = match report.result {
        Outcome::Ok => StatusCode::OK,
        Outcome::Failed => StatusCode::BAD_REQUEST,
        Outcome::Partial => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json(status, &report)
}
