//! The plain-HTTP admin endpoint every service exposes (bind it to loopback or a pod IP):
//! `GET /metrics` (OpenMetrics text), `GET /status` (JSON, where the component has one),
//! `GET /healthz/ready` (200, or 503 naming the pending
//! readiness blockers) and `GET /healthz/live`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use isthmus_core::lifecycle::{DrainWatch, Readiness};
use tokio::net::TcpListener;

/// Produces the metrics text on each scrape.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// The scrape function of a shared registry.
pub fn registry_text(
    registry: Arc<std::sync::Mutex<isthmus_core::telemetry::MetricsRegistry>>,
) -> MetricsText {
    Arc::new(move || {
        registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .encode_text()
            .unwrap_or_default()
    })
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn route(
    request: &Request<Incoming>,
    metrics: &MetricsText,
    readiness: &Readiness,
    status: Option<&MetricsText>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(),
        ),
        "/healthz/ready" => {
            let pending = readiness.pending();
            if pending.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", pending.join(", ")),
                )
            }
        }
        "/status" if status.is_some() => respond(
            StatusCode::OK,
            "application/json",
            status.map(|s| s()).unwrap_or_default(),
        ),
        "/healthz/live" => respond(StatusCode::OK, "text/plain", "live\n".into()),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin endpoint on `listener` until `drain` signals.
pub async fn serve(
    listener: TcpListener,
    metrics: MetricsText,
    readiness: Readiness,
    drain: DrainWatch,
) {
    serve_with_status(listener, metrics, readiness, None, drain).await;
}

/// [`serve`], plus `GET /status` answering the JSON document `status` produces.
pub async fn serve_with_status(
    listener: TcpListener,
    metrics: MetricsText,
    readiness: Readiness,
    status: Option<MetricsText>,
    drain: DrainWatch,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (metrics, readiness, status) = (metrics.clone(), readiness.clone(), status.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = route(&request, &metrics, &readiness, status.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!(error = %e, "admin HTTP connection ended");
            }
        });
    }
}
