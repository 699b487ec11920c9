//! The topology page: a live picture of the mesh served on the admin listener.
//!
//! [`page_routes`] serves the page and its assets (public: they carry no data); [`routes`]
//! serves the data and its live updates behind the admin token check like every other route.

use axum::Router;

use super::AppState;

/// The page and its assets, outside the token check.
pub(super) fn page_routes() -> Router<AppState> {
    Router::new()
}

/// The page's data and live updates, behind the token check.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
}
