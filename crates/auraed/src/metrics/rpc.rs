//! gRPC server metrics, named as go-grpc-prometheus names them (so its
//! dashboards work): `grpc_server_started_total`,
//! `grpc_server_handled_total` (by code), `grpc_server_handling_seconds`
//! (a histogram, until the last message of a stream), and
//! `grpc_server_open_calls` (calls and streams open now), each labelled
//! `grpc_service`, `grpc_method`, `grpc_type`.
//!
//! A tower layer around the whole gRPC server: the code is the
//! `grpc-status` of a trailers-only response's headers, or of the
//! response body's trailers; a call whose response is dropped before it
//! ends (the client went away) counts as `Canceled`. Methods come from the
//! served descriptor sets, so a path no service has is labelled
//! `unknown` (clients cannot grow the label space).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body as HttpBody, Frame};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use prost::Message;
use tonic::{body::Body, Code, Status};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_type: String,
    grpc_code: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn new_histogram() -> Histogram {
    // 0.5 ms .. ~16 s; longer streams land in +Inf.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The instruments (cheap to clone: shared inside).
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    seconds: HistogramFamily,
    open: Family<MethodLabels, Gauge>,
    /// "/pkg.Service/Method" → labels, from the served descriptor sets.
    methods: Arc<HashMap<String, MethodLabels>>,
}

impl RpcMetrics {
    /// Knows the methods of the encoded `FileDescriptorSet`s (those the
    /// server serves; reflection uses the same sets).
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let Ok(fds) = prost_types::FileDescriptorSet::decode(*set) else {
                tracing::warn!(
                    "metrics: a descriptor set does not decode; its methods count as unknown"
                );
                continue;
            };
            for file in fds.file {
                for svc in &file.service {
                    let full = format!("{}.{}", file.package(), svc.name());
                    for m in &svc.method {
                        let kind = match (m.client_streaming(), m.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        methods.insert(
                            format!("/{full}/{}", m.name()),
                            MethodLabels {
                                grpc_service: full.clone(),
                                grpc_method: m.name().to_owned(),
                                grpc_type: kind.to_owned(),
                            },
                        );
                    }
                }
            }
        }
        Self {
            started: Family::default(),
            handled: Family::default(),
            seconds: HistogramFamily::new_with_constructor(new_histogram),
            open: Family::default(),
            methods: Arc::new(methods),
        }
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            self.started.clone(),
        );
        r.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            self.handled.clone(),
        );
        r.register(
            "grpc_server_handling_seconds",
            "Time from the request until the end of the response (of the whole stream), in seconds.",
            self.seconds.clone(),
        );
        r.register(
            "grpc_server_open_calls",
            "RPCs in progress now (open streams included).",
            self.open.clone(),
        );
    }

    fn labels(&self, path: &str) -> MethodLabels {
        self.methods
            .get(path)
            .cloned()
            .unwrap_or_else(|| MethodLabels {
                grpc_service: "unknown".into(),
                grpc_method: "unknown".into(),
                grpc_type: "unknown".into(),
            })
    }
}

/// go-grpc-prometheus's code names (`codes.Code.String()`).
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// One call: counted open from the request until it is finished (with a
/// code) or dropped (Canceled).
struct Call {
    metrics: RpcMetrics,
    labels: MethodLabels,
    started: Instant,
    done: bool,
}

impl Call {
    fn start(metrics: &RpcMetrics, path: &str) -> Self {
        let labels = metrics.labels(path);
        metrics.started.get_or_create(&labels).inc();
        metrics.open.get_or_create(&labels).inc();
        Self {
            metrics: metrics.clone(),
            labels,
            started: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.metrics;
        let l = self.labels.clone();
        m.open.get_or_create(&l).dec();
        m.seconds
            .get_or_create(&l)
            .observe(self.started.elapsed().as_secs_f64());
        m.handled
            .get_or_create(&HandledLabels {
                grpc_service: l.grpc_service,
                grpc_method: l.grpc_method,
                grpc_type: l.grpc_type,
                grpc_code: code_name(code).to_owned(),
            })
            .inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl<S> tower::Layer<S> for RpcMetrics {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut call = Call::start(&self.metrics, req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = match fut.await {
                Ok(r) => r,
                Err(e) => {
                    call.finish(Code::Unknown);
                    return Err(e);
                }
            };
            // Trailers-only: the status is in the headers, the body empty.
            if let Some(s) = Status::from_header_map(response.headers()) {
                call.finish(s.code());
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(Observed { body, call }),
            ))
        })
    }
}

/// A response body that finishes its call at the trailers (or the end).
struct Observed {
    body: Body,
    call: Call,
}

impl HttpBody for Observed {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let code = Status::from_header_map(t).map_or(Code::Unknown, |s| s.code());
                    self.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(s))) => {
                let code = s.code();
                self.call.finish(code);
            }
            // Ended without trailers: no status was sent.
            Poll::Ready(None) => self.call.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_descriptor_sets() {
        let m = RpcMetrics::new(&[aurae_proto::FILE_DESCRIPTOR_SET]);
        let l = m.labels("/aurae.cells.v0.CellService/Allocate");
        assert_eq!(
            (
                l.grpc_service.as_str(),
                l.grpc_method.as_str(),
                l.grpc_type.as_str()
            ),
            ("aurae.cells.v0.CellService", "Allocate", "unary")
        );
        let l = m.labels("/aurae.observe.v0.ObserveService/GetSubProcessStream");
        assert_eq!(l.grpc_type, "server_stream");
        assert_eq!(
            m.labels("/aurae.cells.v0.CellService/Nope").grpc_method,
            "unknown"
        );
        assert_eq!(m.labels("/x").grpc_service, "unknown");
    }

    #[test]
    fn a_dropped_call_is_canceled_and_closed() {
        let m = RpcMetrics::new(&[aurae_proto::FILE_DESCRIPTOR_SET]);
        let path = "/aurae.cells.v0.CellService/List";
        let mut c = Call::start(&m, path);
        c.finish(Code::NotFound);
        c.finish(Code::Ok); // only the first counts
        drop(c);
        drop(Call::start(&m, path));
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("encode");
        let lbl =
            r#"grpc_service="aurae.cells.v0.CellService",grpc_method="List",grpc_type="unary""#;
        for want in [
            format!("grpc_server_started_total{{{lbl}}} 2"),
            format!("grpc_server_handled_total{{{lbl},grpc_code=\"NotFound\"}} 1"),
            format!("grpc_server_handled_total{{{lbl},grpc_code=\"Canceled\"}} 1"),
            format!("grpc_server_open_calls{{{lbl}}} 0"),
            format!("grpc_server_handling_seconds_count{{{lbl}}} 2"),
        ] {
            assert!(out.contains(&want), "{want} not in\n{out}");
        }
    }
}
