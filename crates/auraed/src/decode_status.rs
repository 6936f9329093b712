//! A request body the daemon cannot decode is the client's fault: tonic
//! answers it with INTERNAL ("failed to decode Protobuf message: …",
//! tonic-prost's choice); this layer turns that into INVALID_ARGUMENT for
//! every service, keeping the message.
//!
//! Where tonic reports it: for unary and server-streaming methods the
//! request is decoded before the handler runs, and the failure is a
//! trailers-only response (grpc-status in the headers); for methods with a
//! streaming request (reflection) it arrives later, in the trailers of the
//! response body. Both places are rewritten.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};
use tonic::{body::Body, Code, Status};

/// Messages of statuses that tonic answers with INTERNAL although the
/// request body was at fault.
const CLIENT_FAULTS: [&str; 3] = [
    // prost::DecodeError's Display (tonic-prost maps it to INTERNAL).
    "failed to decode Protobuf message",
    // The body ended inside a message frame.
    "Unexpected EOF decoding stream",
    // A unary call whose body holds no message at all.
    "Missing request message",
];

/// Rewrites the grpc-status in `headers` if it is a decode failure.
fn rewrite(headers: &mut HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() != Code::Internal
        || !CLIENT_FAULTS
            .iter()
            .any(|m| status.message().starts_with(m))
    {
        return;
    }
    let fixed = Status::invalid_argument(status.message().to_owned());
    // Only fails for a message that cannot be a header value, which one
    // that was parsed from a header cannot be.
    let _ = fixed.add_header(headers);
}

#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeStatusLayer;

impl<S> tower::Layer<S> for DecodeStatusLayer {
    type Service = DecodeStatus<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DecodeStatus(inner)
    }
}

#[derive(Debug, Clone)]
pub struct DecodeStatus<S>(S);

impl<S, R> tower::Service<R> for DecodeStatus<S>
where
    S: tower::Service<R, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let (mut parts, body) = response.into_parts();
            rewrite(&mut parts.headers);
            Ok(http::Response::from_parts(
                parts,
                Body::new(TrailerFix(body)),
            ))
        })
    }
}

/// A response body whose trailers get the same rewrite.
struct TrailerFix(Body);

impl HttpBody for TrailerFix {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.0).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    rewrite(trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(status: &Status) -> HeaderMap {
        let mut h = HeaderMap::new();
        status.add_header(&mut h).unwrap();
        h
    }

    #[test]
    fn decode_failures_become_invalid_argument() {
        for m in [
            "failed to decode Protobuf message: invalid wire type value: 7",
            "Unexpected EOF decoding stream.",
            "Missing request message.",
        ] {
            let mut h = headers_of(&Status::internal(m));
            rewrite(&mut h);
            let s = Status::from_header_map(&h).unwrap();
            assert_eq!(s.code(), Code::InvalidArgument, "{m}");
            assert_eq!(s.message(), m);
        }
    }

    #[test]
    fn other_statuses_are_left_alone() {
        for s in [
            Status::internal("cgroup write failed: EBUSY"),
            Status::not_found("failed to decode Protobuf message"),
            Status::ok(""),
        ] {
            let mut h = headers_of(&s);
            let before = h.clone();
            rewrite(&mut h);
            assert_eq!(h, before);
        }
        let mut empty = HeaderMap::new();
        rewrite(&mut empty);
        assert!(empty.is_empty());
    }
}
