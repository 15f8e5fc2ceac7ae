//! The request message of a JSON call: the body (the whole message, one field of it, or
//! none, per the binding's `body`), then the path variables (they win), then the query
//! (it fills what is left), read by the proto3 JSON mapping; a field that does not read
//! is named with its path.

use super::bindings::BodyRule;
use super::{http_rule, rules, Call, TranscodeError, Transcoder};
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Value};

impl Transcoder {
    /// The request message of `call` from its body, path variables and query.
    pub(super) fn call_message(
        &self,
        call: &Call,
        body: &[u8],
        query: &str,
    ) -> Result<DynamicMessage, TranscodeError> {
        let desc = call.method.input();
        let empty = body.iter().all(u8::is_ascii_whitespace);
        let mut object = match &call.body {
            BodyRule::Whole => body_object(body)?,
            BodyRule::None if empty => Map::new(),
            BodyRule::None => {
                return Err(TranscodeError::UnexpectedBody(
                    call.method.full_name().into(),
                ))
            }
            BodyRule::Field(_) if empty => Map::new(),
            BodyRule::Field(name) => {
                let value =
                    serde_json::from_slice::<Value>(body).map_err(TranscodeError::MalformedJson)?;
                Map::from_iter([(name.clone(), value)])
            }
        };
        for capture in &call.captures {
            set_path_value(&desc, &mut object, capture)?;
        }
        let query = rules::query_json(&desc, query, self.ignore_unknown)?;
        rules::merge_query(&mut object, query);
        self.message_from(&desc, object)
    }

    /// The request message from the JSON body (empty: the empty message) and the query.
    #[cfg(test)]
    pub(super) fn request_message(
        &self,
        desc: &MessageDescriptor,
        body: &[u8],
        query: &str,
    ) -> Result<DynamicMessage, TranscodeError> {
        let mut object = body_object(body)?;
        let query = rules::query_json(desc, query, self.ignore_unknown)?;
        rules::merge_query(&mut object, query);
        self.message_from(desc, object)
    }

    /// `object` read as a `desc` message; the field that does not read is named.
    fn message_from(
        &self,
        desc: &MessageDescriptor,
        object: Map<String, Value>,
    ) -> Result<DynamicMessage, TranscodeError> {
        DynamicMessage::deserialize_with_options(
            desc.clone(),
            Value::Object(object.clone()),
            &self.read,
        )
        .map_err(|e| {
            let (path, reason) = self
                .locate(desc, &object)
                .unwrap_or_else(|| (desc.full_name().to_string(), e.to_string()));
            TranscodeError::BadField { path, reason }
        })
    }

    /// The field of `object` that `desc` does not read, with why: each field alone, and
    /// into nested messages, so the client sees `payment.amount_cents`, not just "error".
    fn locate(
        &self,
        desc: &MessageDescriptor,
        object: &Map<String, Value>,
    ) -> Option<(String, String)> {
        for (key, value) in object {
            let alone = Map::from_iter([(key.clone(), value.clone())]);
            let Err(e) = DynamicMessage::deserialize_with_options(
                desc.clone(),
                Value::Object(alone),
                &self.read,
            ) else {
                continue;
            };
            let field = desc
                .get_field_by_name(key)
                .or_else(|| desc.get_field_by_json_name(key));
            if let (Some(f), Value::Object(inner)) = (&field, value) {
                if let Kind::Message(m) = f.kind() {
                    let wkt = m.full_name().starts_with("google.protobuf.");
                    if !f.is_list() && !f.is_map() && !wkt {
                        if let Some((path, reason)) = self.locate(&m, inner) {
                            return Some((format!("{key}.{path}"), reason));
                        }
                    }
                }
            }
            let reason = match field {
                Some(f) => format!("expected {} ({e})", rules::expected_json(&f)),
                None => e.to_string(),
            };
            return Some((key.clone(), reason));
        }
        None
    }
}

/// The body as a JSON object: empty is `{}`, anything but an object is refused.
fn body_object(body: &[u8]) -> Result<Map<String, Value>, TranscodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body).map_err(TranscodeError::MalformedJson)? {
        Value::Object(o) => Ok(o),
        other => Err(TranscodeError::NotAnObject(json_kind(&other))),
    }
}

/// Sets a path variable's value at its field path in `object` (nested objects made on
/// the way; it replaces what the body said).
fn set_path_value(
    desc: &MessageDescriptor,
    object: &mut Map<String, Value>,
    capture: &http_rule::Capture,
) -> Result<(), TranscodeError> {
    let name = capture.field.join(".");
    let text =
        http_rule::decode(capture).ok_or_else(|| TranscodeError::PathNotUtf8(name.clone()))?;
    let mut msg = desc.clone();
    let mut obj = object;
    let Some((last, through)) = capture.field.split_last() else {
        return Ok(());
    };
    for seg in through {
        // The bindings checked each step is a singular message field.
        if let Some(Kind::Message(m)) = msg.get_field_by_name(seg).map(|f| f.kind()) {
            msg = m;
        }
        let entry = obj
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(inner) = entry else {
            return Ok(());
        };
        obj = inner;
    }
    let Some(field) = msg.get_field_by_name(last) else {
        return Ok(());
    };
    let value =
        rules::scalar_json(&field.kind(), &text).ok_or_else(|| TranscodeError::BadPathValue {
            field: name.clone(),
            value: text.clone(),
            expected: rules::expected(&field.kind()),
        })?;
    obj.remove(field.json_name());
    obj.insert(last.clone(), value);
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
