//! The scripted tour of `meshd demo`: six steps against the running topology, each
//! printed as one row of a table (step | PASS/FAIL | detail) as soon as it ends, then
//! where to look next (admin URLs, ready-to-paste `curl` and `grpcurl` commands).
//!
//! A step never panics and never stops the tour: a failure prints why and the next step
//! runs. [`run`] returns true when every step passed.

use crate::demo::{http, say, spiffe_id, Topology, DOCUMENT_AUDIENCE, INTRUDER};
use crate::dev_ca::DevCa;
use crate::pb::payment::payment_service_client::PaymentServiceClient;
use crate::pb::payment::CreatePaymentRequest;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Calls made during the rotation step (at least; more if the new serial is slow).
const ROTATION_CALLS: usize = 200;
/// How long the rotation step waits for the new serial.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Width of the step column.
const STEP_WIDTH: usize = 24;

/// Why a step could not even make its call; the step fails with this as its detail.
#[derive(Debug, thiserror::Error)]
pub enum TourError {
    /// The sidecar's outbound listener does not make a valid endpoint URL.
    #[error(transparent)]
    Endpoint(tonic::transport::Error),
    /// The payment sidecar's admin server did not answer `/identity`.
    #[error("no answer from http://{0}/identity")]
    NoAnswer(std::net::SocketAddr),
    /// `/identity` did not answer with JSON.
    #[error("/identity answered {code} with no JSON: {error}")]
    NotJson { code: u16, error: serde_json::Error },
    /// `/identity` answered JSON without a `serial`; `body` is what it said, trimmed.
    #[error("/identity answered {code} without a serial: {body}")]
    NoSerial { code: u16, body: String },
}

/// One finished step.
#[derive(Debug)]
pub struct Step {
    pub name: &'static str,
    pub passed: bool,
    /// The first line goes in the table row, the rest below it.
    pub detail: Vec<String>,
}

impl Step {
    pub fn new(name: &'static str, passed: bool, detail: Vec<String>) -> Step {
        Step {
            name,
            passed,
            detail,
        }
    }
}

/// The table rows of one step.
pub fn format_step(number: usize, step: &Step) -> String {
    let result = if step.passed { "PASS" } else { "FAIL" };
    let indent = " ".repeat(4 + STEP_WIDTH + 1 + 6 + 2);
    let mut lines = step.detail.iter();
    let mut out = format!(
        "{number:>2}  {:<STEP_WIDTH$} {result:<6}  {}\n",
        step.name,
        lines.next().map(String::as_str).unwrap_or("")
    );
    for l in lines {
        out += &format!("{indent}{l}\n");
    }
    out
}

