//! A server stream's answer to a JSON client, written as its messages arrive: a JSON
//! array (`[`, the messages separated by `,`, `]`), or newline-delimited JSON, one
//! message per line, when the client's `Accept` asks for `application/x-ndjson`.
//!
//! Flow: the app's stream is read up to its first message. If it ends before one, the
//! answer is as for a unary call: `[]` for OK, else the HTTP status of its gRPC status
//! with `{"code", "message", "details"}`. Once a message is there, the status is 200 and
//! sent: the gateway takes the app's stream out of the response body (which stays
//! metered), and a task writes each message as it is read, then the app's trailers.
//!
//! An error after messages started cannot change the status any more. As grpc-gateway
//! does, it is written as one more element, `{"error": {"code", "message", "details"}}`:
//! the last element of the array (then `]`) or the last line of NDJSON. A stream that
//! breaks, or a message that does not decode, ends the same way (code 14 or 13).

use super::{grpc_status, json_response, rules, Call, TranscodeError, Transcoder};
use crate::proxy::{H2Body, ProxyBody};
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either};
use prost_reflect::MethodDescriptor;
use serde_json::json;
use std::sync::Arc;

/// How a server stream's messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON array, `application/json`.
    Array,
    /// One message per line, `application/x-ndjson`.
    Lines,
}

/// NDJSON when the client's `Accept` names `application/x-ndjson`, else an array.
pub fn framing(accept: Option<&HeaderValue>) -> Framing {
    let asks = accept.is_some_and(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .split(',')
            .any(|t| t.split(';').next().unwrap_or("").trim() == "application/x-ndjson")
    });
    if asks {
        Framing::Lines
    } else {
        Framing::Array
    }
}

impl Framing {
    fn content_type(self) -> &'static str {
        match self {
            Framing::Array => "application/json",
            Framing::Lines => "application/x-ndjson",
        }
    }

    /// What goes before element `index` (0 is the first).
    fn before(self, index: usize) -> &'static [u8] {
        match (self, index) {
            (Framing::Array, 0) => b"[",
            (Framing::Array, _) => b",",
            (Framing::Lines, _) => b"",
        }
    }

    /// What goes after each element.
    fn after(self) -> &'static [u8] {
        match self {
            Framing::Array => b"",
            Framing::Lines => b"\n",
        }
    }

    /// What ends the stream after `count` elements.
    fn end(self, count: usize) -> &'static [u8] {
        match (self, count) {
            (Framing::Array, 0) => b"[]",
            (Framing::Array, _) => b"]",
            (Framing::Lines, _) => b"",
        }
    }
}

/// gRPC messages out of a stream of data frames, which may split or join them.
#[derive(Debug, Default)]
pub struct Deframer {
    /// Bytes read and not yet a whole message.
    buf: BytesMut,
}

impl Deframer {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, if one is buffered.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, rules::FrameError> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        if header[0] != 0 {
            return Err(rules::FrameError::Compressed);
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes of a message cut short are left.
    pub fn leftover(&self) -> usize {
        self.buf.len()
    }
}

/// What reading the app's stream gave next.
enum Next {
    Message(Bytes),
    /// The end, with the trailers (none if the stream ended without them).
    End(Option<HeaderMap>),
    /// The stream broke or is not gRPC.
    Broken(String),
}

/// The app's stream, read message by message.
struct Reader<B> {
    body: B,
    deframer: Deframer,
}

impl<B> Reader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    async fn next(&mut self) -> Next {
        loop {
            match self.deframer.next_message() {
                Ok(Some(m)) => return Next::Message(m),
                Ok(None) => {}
                Err(e) => return Next::Broken(e.to_string()),
            }
            match self.body.frame().await {
                None if self.deframer.leftover() > 0 => {
                    return Next::Broken("the stream ends inside a message".into())
                }
                None => return Next::End(None),
                Some(Err(e)) => return Next::Broken(e.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.deframer.push(&data),
                    Err(frame) => return Next::End(frame.into_trailers().ok()),
                },
            }
        }
    }
}

impl Transcoder {
    /// A server stream's answer (see the module docs).
    pub(super) async fn stream_answer(
        &self,
        call: &Call,
        resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, TranscodeError> {
        let (parts, body) = resp.into_parts();
        let trailers_only = grpc_status(&parts.headers);
        let Either::Left(mut metered) = body else {
            // Answered by the gateway's outbound itself: a status in the headers.
            let code = trailers_only.ok_or(TranscodeError::NotGrpc(parts.status.as_u16()))?;
            return Ok(self.grpc_error(code, &HeaderMap::new(), &parts.headers));
        };
        let framing = call.framing;
        let mut reader = Reader {
            body: &mut metered,
            deframer: Deframer::default(),
        };
        let first = match reader.next().await {
            Next::Message(m) => m,
            Next::End(trailers) => {
                let trailers = trailers.unwrap_or_default();
                let code = grpc_status(&trailers)
                    .or(trailers_only)
                    .ok_or(TranscodeError::NotGrpc(parts.status.as_u16()))?;
                if code != 0 {
                    return Ok(self.grpc_error(code, &trailers, &parts.headers));
                }
                let mut resp = json_response(StatusCode::OK, Bytes::from_static(framing.end(0)));
                set_content_type(&mut resp, framing);
                return Ok(resp);
            }
            Next::Broken(reason) => {
                return Err(TranscodeError::ResponseBody(reason.into()));
            }
        };
        let first = self.element(&call.method, &first)?;
        let deframer = std::mem::take(&mut reader.deframer);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let upstream = metered.replace_inner(H2Body::channel(rx));
        let mut chunk = framing.before(0).to_vec();
        chunk.extend_from_slice(&first);
        chunk.extend_from_slice(framing.after());
        // Room for 16 frames: this one goes in before anyone reads.
        let _ = tx.try_send(Frame::data(Bytes::from(chunk)));
        let writer = StreamWriter {
            transcoder: self.shared(),
            method: call.method.clone(),
            framing,
            tx,
        };
        tokio::spawn(writer.run(Reader {
            body: upstream,
            deframer,
        }));
        let mut resp = Response::from_parts(parts, Either::Left(metered));
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.remove(http::header::CONTENT_LENGTH);
        for name in GRPC_HEADERS {
            h.remove(name);
        }
        set_content_type(&mut resp, framing);
        Ok(resp)
    }

    /// One message of the stream as JSON.
    fn element(&self, method: &MethodDescriptor, bytes: &[u8]) -> Result<Bytes, TranscodeError> {
        let message = self.decode(method, bytes)?;
        self.to_json_bytes(&message)
    }

    /// What the writer task needs of the transcoder: the options and the protos now.
    fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            write: self.write.clone(),
            compiled: self.compiled.load_full(),
        })
    }
}

