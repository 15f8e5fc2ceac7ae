//! Path templates of `google.api.http` rules, parsed once into [`Template`] and matched
//! against request paths.
//!
//! Grammar (google/api/http.proto):
//! `Template = "/" Segments [ ":" Verb ]`, `Segments = Segment { "/" Segment }`,
//! `Segment = "*" | "**" | LITERAL | Variable`, `Variable = "{" FieldPath [ "=" Segments ] "}"`,
//! `FieldPath = IDENT { "." IDENT }`. `{field}` is `{field=*}`; `**` (zero or more
//! segments) may only be the last segment. Matching takes the verb off the path's end
//! first, then compares segment by segment; each variable captures the raw (still
//! percent-encoded) text of its segments, which [`decode`] turns into the field's value.

/// One segment of a template's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches exactly this text.
    Literal(String),
    /// `*`: any one non-empty segment.
    One,
    /// `**`: zero or more segments, to the end of the path.
    Rest,
}

/// A `{field=...}` of a template: the field it sets and the segments it captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The field path, e.g. `["payment", "id"]` for `{payment.id}`.
    pub field: Vec<String>,
    /// The first segment captured.
    pub start: usize,
    /// One past the last segment captured (a `**` captures to the path's end).
    pub end: usize,
}

impl Variable {
    /// `a.b` for the client's messages.
    pub fn name(&self) -> String {
        self.field.join(".")
    }

    /// It captures more than one segment (`{name=customers/*}`, `{path=**}`): a `/` in
    /// its text is a separator and stays.
    pub fn multi_segment(&self, segments: &[Segment]) -> bool {
        self.end - self.start > 1 || segments[self.start..self.end].contains(&Segment::Rest)
    }
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub segments: Vec<Segment>,
    pub variables: Vec<Variable>,
    /// The custom verb after the last `:` (`refund` in `/v1/payments/{id}:refund`).
    pub verb: Option<String>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Templates are absolute paths.
    #[error("it does not start with `/`")]
    NoLeadingSlash,
    /// `//`, a trailing `/`, `{}` or `=` with nothing after it.
    #[error("an empty segment")]
    EmptySegment,
    /// A `{` without its `}`.
    #[error("a `{{` is not closed")]
    Unclosed,
    /// A `{` inside a variable, or a `}` without its `{`.
    #[error("unbalanced braces at byte {0}")]
    Braces(usize),
    /// A variable that is only part of a segment, e.g. `x{id}`.
    #[error("`{0}`: a variable must be a whole segment")]
    PartialVariable(String),
    /// `**` followed by more segments.
    #[error("`**` must be the last segment")]
    RestNotLast,
    /// The field path of a variable is not `ident(.ident)*`.
    #[error("`{0}` is not a field path")]
    BadFieldPath(String),
    /// The same field bound twice.
    #[error("the field `{0}` is bound twice")]
    Duplicate(String),
    /// A `:` with nothing after it.
    #[error("an empty verb")]
    EmptyVerb,
}

/// Parses a template (see the module docs for the grammar).
pub fn parse(text: &str) -> Result<Template, TemplateError> {
    let body = text
        .strip_prefix('/')
        .ok_or(TemplateError::NoLeadingSlash)?;
    let (body, verb) = split_verb(body)?;
    let mut segments = Vec::new();
    let mut variables: Vec<Variable> = Vec::new();
    for piece in split_top(body)? {
        let Some(inner) = piece.strip_prefix('{') else {
            if piece.contains(['{', '}']) {
                return Err(TemplateError::PartialVariable(piece.into()));
            }
            segments.push(plain(piece)?);
            continue;
        };
        let inner = inner
            .strip_suffix('}')
            .ok_or_else(|| TemplateError::PartialVariable(piece.into()))?;
        let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
        let field: Vec<String> = field.split('.').map(str::to_string).collect();
        if !field.iter().all(|f| is_ident(f)) {
            return Err(TemplateError::BadFieldPath(inner.into()));
        }
        let start = segments.len();
        for p in pattern.split('/') {
            segments.push(plain(p)?);
        }
        let var = Variable {
            field,
            start,
            end: segments.len(),
        };
        if variables.iter().any(|v| v.field == var.field) {
            return Err(TemplateError::Duplicate(var.name()));
        }
        variables.push(var);
    }
    if let Some(i) = segments.iter().position(|s| *s == Segment::Rest) {
        if i + 1 != segments.len() {
            return Err(TemplateError::RestNotLast);
        }
    }
    Ok(Template {
        segments,
        variables,
        verb,
    })
}

