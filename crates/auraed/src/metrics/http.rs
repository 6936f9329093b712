//! A minimal HTTP/1 server for `GET /metrics` (hyper): plain HTTP, so
//! examples listen on loopback; every other path is 404.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// The content type of `prometheus_client`'s text encoder, served to
/// clients that ask for it (Prometheus does, first).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format, for everything else (curl, `promtool check metrics`).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Scrapes rendered at once; more wait (each reads every cell's files).
const MAX_CONCURRENT_SCRAPES: usize = 4;
/// How long a connection may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let scrapes = Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let (metrics, scrapes, shutdown) = (metrics.clone(), scrapes.clone(), shutdown.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (metrics, scrapes) = (metrics.clone(), scrapes.clone());
                async move { Ok::<_, Infallible>(respond(&metrics, &scrapes, req).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("metrics connection: {e}");
                    }
                }
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

fn plain(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = code;
    r
}

async fn respond(
    metrics: &Arc<Metrics>,
    scrapes: &Semaphore,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found; try /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let Ok(_permit) = scrapes.acquire().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    };
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let m = metrics.clone();
    match tokio::task::spawn_blocking(move || m.render()).await {
        Ok(Ok(text)) => {
            let (text, kind) = if openmetrics {
                (text, OPENMETRICS)
            } else {
                (to_prometheus_text(&text), PROMETHEUS_TEXT)
            };
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
            r
        }
        Ok(Err(e)) => {
            tracing::error!("encoding metrics failed: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
        }
        Err(e) => {
            tracing::error!("metrics renderer failed: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "renderer failed\n")
        }
    }
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): a
/// counter family `x` (samples `x_total`) is described as `x_total`, and
/// the `# UNIT` and `# EOF` lines go. Everything else is the same in both.
fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 16 * counters.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match described {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_described_by_their_sample_name() {
        let om = "# HELP a_seconds Help.\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\n\
                  a_seconds_total{cell=\"x\"} 1.5\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_seconds_total Help.\n# TYPE a_seconds_total counter\n\
             a_seconds_total{cell=\"x\"} 1.5\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }
}
