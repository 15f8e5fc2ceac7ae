//! HTTP/2 floods and oversized bodies at the edge gateway, each ended at its limit while a
//! well-behaved client on its own connection keeps getting answers.
//!
//! - A CONTINUATION flood gets GOAWAY(ENHANCE_YOUR_CALM); SETTINGS and PING floods, read
//!   or not, are closed as `control_frame_flood`; meshd's memory does not grow.
//! - Request bodies over `gateway.max_request_body` get 413 / RESOURCE_EXHAUSTED, declared
//!   or streamed.

mod common;

use bytes::Bytes;
use common::edge_gateway::{
    assert_logged_once, frame, gateway_tls, grpc_call, h2_connect, rss_kib, Gateway, PREFACE, ZONES,
};
use common::meshd::wait_until;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// Story: a client floods CONTINUATION frames after a HEADERS frame that never ends; meshd
// ends that connection with GOAWAY(ENHANCE_YOUR_CALM) long before it has read a megabyte.
// Another floods SETTINGS frames without reading the ACKs, a third floods PING and
// SETTINGS frames and reads every ACK: both are closed after 200 control frames with no
// request between them, counted as `control_frame_flood`. None grows meshd's memory, and
// a normal client is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_and_settings_floods_end_at_their_limits() {
    let g = Gateway::start("{header_timeout: 4s}");
    let d = g.dir.path();
    let rss_before = rss_kib(g.gw.proc.pid());
    let connect = || async {
        let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        gateway_tls(d, b"h2").connect(name, tcp).await.unwrap()
    };

    // CONTINUATION flood: HEADERS without END_HEADERS, then 16 KB CONTINUATIONs.
    let mut s = connect().await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    // :method POST, :scheme https, :path / (static table), then a literal header.
    hello.extend(frame(1, 0, 1, &[0x83, 0x87, 0x84, 0x00, 1, b'a', 1, b'b']));
    s.write_all(&hello).await.unwrap();
    let mut block = Vec::new();
    while block.len() < 16_000 {
        block.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 1, b'b']);
    }
    let continuation = frame(9, 0, 1, &block);
    let mut sent = 0usize;
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        while sent < 64 << 20 {
            if wr.write_all(&continuation).await.is_err() {
                break;
            }
            sent += continuation.len();
        }
        sent
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the flood was cut off")
        .unwrap();
    assert!(sent < 8 << 20, "meshd read {sent} bytes of CONTINUATION");
    // A GOAWAY frame (type 7) with ENHANCE_YOUR_CALM (0xb) is in what meshd wrote.
    let goaway = got
        .windows(9 + 8)
        .any(|w| w[3] == 7 && w[9 + 4..9 + 8] == [0, 0, 0, 0xb]);
    assert!(
        goaway,
        "no GOAWAY(ENHANCE_YOUR_CALM) in {} bytes",
        got.len()
    );

    // SETTINGS flood without reading.
    let mut s = connect().await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    let settings = frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]).repeat(1000);
    let start = Instant::now();
    let mut written = 0usize;
    let stalled = loop {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&settings)).await {
            Ok(Ok(())) => written += settings.len(),
            Ok(Err(_)) => break false,
            Err(_) => break true,
        }
        if written > 256 << 20 {
            panic!("meshd read 256 MB of SETTINGS frames");
        }
    };
    println!(
        "SETTINGS flood: meshd stopped reading after {written} bytes (stalled: {stalled}) in {:?}",
        start.elapsed()
    );
    let mut tail = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut tail)).await;
    assert!(
        wait_until(Duration::from_secs(10), || g.limit("control_frame_flood")
            >= 1.0),
        "the SETTINGS flood was not closed as a control_frame_flood"
    );

    // PING and SETTINGS flood from a client that reads every ACK: closed after the
    // budget of 200 control frames without a request.
    let s = connect().await;
    let (mut rd, mut wr) = tokio::io::split(s);
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    wr.write_all(&hello).await.unwrap();
    let flood = [
        frame(6, 0, 0, &[1; 8]),
        frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]),
    ]
    .concat();
    let mut sent_frames = 0usize;
    while sent_frames < 1_000_000 {
        if wr.write_all(&flood).await.is_err() || wr.flush().await.is_err() {
            break;
        }
        sent_frames += 2;
    }
    let acked = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .expect("meshd kept the flooding connection open")
        .unwrap();
    println!(
        "PING/SETTINGS flood: closed after {sent_frames} frames sent, {acked} bytes of ACKs read"
    );
    assert!(
        sent_frames < 1_000_000,
        "meshd answered a million control frames"
    );
    assert!(
        wait_until(Duration::from_secs(10), || g.limit("control_frame_flood")
            >= 2.0),
        "the flood was not counted as control_frame_flood"
    );
    assert_logged_once(&g.gw, "SETTINGS/PING frames without a request");

    let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = gateway_tls(d, b"h2").connect(name, tcp).await.unwrap();
    let mut send = h2_connect(tls).await;
    assert_eq!(grpc_call(&mut send, ZONES).await.unwrap(), "0");
    let rss_after = rss_kib(g.gw.proc.pid());
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
}

