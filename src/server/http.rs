//! HTTP plumbing: the response body type (whole or server-sent events), reading a JSON
//! body under a size limit, and building responses.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::error::ApiError;

/// A response body: one buffer, or a stream of SSE frames fed by a task.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            // The task ends the stream by dropping its sender; a client that goes away
            // drops this receiver, and the task's next send fails (which cancels).
            ResponseBody::Stream(rx) => rx.poll_recv(cx).map(|item| item.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Full(bytes) => {
                hyper::body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

pub type HttpResponse = Response<ResponseBody>;

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub fn text_response(status: StatusCode, content_type: &'static str, text: String) -> HttpResponse {
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(text))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn error_response(error: &ApiError) -> HttpResponse {
    let mut response = json_response(error.status, &error.to_json());
    if error.status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

/// A streaming `text/event-stream` response and the sender that feeds it.
pub fn sse_response() -> (HttpResponse, mpsc::Sender<Bytes>) {
    // A small buffer: a slow client slows its own stream, never the engine.
    let (tx, rx) = mpsc::channel(64);
    let mut response = Response::new(ResponseBody::Stream(rx));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    (response, tx)
}

/// One SSE event carrying `data` (JSON has no raw newlines, so one `data:` line).
pub fn sse_event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Reads the whole body as JSON, refusing more than `limit` bytes while reading.
pub async fn read_json(body: Incoming, limit: usize) -> Result<serde_json::Value, ApiError> {
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than {limit} bytes"),
            ))
        }
        Err(e) => return Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    };
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}