/// Headers of a gRPC answer that mean nothing to a JSON client.
const GRPC_HEADERS: [&str; 2] = ["grpc-encoding", "grpc-accept-encoding"];

fn set_content_type(resp: &mut Response<ProxyBody>, framing: Framing) {
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(framing.content_type()),
    );
}

/// The writer task's share of the transcoder.
struct Shared {
    write: prost_reflect::SerializeOptions,
    compiled: Arc<super::Compiled>,
}

/// Writes the rest of a stream to the client (see the module docs).
struct StreamWriter {
    transcoder: Arc<Shared>,
    method: MethodDescriptor,
    framing: Framing,
    tx: tokio::sync::mpsc::Sender<Frame<Bytes>>,
}

impl StreamWriter {
    async fn run(self, mut reader: Reader<H2Body>) {
        let mut count = 1;
        let (error, trailers) = loop {
            match reader.next().await {
                Next::Message(bytes) => match self.element(&bytes) {
                    Ok(json) => {
                        if !self.send_element(count, &json).await {
                            return; // The client went away: the app's stream is reset.
                        }
                        count += 1;
                    }
                    Err(e) => break (Some(json!({"code": 13, "message": e.to_string()})), None),
                },
                Next::End(Some(t)) => {
                    let code = grpc_status(&t).unwrap_or(2);
                    let error = (code != 0).then(|| self.error_value(code, &t));
                    break (error, Some(t));
                }
                Next::End(None) => {
                    let message = "the app ended the stream without a gRPC status";
                    break (Some(json!({"code": 2, "message": message})), None);
                }
                Next::Broken(reason) => break (Some(json!({"code": 14, "message": reason})), None),
            }
        };
        if let Some(error) = error {
            let json = json!({ "error": error }).to_string();
            if !self.send_element(count, json.as_bytes()).await {
                return;
            }
            count += 1;
        }
        let end = self.framing.end(count);
        if !end.is_empty() {
            let _ = self.tx.send(Frame::data(Bytes::from_static(end))).await;
        }
        if let Some(t) = trailers {
            // The app's status, for the gateway's records (a JSON client ignores them).
            let _ = self.tx.send(Frame::trailers(t)).await;
        }
    }

    fn element(&self, bytes: &[u8]) -> Result<Bytes, TranscodeError> {
        let output = self.method.output();
        let message =
            prost_reflect::DynamicMessage::decode(output.clone(), bytes).map_err(|source| {
                TranscodeError::ResponseMessage {
                    message: output.full_name().into(),
                    source,
                }
            })?;
        let json = message
            .serialize_with_options(serde_json::value::Serializer, &self.transcoder.write)
            .map_err(TranscodeError::ResponseJson)?;
        Ok(Bytes::from(json.to_string()))
    }

    fn error_value(&self, code: u32, trailers: &HeaderMap) -> serde_json::Value {
        super::status::error_value(
            code,
            trailers,
            &HeaderMap::new(),
            &self.transcoder.compiled.pool,
            &self.transcoder.write,
        )
    }

    /// Sends element `index`; false when the client is gone.
    async fn send_element(&self, index: usize, json: &[u8]) -> bool {
        let mut chunk = Vec::with_capacity(json.len() + 2);
        chunk.extend_from_slice(self.framing.before(index));
        chunk.extend_from_slice(json);
        chunk.extend_from_slice(self.framing.after());
        self.tx.send(Frame::data(Bytes::from(chunk))).await.is_ok()
    }
}

#[cfg(test)]
impl Transcoder {
    /// What the writer task sends after the first element, for `frames` from the app:
    /// the text and the trailers.
    pub(super) async fn write_rest(
        &self,
        call: &Call,
        framing: Framing,
        frames: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
    ) -> (String, Option<HeaderMap>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let writer = StreamWriter {
            transcoder: self.shared(),
            method: call.method.clone(),
            framing,
            tx,
        };
        writer
            .run(Reader {
                body: H2Body::channel(frames),
                deframer: Deframer::default(),
            })
            .await;
        let (mut text, mut trailers) = (String::new(), None);
        while let Some(frame) = rx.recv().await {
            match frame.into_data() {
                Ok(d) => text.push_str(&String::from_utf8_lossy(&d)),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (text, trailers)
    }
}