/// A gRPC call of `path` carrying one message of `len` bytes, sent in 16 KB data frames,
/// with or without a content-length; its grpc-status and grpc-message.
async fn grpc_call_with_body(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    len: usize,
    declare: bool,
) -> (String, String) {
    let mut ready = send.clone().ready().await.unwrap();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if declare {
        req = req.header("content-length", len + 5);
    }
    let (resp, mut body) = ready.send_request(req.body(()).unwrap(), false).unwrap();
    let mut message = vec![0u8; 5];
    message[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    message.resize(len + 5, b'x');
    let sender = tokio::spawn(async move {
        for chunk in message.chunks(16 << 10) {
            body.reserve_capacity(chunk.len());
            let _ = std::future::poll_fn(|cx| body.poll_capacity(cx)).await;
            if body
                .send_data(Bytes::copy_from_slice(chunk), false)
                .is_err()
            {
                return;
            }
        }
        let _ = body.send_data(Bytes::new(), true);
    });
    let resp = resp.await.unwrap();
    let (parts, mut body) = resp.into_parts();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    sender.abort();
    let get = |name: &str| {
        (trailers.get(name).or_else(|| parts.headers.get(name)))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

/// curl's HTTP status for a POST of `len` bytes to the gateway: over HTTP/1.1 with a
/// content-length, or (`streamed`) over HTTP/2 from a pipe, with no length declared.
fn curl_post(port: u16, len: usize, streamed: bool) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sSk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        "@-",
    ])
    .arg(format!(
        "https://localhost:{port}/payment.v1.PaymentService/ListPricingZones"
    ))
    .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
    .arg(if streamed { "--http2" } else { "--http1.1" })
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if !streamed {
        cmd.args(["-H", &format!("content-length: {len}")]);
    }
    let mut child = cmd
        .spawn()
        .expect("curl (Debian package curl) must be installed");
    let mut stdin = child.stdin.take().unwrap();
    let body = vec![b'x'; len];
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    if code != "413" && code != "200" {
        println!("curl: {code}: {}", String::from_utf8_lossy(&out.stderr));
    }
    code
}

// Story: the gateway allows 64 KiB of request body. A gRPC client sending a 1 MB message
// gets RESOURCE_EXHAUSTED naming the limit, whether its content-length said so (refused
// before the app is called) or not (cut off on the way); curl posting 256 KiB gets 413
// both ways (HTTP/1.1 with a content-length, HTTP/2 streamed from a pipe); calls under the limit go through, each refusal is counted as
// `too_large`, and the connection that was refused still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_request_body_are_refused_with_413_or_resource_exhausted() {
    let g = Gateway::start("{}\n  max_request_body: 64KiB");
    let d = g.dir.path();
    let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = gateway_tls(d, b"h2").connect(name, tcp).await.unwrap();
    let mut send = h2_connect(tls).await;

    for declare in [true, false] {
        let (status, message) = grpc_call_with_body(&mut send, ZONES, 1 << 20, declare).await;
        assert_eq!(
            status, "8",
            "1 MB, content-length declared: {declare}: {message}"
        );
        assert!(
            message.contains("max_request_body of 65536 bytes"),
            "{message}"
        );
    }
    // Under the limit the body reaches the app: 1 KB of 'x' is not a valid message, so
    // the app's own answer (not the gateway's 8) proves it got through.
    let (status, message) = grpc_call_with_body(&mut send, ZONES, 1 << 10, false).await;
    println!("1 KB of 'x' to the app: grpc-status {status} ({message})");
    assert!(
        !message.contains("max_request_body"),
        "1 KB was refused: {message}"
    );
    assert_eq!(grpc_call(&mut send, ZONES).await.unwrap(), "0");

    // 256 KiB: over the limit, and under the 1 MiB the gateway reads of a refused
    // body so that curl, still sending, gets the answer rather than a reset.
    assert_eq!(curl_post(g.port, 256 << 10, false), "413");
    assert_eq!(curl_post(g.port, 256 << 10, true), "413");
    let small = curl_post(g.port, 1 << 10, true);
    println!("curl, 1 KB streamed: HTTP {small}");
    assert_ne!(small, "413", "a 1 KB POST was refused");
    let too_large = g.gw.metric(
        "gateway_requests_failed_total",
        &["service=\"payments\"", "reason=\"too_large\""],
    );
    assert_eq!(too_large, 4.0, "too_large refusals counted");
    assert_logged_once(&g.gw, "over gateway.max_request_body was refused");
}
