//! The payment demo app: the one reference service with downstreams.
//!
//! Flow: [`PaymentApp::new`] turns the contact/family/document URLs (its sidecar's
//! outbound listeners, plaintext h2c) into lazily connecting channels. CreatePayment
//! calls the three concurrently, passes any downstream status through unchanged, and
//! records who was seen on the way in `identity_chain`: its own caller (from its XFCC),
//! then the caller each downstream saw. It takes the design's body too (`amount`,
//! `payment_method`, `customer_id`). GetPayment, RefundPayment, ListPayments (a server
//! stream, one message per payment of a customer) and ListPricingZones answer locally.

use crate::demo::apps::{pause, seen_caller, DemoAppError, DemoOptions};
use crate::pb::contact::contact_service_client::ContactServiceClient;
use crate::pb::contact::GetContactRequest;
use crate::pb::document::document_service_client::DocumentServiceClient;
use crate::pb::document::GetDocumentRequest;
use crate::pb::family::family_service_client::FamilyServiceClient;
use crate::pb::family::GetFamilyRequest;
use crate::pb::payment::payment_service_server::{PaymentService, PaymentServiceServer};
use crate::pb::payment::{
    CreatePaymentRequest, GetPaymentRequest, ListPaymentsRequest, ListPricingZonesRequest,
    ListPricingZonesResponse, Payment, PaymentStatus, Refund, RefundPaymentRequest,
};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// The pricing zones ListPricingZones reports.
const ZONES: [&str; 3] = ["eu-west-1", "us-east-1", "ap-southeast-1"];

/// The payment service with its downstream clients and the payments it created.
pub struct PaymentApp {
    contact: ContactServiceClient<Channel>,
    family: FamilyServiceClient<Channel>,
    document: DocumentServiceClient<Channel>,
    /// Payments created so far, for GetPayment, RefundPayment and ListPayments (a demo:
    /// kept in memory, never pruned).
    ledger: Mutex<Ledger>,
    /// Added before each answer (drain tests).
    delay: Duration,
}

/// The payments made, by ID and, in the order made, by customer.
#[derive(Default)]
struct Ledger {
    by_id: HashMap<String, Payment>,
    /// Payment IDs per customer, oldest first (ListPayments).
    by_customer: HashMap<String, Vec<String>>,
}

impl PaymentApp {
    /// Checks the downstream URLs and prepares lazy channels (nothing is dialed yet).
    pub fn new(opts: &DemoOptions) -> Result<PaymentApp, DemoAppError> {
        Ok(PaymentApp {
            contact: ContactServiceClient::new(channel("contact", opts.contact.as_deref())?),
            family: FamilyServiceClient::new(channel("family", opts.family.as_deref())?),
            document: DocumentServiceClient::new(channel("document", opts.document.as_deref())?),
            ledger: Mutex::new(Ledger::default()),
            delay: opts.delay,
        })
    }