/// Prints what is running where (before the tour).
pub fn print_summary(t: &Topology) {
    say!(
        "meshd demo: the reference topology on loopback (trust domain jia.app, SVID TTL {})",
        humantime::format_duration(t.ttl)
    );
    say!(
        "  {:<20} SPIFFE Workload API on {}/<service>.sock",
        "dev CA",
        t.dir.display()
    );
    say!(
        "  {:<20} {} (plaintext, loopback only; contact/family/document apps likewise)",
        "payment app",
        t.payment_app
    );
    for s in &t.sidecars {
        let label = format!("{} sidecar", s.name);
        let mut lines = s.listeners.iter();
        say!(
            "  {label:<20} {}",
            lines.next().map(String::as_str).unwrap_or("")
        );
        for l in lines {
            say!("  {:<20} {l}", "");
        }
        say!("  {:<20} admin    http://{}", "", s.admin);
    }
    for n in &t.notes {
        say!("  note: {n}");
    }
    say!(
        "demo pids: {}",
        t.sidecars
            .iter()
            .map(|s| s.pid.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    say!("demo dir: {}", t.dir.display());
    say!("sidecar logs: {}/logs/<name>-sidecar.log", t.dir.display());
    say!();
}

/// Runs every step, printing each row as it ends; true when all passed.
pub async fn run(t: &Topology, ca: &DevCa, once: bool) -> bool {
    say!(
        "{:>2}  {:<STEP_WIDTH$} {:<6}  detail",
        "#",
        "step",
        "result"
    );
    let mut failed = Vec::new();
    let steps = 6;
    for number in 1..=steps {
        let step = match number {
            1 => allowed_call(t).await,
            2 => denied_call(t).await,
            3 => plaintext(t).await,
            4 => rotation(t, ca).await,
            5 => admin(t).await,
            _ => crate::demo::edge_call::json_at_the_edge(t).await,
        };
        say!("{}", format_step(number, &step).trim_end());
        if !step.passed {
            failed.push(format!("{number} ({})", step.name));
        }
    }
    say!();
    print_next(t, once);
    if failed.is_empty() {
        say!("tour: all {steps} steps passed");
        true
    } else {
        say!("tour: failed step {}", failed.join(", "));
        false
    }
}

/// A client for the payment API through a local sidecar's outbound listener.
fn payment_client(port: u16) -> Result<PaymentServiceClient<Channel>, TourError> {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(TourError::Endpoint)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    Ok(PaymentServiceClient::new(endpoint.connect_lazy()))
}

/// The payment every step asks for.
fn create_request() -> CreatePaymentRequest {
    CreatePaymentRequest {
        contact_id: "c-42".into(),
        family_id: "f-7".into(),
        document_id: "d-3".into(),
        amount_cents: 1250,
        currency: "EUR".into(),
        ..Default::default()
    }
}

/// The same request as JSON, for grpcurl.
const CREATE_JSON: &str = r#"{"contact_id":"c-42","family_id":"f-7","document_id":"d-3","amount_cents":1250,"currency":"EUR"}"#;

/// The first line of a status message, shortened.
pub fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() > 100 {
        format!("{}...", line.chars().take(100).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Step 1: the api-gateway identity creates a payment; the chain of callers comes back, and
/// the document sidecar has checked the JWT-SVID payment's sidecar sent beside mTLS.
async fn allowed_call(t: &Topology) -> Step {
    const NAME: &str = "allowed call";
    let mut client = match payment_client(t.gateway_out) {
        Ok(c) => c,
        Err(e) => return Step::new(NAME, false, vec![e.to_string()]),
    };
    let gateway = spiffe_id("api-gateway");
    match client.create_payment(create_request()).await {
        Ok(r) => {
            let p = r.into_inner();
            let payment = spiffe_id("payment-service");
            let want = [&gateway, &payment, &payment, &payment];
            let passed = p.identity_chain.iter().eq(want.iter().copied());
            let mut detail = vec![format!(
                "CreatePayment from {gateway}: OK {} ({}.{:02} {})",
                p.payment_id,
                p.amount_cents / 100,
                p.amount_cents % 100,
                p.currency
            )];
            let hops = [
                "payment-service",
                "contact-service",
                "family-service",
                "document-service",
            ];
            for (i, hop) in hops.iter().enumerate() {
                let seen = p.identity_chain.get(i).map(String::as_str).unwrap_or("");
                let seen = if seen.is_empty() { "(nobody)" } else { seen };
                detail.push(format!("{:<17} saw {seen}", hop));
            }
            if !passed {
                detail.push(format!("expected the chain {want:?}"));
            }
            let checked = jwt_svids_checked(t).await;
            let jwt_hop = checked > 0;
            detail.push(if jwt_hop {
                format!(
                    "{:<17} checked payment's JWT-SVID for {DOCUMENT_AUDIENCE} too \
                     ({checked} so far)",
                    "document sidecar"
                )
            } else {
                "the document sidecar checked no JWT-SVID".to_string()
            });
            Step::new(NAME, passed && jwt_hop, detail)
        }
        Err(s) => Step::new(
            NAME,
            false,
            vec![format!(
                "CreatePayment from {gateway} failed: {:?} {}",
                s.code(),
                short(s.message())
            )],
        ),
    }
}

/// The JWT-SVIDs the document sidecar accepted so far
/// (`meshd_jwt_svid_validations_total{result="ok"}`); 0 when it does not answer.
async fn jwt_svids_checked(t: &Topology) -> u64 {
    let Some(addr) = t.admin("document") else {
        return 0;
    };
    let Some((200, body)) = http(addr, "GET", "/metrics").await else {
        return 0;
    };
    body.lines()
        .filter(|l| {
            l.starts_with("meshd_jwt_svid_validations_total") && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Step 2: an identity the payment policy does not name is refused, with the rule.
async fn denied_call(t: &Topology) -> Step {
    const NAME: &str = "denied caller";
    let intruder = spiffe_id(INTRUDER);
    let mut client = match payment_client(t.intruder_out) {
        Ok(c) => c,
        Err(e) => return Step::new(NAME, false, vec![e.to_string()]),
    };
    match client.create_payment(create_request()).await {
        Ok(_) => Step::new(
            NAME,
            false,
            vec![format!(
                "CreatePayment from {intruder} succeeded: the policy should refuse it"
            )],
        ),
        Err(s) => {
            let passed = s.code() == tonic::Code::PermissionDenied;
            Step::new(
                NAME,
                passed,
                vec![
                    format!("CreatePayment from {intruder}: {}", code_name(s.code())),
                    format!("grpc-message: {}", short(s.message())),
                    format!("access log: {}", t.log("payment").display()),
                ],
            )
        }
    }
}

/// Step 3: plaintext HTTP/2 at the payment sidecar's inbound port gets nowhere.
async fn plaintext(t: &Topology) -> Step {
    const NAME: &str = "plaintext to inbound";
    let before = handshake_failures(t).await;
    let mut client = match payment_client(t.payment_inbound) {
        Ok(c) => c,
        Err(e) => return Step::new(NAME, false, vec![e.to_string()]),
    };
    let target = format!("127.0.0.1:{}", t.payment_inbound);
    match client.create_payment(create_request()).await {
        Ok(_) => Step::new(
            NAME,
            false,
            vec![format!(
                "plaintext CreatePayment to {target} succeeded: the inbound must require mTLS"
            )],
        ),
        Err(s) => {
            let mut detail = vec![format!(
                "plaintext h2c CreatePayment to {target}: refused ({} {})",
                code_name(s.code()),
                short(s.message())
            )];
            // The counter is written as the sidecar closes the connection: poll briefly.
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut after = handshake_failures(t).await;
            while after <= before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                after = handshake_failures(t).await;
            }
            detail.push(format!(
                "meshd_tls_handshake_failures_total{{direction=\"inbound\"}}: {before} -> {after}"
            ));
            Step::new(NAME, true, detail)
        }
    }
}

/// The payment sidecar's inbound handshake failures so far.
async fn handshake_failures(t: &Topology) -> u64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], t.payment_admin));
    let Some((200, body)) = http(addr, "GET", "/metrics").await else {
        return 0;
    };
    body.lines()
        .filter(|l| {
            l.starts_with("meshd_tls_handshake_failures_total")
                && l.contains("direction=\"inbound\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The payment sidecar's current SVID serial, from its admin `/identity`.
async fn payment_serial(t: &Topology) -> Result<String, TourError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], t.payment_admin));
    let (code, body) = http(addr, "GET", "/identity")
        .await
        .ok_or(TourError::NoAnswer(addr))?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|error| TourError::NotJson { code, error })?;
    json.get("serial")
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .ok_or_else(|| TourError::NoSerial {
            code,
            body: body.trim().to_string(),
        })
}

/// Step 4: every SVID is reissued while calls keep flowing; none of them fails.
async fn rotation(t: &Topology, ca: &DevCa) -> Step {
    const NAME: &str = "SVID rotation";
    let old = match payment_serial(t).await {
        Ok(s) => s,
        Err(e) => return Step::new(NAME, false, vec![e.to_string()]),
    };
    let mut client = match payment_client(t.gateway_out) {
        Ok(c) => c,
        Err(e) => return Step::new(NAME, false, vec![e.to_string()]),
    };
    ca.rotate_now();
    let start = Instant::now();
    let (mut calls, mut failures, mut new, mut first_error) = (0usize, 0usize, None, None);
    while start.elapsed() < ROTATION_TIMEOUT && (new.is_none() || calls < ROTATION_CALLS) {
        match client.create_payment(create_request()).await {
            Ok(_) => {}
            Err(s) => {
                failures += 1;
                first_error.get_or_insert_with(|| {
                    format!(
                        "first failure: {} {}",
                        code_name(s.code()),
                        short(s.message())
                    )
                });
            }
        }
        calls += 1;
        if new.is_none() && calls % 5 == 0 {
            if let Ok(serial) = payment_serial(t).await {
                if serial != old {
                    new = Some(serial);
                }
            }
        }
    }
    let mut detail = vec![format!("payment-service serial {old}")];
    let passed = match &new {
        Some(serial) => {
            detail.push(format!(
                "                    -> {serial} (every SVID reissued)"
            ));
            failures == 0
        }
        None => {
            detail.push(format!(
                "did not change within {}s of rotate_now",
                ROTATION_TIMEOUT.as_secs()
            ));
            false
        }
    };
    detail.push(format!(
        "{calls} CreatePayment calls during the rotation, {failures} failed"
    ));
    detail.extend(first_error);
    Step::new(NAME, passed, detail)
}

/// Step 5: the payment sidecar's admin endpoints answer.
async fn admin(t: &Topology) -> Step {
    const NAME: &str = "admin endpoints";
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], t.payment_admin));
    let mut bad = Vec::new();
    for (path, must_contain) in [
        ("/metrics", "meshd_authz_decisions_total"),
        ("/identity", "spiffe://jia.app/payment-service"),
        ("/policy", "gateway-calls-payments"),
    ] {
        match http(addr, "GET", path).await {
            Some((200, body)) if body.contains(must_contain) => {}
            Some((code, _)) => bad.push(format!("{path} answered {code} without {must_contain}")),
            None => bad.push(format!("{path} did not answer")),
        }
    }
    let mut detail = vec![format!(
        "payment sidecar admin http://{addr}: /metrics /identity /policy"
    )];
    detail.extend(bad.iter().cloned());
    Step::new(NAME, bad.is_empty(), detail)
}

