//! The REST surface the protos declare: each exposed method's `google.api.http` rule
//! (and its `additional_bindings`) read once from the method's options into a
//! [`Binding`]: the HTTP method, the parsed path template, where the body goes and what
//! of the answer is sent. A template that does not parse, or names a field the request
//! does not have, is an error naming the method and the template.

use super::http_rule::{self, Template};
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
};

/// Where a REST call's body goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRule {
    /// No `body`: the call takes no body; the query fills the fields the path does not.
    None,
    /// `body: "*"`: the body is the request message.
    Whole,
    /// `body: "field"`: the body is that (top-level) field's value.
    Field(String),
}

/// One HTTP method and path template that calls a gRPC method.
#[derive(Debug, Clone)]
pub struct Binding {
    pub http: http::Method,
    pub template: Template,
    pub body: BodyRule,
    /// `response_body`: only this field of the answer is sent.
    pub response_body: Option<FieldDescriptor>,
    /// The gRPC method called.
    pub method: MethodDescriptor,
}

/// Why a `google.api.http` rule cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The path template does not parse.
    #[error("{0}")]
    Template(#[from] http_rule::TemplateError),
    /// A variable or `body` names no field of the request (or one that cannot hold it).
    #[error("`{field}` {reason}")]
    Field { field: String, reason: &'static str },
    /// `response_body` names no field of the answer.
    #[error("response_body `{0}` is not a field of the answer")]
    ResponseBody(String),
    /// No path, or a custom pattern without a kind.
    #[error("no HTTP method and path")]
    NoPattern,
    /// A kind the HTTP method grammar does not allow.
    #[error("`{0}` is not an HTTP method")]
    BadMethod(String),
}

/// Why the REST surface cannot be built: the rule, its method and template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}{method}: google.api.http `{template}`: {reason}")]
pub struct BindingError {
    /// `file.proto:line:column: ` of the method, when the protos carry source info.
    pub at: String,
    /// `pkg.Service.Method`.
    pub method: String,
    pub template: String,
    pub reason: RuleError,
}

/// The bindings of `services`' methods, most specific first (see [`Template::rank`]).
/// None when the protos do not know `google.api.http`.
pub fn bindings(pool: &DescriptorPool, services: &[String]) -> Result<Vec<Binding>, BindingError> {
    let Some(ext) = pool.get_extension_by_name("google.api.http") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for service in services.iter().filter_map(|s| pool.get_service_by_name(s)) {
        for method in service.methods() {
            let options = method.options();
            if !options.has_extension(&ext) {
                continue;
            }
            let Some(rule) = options.get_extension(&ext).as_message().cloned() else {
                continue;
            };
            read_rule(&method, &rule, &mut out)?;
            if let Some(more) = rule
                .get_field_by_name("additional_bindings")
                .and_then(|v| v.as_list().map(<[_]>::to_vec))
            {
                for r in more.iter().filter_map(|v| v.as_message()) {
                    read_rule(&method, r, &mut out)?;
                }
            }
        }
    }
    out.sort_by_key(|b| std::cmp::Reverse(b.template.rank()));
    Ok(out)
}

fn text(rule: &DynamicMessage, name: &str) -> String {
    rule.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The HTTP method and path of a rule: `get`, ... `patch`, or `custom {kind, path}`.
fn pattern(rule: &DynamicMessage) -> Result<(http::Method, String), RuleError> {
    for (name, m) in [
        ("get", http::Method::GET),
        ("put", http::Method::PUT),
        ("post", http::Method::POST),
        ("delete", http::Method::DELETE),
        ("patch", http::Method::PATCH),
    ] {
        if rule.has_field_by_name(name) {
            return Ok((m, text(rule, name)));
        }
    }
    if rule.has_field_by_name("custom") {
        if let Some(custom) = rule
            .get_field_by_name("custom")
            .and_then(|v| v.as_message().cloned())
        {
            let kind = text(&custom, "kind");
            let m = http::Method::from_bytes(kind.as_bytes())
                .map_err(|_| RuleError::BadMethod(kind.clone()))?;
            return Ok((m, text(&custom, "path")));
        }
    }
    Err(RuleError::NoPattern)
}

fn read_rule(
    method: &MethodDescriptor,
    rule: &DynamicMessage,
    out: &mut Vec<Binding>,
) -> Result<(), BindingError> {
    let (http, template_text) = match pattern(rule) {
        Ok(p) => p,
        Err(reason) => {
            return Err(BindingError {
                at: position(method),
                method: method.full_name().into(),
                template: String::new(),
                reason,
            })
        }
    };
    let fail = |reason: RuleError| BindingError {
        at: position(method),
        method: method.full_name().into(),
        template: template_text.clone(),
        reason,
    };
    let template = http_rule::parse(&template_text).map_err(|e| fail(e.into()))?;
    let input = method.input();
    for v in &template.variables {
        check_path_field(&input, &v.field).map_err(fail)?;
    }
    let body = match text(rule, "body").as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        field => {
            if input.get_field_by_name(field).is_none() {
                return Err(fail(RuleError::Field {
                    field: field.into(),
                    reason: "(body) is not a field of the request",
                }));
            }
            BodyRule::Field(field.into())
        }
    };
    let response_body = match text(rule, "response_body").as_str() {
        "" => None,
        name => Some(
            method
                .output()
                .get_field_by_name(name)
                .ok_or_else(|| fail(RuleError::ResponseBody(name.into())))?,
        ),
    };
    out.push(Binding {
        http,
        template,
        body,
        response_body,
        method: method.clone(),
    });
    Ok(())
}

/// A path variable must name a singular, non-message field (through singular messages).
fn check_path_field(input: &MessageDescriptor, path: &[String]) -> Result<(), RuleError> {
    let name = path.join(".");
    let bad = |reason| RuleError::Field {
        field: name.clone(),
        reason,
    };
    let mut msg = input.clone();
    for (i, seg) in path.iter().enumerate() {
        let field = msg
            .get_field_by_name(seg)
            .ok_or_else(|| bad("is not a field of the request"))?;
        if field.is_list() || field.is_map() {
            return Err(bad("is repeated; a path variable sets one value"));
        }
        match field.kind() {
            Kind::Message(m) if i + 1 < path.len() => msg = m,
            Kind::Message(_) => return Err(bad("is a message; a path variable sets a value")),
            _ if i + 1 < path.len() => return Err(bad("is not a message")),
            _ => {}
        }
    }
    Ok(())
}

/// `file.proto:line:column: ` where `method` is declared (1-based), or nothing when the
/// descriptors carry no source info (a descriptor set made without it).
fn position(method: &MethodDescriptor) -> String {
    let file = method.parent_file();
    let found = file
        .file_descriptor_proto()
        .source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|l| l.path == method.path()))
        .and_then(|l| Some((*l.span.first()?, *l.span.get(1)?)));
    match found {
        Some((line, col)) => format!("{}:{}:{}: ", file.name(), line + 1, col + 1),
        None => String::new(),
    }
}
