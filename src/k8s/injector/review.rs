//! One AdmissionReview in, one out: the webhook's decision, with no I/O.
//!
//! Flow: the body is read as JSON, then as an `admission.k8s.io` AdmissionReview
//! (kube-core's types); a body that is neither, or has no request, is a [`BadReview`] (the
//! server answers 400). A request for a pod's CREATE runs [`mutate_pod`], the mutation of
//! `meshd inject`, on the pod (as its YAML value); the answer is `allowed: true` with the
//! JSON Patch (RFC 6902) from the pod to its injected self, or without a patch when the pod
//! is left alone. A pod the mutation cannot understand is admitted as it is with a `warnings`
//! entry saying why: a broken injector must not block workloads beyond what the webhook's
//! `failurePolicy` says (and the pod's owner sees the warning in `kubectl`'s output).
//! The answer is in the AdmissionReview version asked, with `uid` copied, and its patch
//! as the base64 string Kubernetes' `[]byte` fields are in JSON.

use super::super::inject::{mutate_pod, text_at, PodOutcome, SidecarOptions};
use base64::Engine;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;
use serde_json::Value as Json;
use serde_yaml_ng::Value;

/// Why a body is not an AdmissionReview this webhook can answer (400, no review back).
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    /// The body is not JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// The body is JSON but not an AdmissionReview with a request uid.
    #[error("not an AdmissionReview: {0}")]
    NotAReview(serde_json::Error),
    /// The AdmissionReview has no `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// What the webhook did with one review: the metric's `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted with the sidecar patch.
    Injected,
    /// Admitted as it is (opted out, hostNetwork, already injected, not a pod's CREATE).
    LeftAlone,
    /// Admitted as it is with a warning: the pod could not be understood.
    Error,
}

impl Verdict {
    /// The `result` label of `meshd_injector_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            // The label dashboards and alerts already use.
            Verdict::LeftAlone => "skipped",
            Verdict::Error => "error",
        }
    }
}

/// The webhook's answer to one review.
#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back.
    pub review: Json,
    /// What was done, for the metric and the log line.
    pub verdict: Verdict,
    /// Why, in words, for the log line (and the warning of an error).
    pub reason: String,
    /// The request's uid, for the log line.
    pub uid: String,
    /// `namespace/name` (or `namespace/generateName*`) of the pod, for the log line.
    pub pod: String,
}

/// Answers the AdmissionReview in `body` with the sidecar of `options`.
pub fn review(body: &[u8], options: &SidecarOptions) -> Result<Answer, BadReview> {
    let value: Json = serde_json::from_slice(body).map_err(BadReview::NotJson)?;
    let parsed: AdmissionReview<DynamicObject> = match serde_json::from_value(value.clone()) {
        Ok(r) => r,
        Err(e) => return unreadable(&value, e),
    };
    let request: AdmissionRequest<DynamicObject> =
        parsed.try_into().map_err(|_| BadReview::NoRequest)?;
    let pod = pod_label(
        request.namespace.as_deref(),
        request.object.as_ref().map(|o| &o.metadata),
    );
    let uid = request.uid.clone();
    let response = AdmissionResponse::from(&request);
    let (response, verdict, reason) = decide(&request, response, options);
    Ok(Answer {
        review: to_json(response),
        verdict,
        reason,
        uid,
        pod,
    })
}