    /// The tonic service to mount.
    pub fn into_server(self) -> PaymentServiceServer<PaymentApp> {
        PaymentServiceServer::new(self)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A lazily connecting plaintext (h2c) channel to `url`.
fn channel(flag: &'static str, url: Option<&str>) -> Result<Channel, DemoAppError> {
    let url = url.ok_or(DemoAppError::MissingDownstream(flag))?;
    let bad = |reason: String| DemoAppError::BadDownstreamUrl {
        flag,
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(bad(
            "only http://host:port (plaintext h2c) is supported".into()
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// The amount asked for: `amount_cents`, else the design's `amount` (both minor units).
fn amount(r: &CreatePaymentRequest) -> Result<i64, tonic::Status> {
    match (r.amount_cents, r.amount) {
        (c, _) if c > 0 => Ok(c),
        (0, a) if a > 0 => Ok(a),
        _ => Err(tonic::Status::invalid_argument(
            "amount_cents must be positive",
        )),
    }
}

/// `google.rpc.Status`, the rich error model: what `grpc-status-details-bin` carries.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// FAILED_PRECONDITION for a refund over what is left, with the refund asked for in the
/// status details (as apps using the rich error model do), so JSON clients see it too.
fn refused_refund(message: String, refund: &Refund) -> tonic::Status {
    let details = RpcStatus {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/payment.v1.Refund".into(),
            value: prost::Message::encode_to_vec(refund),
        }],
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        prost::Message::encode_to_vec(&details).into(),
    )
}

/// Now, as a protobuf Timestamp.
fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

/// The payments streamed by ListPayments.
type PaymentStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Payment, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl PaymentService for PaymentApp {
    async fn create_payment(
        &self,
        request: tonic::Request<CreatePaymentRequest>,
    ) -> Result<tonic::Response<Payment>, tonic::Status> {
        pause(self.delay).await;
        let caller = seen_caller(&request);
        let r = request.into_inner();
        let amount_cents = amount(&r)?;
        let contact_id = if r.contact_id.is_empty() {
            r.customer_id.clone()
        } else {
            r.contact_id
        };
        let (mut contact, mut family, mut document) = (
            self.contact.clone(),
            self.family.clone(),
            self.document.clone(),
        );
        let (c, f, d) = tokio::try_join!(
            contact.get_contact(GetContactRequest {
                contact_id,
                payload: vec![],
            }),
            family.get_family(GetFamilyRequest {
                family_id: r.family_id,
            }),
            document.get_document(GetDocumentRequest {
                document_id: r.document_id,
            }),
        )?;
        let (c, f, d) = (c.into_inner(), f.into_inner(), d.into_inner());
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let payment = Payment {
            payment_id: format!(
                "pay-{}",
                id.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            amount_cents,
            currency: if r.currency.is_empty() {
                "EUR".into()
            } else {
                r.currency
            },
            contact_name: c.name,
            family_name: f.name,
            document_title: d.title,
            identity_chain: vec![caller, c.seen_caller, f.seen_caller, d.seen_caller],
            payment_method: r.payment_method,
            customer_id: r.customer_id,
            status: PaymentStatus::Created.into(),
            created_at: Some(now()),
            metadata: r.metadata,
            refunded_cents: 0,
        };
        let mut ledger = self.ledger();
        (ledger
            .by_customer
            .entry(payment.customer_id.clone())
            .or_default())
        .push(payment.payment_id.clone());
        ledger
            .by_id
            .insert(payment.payment_id.clone(), payment.clone());
        Ok(tonic::Response::new(payment))
    }

    async fn get_payment(
        &self,
        request: tonic::Request<GetPaymentRequest>,
    ) -> Result<tonic::Response<Payment>, tonic::Status> {
        pause(self.delay).await;
        let id = request.into_inner().payment_id;
        match self.ledger().by_id.get(&id) {
            Some(p) => Ok(tonic::Response::new(p.clone())),
            None => Err(tonic::Status::not_found(format!("no payment {id}"))),
        }
    }

    async fn list_pricing_zones(
        &self,
        _request: tonic::Request<ListPricingZonesRequest>,
    ) -> Result<tonic::Response<ListPricingZonesResponse>, tonic::Status> {
        pause(self.delay).await;
        Ok(tonic::Response::new(ListPricingZonesResponse {
            zones: ZONES.iter().map(|z| z.to_string()).collect(),
        }))
    }

    async fn refund_payment(
        &self,
        request: tonic::Request<RefundPaymentRequest>,
    ) -> Result<tonic::Response<Payment>, tonic::Status> {
        pause(self.delay).await;
        let r = request.into_inner();
        let mut ledger = self.ledger();
        let Some(p) = ledger.by_id.get_mut(&r.payment_id) else {
            return Err(tonic::Status::not_found(format!(
                "no payment {}",
                r.payment_id
            )));
        };
        let left = p.amount_cents - p.refunded_cents;
        let refund = r.refund.unwrap_or_default();
        let amount = if refund.amount_cents == 0 {
            left
        } else {
            refund.amount_cents
        };
        if amount < 0 || amount > left {
            let message = format!("{} has {left} left to refund, not {amount}", r.payment_id);
            return Err(refused_refund(message, &refund));
        }
        p.refunded_cents += amount;
        if p.refunded_cents == p.amount_cents {
            p.status = PaymentStatus::Refunded.into();
        }
        Ok(tonic::Response::new(p.clone()))
    }

    type ListPaymentsStream = PaymentStream;

    async fn list_payments(
        &self,
        request: tonic::Request<ListPaymentsRequest>,
    ) -> Result<tonic::Response<PaymentStream>, tonic::Status> {
        pause(self.delay).await;
        let r = request.into_inner();
        let Some(customer) = r.parent.strip_prefix("customers/") else {
            return Err(tonic::Status::invalid_argument(format!(
                "parent `{}` is not customers/{{customer_id}}",
                r.parent
            )));
        };
        let ledger = self.ledger();
        let ids = ledger
            .by_customer
            .get(customer)
            .map_or(&[][..], Vec::as_slice);
        let limit = if r.page_size == 0 {
            usize::MAX
        } else {
            r.page_size as usize
        };
        let found: Vec<Result<Payment, tonic::Status>> = ids
            .iter()
            .filter_map(|id| ledger.by_id.get(id).cloned())
            .take(limit)
            .map(Ok)
            .collect();
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(found))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::apps::{bind, serve, DemoService, XFCC_HEADER};
    use crate::pb::payment::payment_service_client::PaymentServiceClient;
    use std::net::SocketAddr;
    use tokio_util::sync::CancellationToken;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    async fn leaf(kind: DemoService, stop: &CancellationToken) -> String {
        let addr = serve(kind, local(), DemoOptions::default(), stop.clone())
            .await
            .unwrap();
        format!("http://{addr}")
    }

    fn create(xfcc: &str) -> tonic::Request<CreatePaymentRequest> {
        let mut req = tonic::Request::new(CreatePaymentRequest {
            contact_id: "c1".into(),
            family_id: "f1".into(),
            document_id: "d1".into(),
            amount_cents: 1250,
            currency: "EUR".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert(XFCC_HEADER, xfcc.parse().unwrap());
        req
    }

    #[tokio::test]
    async fn create_payment_end_to_end() {
        // The gateway's call (faked XFCC) makes payment ask its three downstreams directly.
        let stop = CancellationToken::new();
        let opts = DemoOptions {
            contact: Some(leaf(DemoService::Contact, &stop).await),
            family: Some(leaf(DemoService::Family, &stop).await),
            document: Some(leaf(DemoService::Document, &stop).await),
            delay: Duration::ZERO,
        };
        let addr = serve(DemoService::Payment, local(), opts, stop.clone())
            .await
            .unwrap();
        let mut client = PaymentServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let xfcc = "By=spiffe://jia.app/payment-service;URI=spiffe://jia.app/api-gateway";
        let p = client
            .create_payment(create(xfcc))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.contact_name, "Contact c1");
        assert_eq!(p.family_name, "Family f1");
        assert_eq!(p.document_title, "Document d1");
        assert_eq!(p.amount_cents, 1250);
        // Without sidecars in between, the downstreams see no XFCC.
        assert_eq!(
            p.identity_chain,
            vec!["spiffe://jia.app/api-gateway", "", "", ""]
        );
        let got = client
            .get_payment(GetPaymentRequest {
                payment_id: p.payment_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got, p);
        let missing = client
            .get_payment(GetPaymentRequest {
                payment_id: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let zones = client
            .list_pricing_zones(ListPricingZonesRequest {})
            .await
            .unwrap()
            .into_inner()
            .zones;
        assert_eq!(zones.len(), 3);
        stop.cancel();
    }

    #[tokio::test]
    async fn downstream_failure_passes_through() {
        // Document is down: payment answers with the status its call to document got.
        let stop = CancellationToken::new();
        let closed = {
            let l = std::net::TcpListener::bind(local()).unwrap();
            l.local_addr().unwrap()
        };
        let opts = DemoOptions {
            contact: Some(leaf(DemoService::Contact, &stop).await),
            family: Some(leaf(DemoService::Family, &stop).await),
            document: Some(format!("http://{closed}")),
            delay: Duration::ZERO,
        };
        let addr = serve(DemoService::Payment, local(), opts, stop.clone())
            .await
            .unwrap();
        let mut client = PaymentServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let err = client
            .create_payment(create("URI=spiffe://jia.app/x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        stop.cancel();
    }

    #[tokio::test]
    async fn bad_downstream_urls_are_refused() {
        // A typo in --document is reported at start, naming the flag.
        let opts = |document: &str| DemoOptions {
            contact: Some("http://127.0.0.1:15101".into()),
            family: Some("http://127.0.0.1:15102".into()),
            document: Some(document.into()),
            delay: Duration::ZERO,
        };
        for bad in [
            "https://127.0.0.1:1",
            "127.0.0.1:15103",
            "http://",
            "not a url",
        ] {
            let err = bind(DemoService::Payment, local(), opts(bad)).await.err();
            assert!(
                matches!(
                    err,
                    Some(DemoAppError::BadDownstreamUrl {
                        flag: "document",
                        ..
                    })
                ),
                "{bad}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn delay_holds_each_call() {
        // A drain test asks for slow answers: every call waits the configured delay.
        let stop = CancellationToken::new();
        let opts = DemoOptions {
            contact: Some("http://127.0.0.1:1".into()),
            family: Some("http://127.0.0.1:1".into()),
            document: Some("http://127.0.0.1:1".into()),
            delay: Duration::from_millis(300),
        };
        let addr = serve(DemoService::Payment, local(), opts, stop.clone())
            .await
            .unwrap();
        let mut client = PaymentServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let start = std::time::Instant::now();
        client
            .list_pricing_zones(ListPricingZonesRequest {})
            .await
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300));
        stop.cancel();
    }
}