/// The path and the verb: the text after the last `:` that is outside braces and after
/// the last `/`.
fn split_verb(body: &str) -> Result<(&str, Option<String>), TemplateError> {
    let mut depth = 0;
    let mut colon = None;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '/' if depth == 0 => colon = None,
            ':' if depth == 0 => colon = Some(i),
            _ => {}
        }
    }
    match colon {
        None => Ok((body, None)),
        Some(i) if i + 1 == body.len() => Err(TemplateError::EmptyVerb),
        Some(i) => Ok((&body[..i], Some(body[i + 1..].to_string()))),
    }
}

/// The segments at the top level: split at each `/` outside braces.
fn split_top(body: &str) -> Result<Vec<&str>, TemplateError> {
    let mut out = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' if depth == 0 => depth = 1,
            '{' => return Err(TemplateError::Braces(i + 1)),
            '}' if depth == 1 => depth = 0,
            '}' => return Err(TemplateError::Braces(i + 1)),
            '/' if depth == 0 => {
                out.push(&body[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(TemplateError::Unclosed);
    }
    out.push(&body[from..]);
    Ok(out)
}

fn plain(piece: &str) -> Result<Segment, TemplateError> {
    match piece {
        "" => Err(TemplateError::EmptySegment),
        "*" => Ok(Segment::One),
        "**" => Ok(Segment::Rest),
        p if p.contains(['{', '}', '=']) => Err(TemplateError::PartialVariable(p.into())),
        p => Ok(Segment::Literal(p.into())),
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a variable captured from a path: the raw text of its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The field path it sets.
    pub field: Vec<String>,
    /// Still percent-encoded; [`decode`] reads it.
    pub raw: String,
    /// `/` in the text is a separator and `%2F` stays encoded.
    pub multi_segment: bool,
}

impl Template {
    /// The variables' text if `path` (no query) matches, else none.
    pub fn matches(&self, path: &str) -> Option<Vec<Capture>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        let rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(rest);
        if parts.len() < fixed || (!rest && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segments[..fixed].iter().zip(&parts) {
            match seg {
                Segment::Literal(l) if l != part => return None,
                Segment::One if part.is_empty() => return None,
                _ => {}
            }
        }
        let captures = self.variables.iter().map(|v| {
            let end = if v.end == self.segments.len() && rest {
                parts.len()
            } else {
                v.end
            };
            Capture {
                field: v.field.clone(),
                raw: parts[v.start..end].join("/"),
                multi_segment: v.multi_segment(&self.segments),
            }
        });
        Some(captures.collect())
    }

    /// How specific a template is, for picking one when several match: a verb first,
    /// then more literal segments, then no `**`.
    pub fn rank(&self) -> (bool, usize, bool) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        (
            self.verb.is_some(),
            literals,
            !self.segments.contains(&Segment::Rest),
        )
    }
}

/// A captured value, percent-decoded (in a multi-segment capture, `%2F` stays as it is:
/// a decoded `/` would read as a separator); none if the bytes are not UTF-8.
pub fn decode(capture: &Capture) -> Option<String> {
    let raw = capture.raw.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while i < raw.len() {
        match raw[i..] {
            [b'%', h, l, ..] if hex(h).is_some() && hex(l).is_some() => {
                let byte = (hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8;
                if byte == b'/' && capture.multi_segment {
                    out.extend_from_slice(&raw[i..i + 3]);
                } else {
                    out.push(byte);
                }
                i += 3;
            }
            _ => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