/// The response for a readable request: the patch, none, or a warning.
fn decide(
    request: &AdmissionRequest<DynamicObject>,
    response: AdmissionResponse,
    options: &SidecarOptions,
) -> (AdmissionResponse, Verdict, String) {
    let left_alone = |why: String| (response.clone(), Verdict::LeftAlone, why);
    if request.kind.kind != "Pod" || !request.kind.group.is_empty() {
        return left_alone(format!("not a Pod but {}", request.kind.kind));
    }
    if !matches!(request.operation, Operation::Create) {
        return left_alone(format!(
            "operation {:?}, only CREATE is injected",
            request.operation
        ));
    }
    let Some(object) = &request.object else {
        return warned(response, "the request has no object".into());
    };
    let before = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return warned(response, format!("the pod cannot be read: {e}")),
    };
    let mut pod: Value = match serde_yaml_ng::to_value(&before) {
        Ok(v) => v,
        Err(e) => return warned(response, format!("the pod cannot be read: {e}")),
    };
    let workload = workload_name(&pod);
    match mutate_pod(&mut pod, &workload, options) {
        Err(e) => warned(response, e.to_string()),
        Ok(PodOutcome::LeftAlone(why)) => left_alone(why.as_str().into()),
        Ok(PodOutcome::Injected) => {
            let after = match serde_json::to_value(&pod) {
                Ok(v) => v,
                Err(e) => {
                    return warned(response, format!("the injected pod cannot be written: {e}"))
                }
            };
            let patch = json_patch::diff(&before, &after);
            match response.clone().with_patch(patch) {
                Ok(r) => (r, Verdict::Injected, "injected".into()),
                Err(e) => warned(response, format!("the patch cannot be written: {e}")),
            }
        }
    }
}

/// Admitted as it is, with a warning saying why.
fn warned(mut response: AdmissionResponse, why: String) -> (AdmissionResponse, Verdict, String) {
    response.warnings = Some(vec![warning(&why)]);
    (response, Verdict::Error, why)
}

/// The warning text of a pod admitted without the sidecar because of `why`.
fn warning(why: &str) -> String {
    format!("meshd injector: pod admitted without the meshd sidecar: {why}")
}

/// A JSON body that kube-core cannot read as a review: admitted with a warning when it at
/// least names the request's uid (so the API server can match the answer), else 400.
fn unreadable(value: &Json, error: serde_json::Error) -> Result<Answer, BadReview> {
    let Some(uid) = value.pointer("/request/uid").and_then(Json::as_str) else {
        return Err(BadReview::NotAReview(error));
    };
    let why = format!("the AdmissionReview cannot be read: {error}");
    let text = |key: &str, default: &str| {
        value
            .get(key)
            .and_then(Json::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let review = serde_json::json!({
        "apiVersion": text("apiVersion", kube_core::admission::META_API_VERSION_V1),
        "kind": text("kind", kube_core::admission::META_KIND),
        "response": {"uid": uid, "allowed": true, "warnings": [warning(&why)]},
    });
    let namespace = value.pointer("/request/namespace").and_then(Json::as_str);
    Ok(Answer {
        review,
        verdict: Verdict::Error,
        reason: why,
        uid: uid.to_string(),
        pod: format!("{}/?", namespace.unwrap_or("")),
    })
}

/// The review as JSON, with the patch as a base64 string (kube-core writes `Vec<u8>` as
/// an array of numbers; Kubernetes writes `[]byte` as base64 and reads both).
fn to_json(response: AdmissionResponse) -> Json {
    let mut review = serde_json::to_value(response.into_review()).unwrap_or(Json::Null);
    if let Some(patch) = review.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(patch.take()).unwrap_or_default();
        *patch = Json::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    review
}

/// The workload a pod belongs to, for its config map's default name: the pod's name, else
/// its `generateName` less the trailing `-` and a ReplicaSet's `pod-template-hash` (so a
/// Deployment's pod gets the Deployment's name, as `meshd inject` gives it).
pub fn workload_name(pod: &Value) -> String {
    if let Some(name) = text_at(pod, &["metadata", "name"]).filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    let Some(generate) = text_at(pod, &["metadata", "generateName"]) else {
        return "<unnamed>".into();
    };
    let base = generate.strip_suffix('-').unwrap_or(generate);
    match text_at(pod, &["metadata", "labels", "pod-template-hash"]) {
        Some(hash) => base
            .strip_suffix(hash)
            .and_then(|b| b.strip_suffix('-'))
            .unwrap_or(base)
            .to_string(),
        None => base.to_string(),
    }
}

/// `namespace/name`, or `namespace/generateName*` for a pod named by the API server.
fn pod_label(
    namespace: Option<&str>,
    meta: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> String {
    let name = meta
        .and_then(|m| m.name.clone().filter(|n| !n.is_empty()))
        .or_else(|| meta.and_then(|m| m.generate_name.as_ref().map(|g| format!("{g}*"))))
        .unwrap_or_else(|| "?".into());
    format!("{}/{name}", namespace.unwrap_or(""))
}