/// The status code as gRPC names it (PERMISSION_DENIED, UNAVAILABLE, ...).
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A path as one shell word (single-quoted unless it is plain).
fn shell_word(text: &str) -> String {
    let plain = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=".contains(c));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Admin URLs and ready-to-paste commands for the running demo.
fn print_next(t: &Topology, once: bool) {
    if once {
        say!("Where to look next (these work while `meshd demo` runs without --once):");
    } else {
        say!("Where to look next:");
    }
    let admin = format!("http://127.0.0.1:{}", t.payment_admin);
    say!("  payment sidecar admin: {admin}/metrics  {admin}/identity  {admin}/policy");
    for s in &t.sidecars {
        if s.name != "payment" {
            say!("  {} sidecar admin: http://{}", s.name, s.admin);
        }
    }
    let proto = shell_word(&t.dir.join("proto").display().to_string());
    let grpcurl = |port: u16| {
        format!(
            "grpcurl -plaintext -import-path {proto} -proto payment.proto -d '{CREATE_JSON}' \
             127.0.0.1:{port} payment.v1.PaymentService/CreatePayment"
        )
    };
    say!("  # a payment as the api-gateway (through its sidecar):");
    say!("    {}", grpcurl(t.gateway_out));
    let (port, files) = &t.gateway;
    say!("  # the same through the edge gateway (HTTPS, with a JWT):");
    say!(
        "    grpcurl -cacert {} -servername localhost -H \"authorization: Bearer $(cat {})\" \
         -import-path {proto} -proto payment.proto -d '{CREATE_JSON}' \
         127.0.0.1:{port} payment.v1.PaymentService/CreatePayment",
        shell_word(&files.cert.display().to_string()),
        shell_word(&files.token.display().to_string()),
    );
    let cacert = shell_word(&files.cert.display().to_string());
    let bearer = format!(
        "-H \"Authorization: Bearer $(cat {})\"",
        shell_word(&files.token.display().to_string())
    );
    let edge = format!("https://localhost:{port}");
    say!("  # the design's two curl commands, as JSON through the edge gateway:");
    say!(
        "    curl --cacert {cacert} -X POST {edge}/payment.v1.PaymentService/CreatePayment \
         {bearer} -H \"Content-Type: application/json\" -d '{}'",
        crate::demo::edge_call::DESIGN_BODY
    );
    say!("    curl --cacert {cacert} {bearer} {edge}/payment.v1.PaymentService/ListPricingZones");
    say!("  # the REST surface payment.proto declares (google.api.http): a customer's payments");
    say!("    curl --cacert {cacert} {bearer} {edge}/v1/customers/user_123/payments");
    say!("  # the same as the intruder: PermissionDenied");
    say!("    {}", grpcurl(t.intruder_out));
    say!("  # identity, policy, an authorization question, metrics:");
    say!("    curl -s {admin}/identity");
    say!("    curl -s {admin}/policy");
    say!(
        "    curl -s '{admin}/authz?from={}&grpc=payment.v1.PaymentService/CreatePayment'",
        spiffe_id(INTRUDER)
    );
    say!("    curl -s {admin}/metrics | grep -E '^meshd_(authz|svid)'");
    if let Some(document) = t.admin("document") {
        say!("  # the JWT-SVIDs the document sidecar checked (payment sends one with each call):");
        say!("    curl -s http://{document}/metrics | grep '^meshd_jwt_svid_validations_total'");
    }
    say!(
        "  logs: {} (denials in the access log of payment-sidecar.log)",
        shell_word(&t.dir.join("logs").display().to_string())
    );
    say!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_line_up() {
        // The table stays readable: continuation lines start under the detail column.
        let step = Step::new("denied caller", true, vec!["first".into(), "second".into()]);
        let text = format_step(2, &step);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let col = lines[0].find("first").unwrap();
        assert_eq!(lines[1].find("second"), Some(col));
        assert!(lines[0].starts_with(" 2  denied caller"));
        assert!(lines[0].contains("PASS"));
    }

    #[test]
    fn names_and_words() {
        // Status codes read as gRPC spells them; odd temp paths stay one shell word.
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            shell_word("/tmp/meshd-demo-1-ab/proto"),
            "/tmp/meshd-demo-1-ab/proto"
        );
        assert_eq!(shell_word("/tmp/a b/it's"), r"'/tmp/a b/it'\''s'");
    }
}
