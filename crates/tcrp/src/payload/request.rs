//! A REQUEST payload: its three forms, the keys of the JSON-object one, and the capabilities
//! a client may ask for.

use serde::Deserialize;
use serde_json::Value;

use super::malformed;
use super::reply::{json_string, write_object};
use crate::{names, Error};

/// Optional capabilities a client asks for in its JSON-object request (`"caps": [...]`).
/// Unknown names are ignored. A client that sends no caps sees only original frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Caps(u8);

impl Caps {
    /// `"notices"`: join/leave notices for the room.
    pub const NOTICES: Caps = Caps(0x01);
    /// `"seq"`: relayed messages carry a per-room sequence number.
    pub const SEQ: Caps = Caps(0x02);
    /// `"batch"`: several messages may arrive in one datagram.
    pub const BATCH: Caps = Caps(0x04);
    const NAMES: [(&'static str, Caps); 3] = [
        ("notices", Caps::NOTICES),
        ("seq", Caps::SEQ),
        ("batch", Caps::BATCH),
    ];
    /// Every capability this version knows: the union of [`Caps::NAMES`].
    const KNOWN: Caps = Caps::known();

    const fn known() -> Caps {
        let mut all = Caps::none();
        let mut i = 0;
        while i < Caps::NAMES.len() {
            all = all.with(Caps::NAMES[i].1);
            i += 1;
        }
        all
    }

    /// No capabilities: an original client.
    pub const fn none() -> Caps {
        Caps(0)
    }
    /// Whether every capability in `other` is present.
    pub const fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether no capability is present.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The union of two sets.
    pub const fn with(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }
    /// The raw bit set, for persistence.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Rebuilds a set from [`Caps::bits`], dropping unknown bits.
    pub const fn from_bits(bits: u8) -> Caps {
        Caps(bits & Caps::KNOWN.0)
    }
    /// Builds a set from wire names, ignoring names it does not know.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Caps {
        names.into_iter().fold(Caps::none(), |caps, name| {
            match Caps::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, cap)) => caps.with(*cap),
                None => caps,
            }
        })
    }
    /// The wire names of the capabilities present.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Caps::NAMES
            .into_iter()
            .filter(move |(_, cap)| self.contains(*cap))
            .map(|(name, _)| name)
    }
}

/// Which form a REQUEST payload had; the server treats original-form members exactly as the
/// original server did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestForm {
    /// A JSON string: the original client.
    JsonString,
    /// A JSON object: an ocm-aware client.
    JsonObject,
    /// Plain UTF-8 text.
    Text,
}

/// A decoded REQUEST payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The username; may be empty or invalid (check with [`crate::names::check_username`]).
    pub username: String,
    /// The payload's form.
    pub form: RequestForm,
    /// Seconds between the client's keepalive REGISTERs, if it promises them.
    pub keepalive_secs: Option<u32>,
    /// Extensions the client understands.
    pub caps: Caps,
    /// The largest server datagram this client accepts, in bytes (`"max_datagram"`): the cap
    /// on its batch frames. `None`: [`DEFAULT_MAX_DATAGRAM`].
    pub max_datagram: Option<u16>,
    /// Room password (create sets it, join must match it).
    pub password: Option<String>,
    /// Create: whether the room shows in room listings (default true).
    pub listed: Option<bool>,
    /// History: return messages with a sequence number below this.
    pub before: Option<u64>,
    /// History: at most this many messages.
    pub limit: Option<u32>,
    /// History: the requester's member token (history is for members only).
    pub token: Option<String>,
}

impl Request {
    /// A request in the original client's form.
    pub fn original(username: &str) -> Request {
        Request {
            username: username.to_owned(),
            form: RequestForm::JsonString,
            keepalive_secs: None,
            caps: Caps::none(),
            max_datagram: None,
            password: None,
            listed: None,
            before: None,
            limit: None,
            token: None,
        }
    }

    /// Appends the payload bytes for this request: a bare JSON string when nothing but the
    /// username is set (exactly what the original client sends), else a JSON object.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let plain = self.keepalive_secs.is_none()
            && self.caps.is_empty()
            && self.max_datagram.is_none()
            && self.password.is_none()
            && self.listed.is_none()
            && self.before.is_none()
            && self.limit.is_none()
            && self.token.is_none();
        if plain && self.form != RequestForm::JsonObject {
            out.extend_from_slice(json_string(&self.username).as_bytes());
            return;
        }
        let mut fields: Vec<(&str, Value)> =
            vec![("username", Value::from(self.username.as_str()))];
        if let Some(k) = self.keepalive_secs {
            fields.push(("keepalive", Value::from(k)));
        }
        if !self.caps.is_empty() {
            fields.push(("caps", Value::from(self.caps.names().collect::<Vec<_>>())));
        }
        if let Some(m) = self.max_datagram {
            fields.push(("max_datagram", Value::from(m)));
        }
        if let Some(p) = &self.password {
            fields.push(("password", Value::from(p.as_str())));
        }
        if let Some(l) = self.listed {
            fields.push(("listed", Value::from(l)));
        }
        if let Some(b) = self.before {
            fields.push(("before", Value::from(b)));
        }
        if let Some(l) = self.limit {
            fields.push(("limit", Value::from(l)));
        }
        if let Some(t) = &self.token {
            fields.push(("token", Value::from(t.as_str())));
        }
        write_object(&fields, out);
    }
}

impl Request {
    /// A request for an extension operation (list, presence, history), to be written with
    /// [`Request::encode_query`]: set `token`, `password`, `before` and `limit` as the
    /// operation needs.
    pub fn query() -> Request {
        Request {
            form: RequestForm::JsonObject,
            ..Request::original("")
        }
    }

    /// Appends the payload of an extension request: a JSON object of `token`, `password`,
    /// `before` and `limit`, those that are set, in that order (`{}` when none is). The
    /// username and the create/join keys are left out: those operations do not read them.
    pub fn encode_query(&self, out: &mut Vec<u8>) {
        let mut fields: Vec<(&str, Value)> = Vec::new();
        if let Some(t) = &self.token {
            fields.push(("token", Value::from(t.as_str())));
        }
        if let Some(p) = &self.password {
            fields.push(("password", Value::from(p.as_str())));
        }
        if let Some(b) = self.before {
            fields.push(("before", Value::from(b)));
        }
        if let Some(l) = self.limit {
            fields.push(("limit", Value::from(l)));
        }
        write_object(&fields, out);
    }
}

#[derive(Deserialize)]
struct ObjectRequest {
    #[serde(default)]
    username: String,
    keepalive: Option<u32>,
    #[serde(default)]
    caps: Vec<String>,
    max_datagram: Option<u64>,
    #[serde(default, deserialize_with = "password_field")]
    password: Option<String>,
    listed: Option<bool>,
    before: Option<u64>,
    limit: Option<u32>,
    token: Option<String>,
}

/// `"password"`: a string, or null for none. Anything else is refused without quoting it (a
/// type error would show the value in the reply and the logs, and it may be a password).
fn password_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::String(password) => Ok(Some(password)),
        Value::Null => Ok(None),
        _ => Err(serde::de::Error::custom("\"password\" must be a string")),
    }
}

/// The largest server datagram a client accepts when it does not say (`"max_datagram"`):
/// the original client reads with a 4096-byte buffer.
pub const DEFAULT_MAX_DATAGRAM: u16 = 4096;
/// The smallest `"max_datagram"` a client may announce.
pub const MIN_MAX_DATAGRAM: u16 = 512;
/// The largest `"max_datagram"` a client may announce: the most an IPv4 UDP datagram carries.
pub const MAX_MAX_DATAGRAM: u16 = 65507;

fn check_max_datagram(value: u64) -> Result<u16, Error> {
    match u16::try_from(value) {
        Ok(v) if (MIN_MAX_DATAGRAM..=MAX_MAX_DATAGRAM).contains(&v) => Ok(v),
        _ => Err(Error::OutOfRange {
            field: "max_datagram",
            min: MIN_MAX_DATAGRAM.into(),
            max: MAX_MAX_DATAGRAM.into(),
            value,
        }),
    }
}

/// Whether text that is not JSON still begins like a JSON object: `{` after any white space
/// (Unicode's, not only JSON's four) and any characters that show as nothing or change how text
/// around them shows: [`names::is_invisible`] (a byte-order mark, a zero-width space),
/// [`names::is_modifier`] (a zero-width joiner, a variation selector) and
/// [`names::is_reordering`] (a bidirectional control). That is wider than
/// [`names::hidden_chars`], which keeps a modifier that follows a non-ASCII letter; here every
/// leading one is skipped. Such a payload is a JSON object gone wrong, and taken whole as a
/// name it would keep its password as the host's name for anyone to read.
fn begins_like_an_object(text: &str) -> bool {
    text.trim_start_matches(|c: char| {
        c.is_whitespace()
            || names::is_invisible(c)
            || names::is_modifier(c)
            || names::is_reordering(c)
    })
    .starts_with('{')
}

/// Decodes a REQUEST payload (see the module docs for the three forms).
pub fn parse_request(payload: &[u8]) -> Result<Request, Error> {
    let text = std::str::from_utf8(payload).map_err(|_| Error::PayloadNotUtf8)?;
    let mut request = Request::original("");
    match serde_json::from_str::<Value>(text) {
        Ok(Value::String(name)) => request.username = name,
        Ok(object @ Value::Object(_)) => {
            let parsed: ObjectRequest = serde_json::from_value(object).map_err(malformed)?;
            request = Request {
                username: parsed.username,
                form: RequestForm::JsonObject,
                keepalive_secs: parsed.keepalive,
                caps: Caps::from_names(parsed.caps.iter().map(String::as_str)),
                max_datagram: parsed.max_datagram.map(check_max_datagram).transpose()?,
                password: parsed.password,
                listed: parsed.listed,
                before: parsed.before,
                limit: parsed.limit,
                token: parsed.token,
            };
        }
        Err(e) if begins_like_an_object(text) => {
            let hidden = match text.chars().next() {
                Some(c) if c != '{' && !c.is_whitespace() => {
                    format!(
                        "; it begins with U+{:04X}, which JSON does not allow",
                        c as u32
                    )
                }
                _ => String::new(),
            };
            return Err(Error::MalformedJson {
                reason: format!(
                    "the payload begins like a JSON object but is not JSON ({e}{hidden})"
                ),
            });
        }
        _ => match json_string_with_lone_surrogates(text) {
            Some(name) => request.username = name,
            None => {
                request.username = text.to_owned();
                request.form = RequestForm::Text;
            }
        },
    }
    Ok(request)
}

/// A JSON string that a strict parser refuses only for a `\u` escape of a lone surrogate
/// (`"\udce9t\u00e9"`), with each such surrogate read as U+FFFD; `None` for anything else.
/// That is what the original client sends for a name it read from bytes that were not UTF-8
/// in its locale: Python keeps each such byte as a lone surrogate (`surrogateescape`), and
/// `json.dumps` writes it as an escape. Such a name shows as `ocm` shows such bytes in chat,
/// rather than as its JSON text, quotes and escapes included.
fn json_string_with_lone_surrogates(text: &str) -> Option<String> {
    let mut parser = serde_json::Deserializer::from_str(text);
    // serde_json reads a string as bytes in WTF-8: a lone surrogate as its three bytes.
    let wtf8 = serde::Deserializer::deserialize_bytes(&mut parser, BytesVisitor).ok()?;
    parser.end().ok()?;
    Some(wtf8_lossy(&wtf8))
}

/// Reads a JSON string as bytes; any other JSON value is refused.
struct BytesVisitor;

impl<'de> serde::de::Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON string")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        Ok(bytes.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(bytes)
    }
}

/// UTF-8 from WTF-8: each surrogate's three bytes (`ED A0..BF 80..BF`) become one U+FFFD,
/// as does any other sequence that is not UTF-8 (none comes from a JSON parser).
fn wtf8_lossy(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(rest) => {
                out.push_str(rest);
                return out;
            }
            Err(e) => {
                let (valid, bad) = bytes.split_at(e.valid_up_to());
                // `valid` is UTF-8 up to the error, by from_utf8's word.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                out.push(char::REPLACEMENT_CHARACTER);
                let skip = match bad {
                    [0xED, 0xA0..=0xBF, 0x80..=0xBF, ..] => 3,
                    _ => e.error_len().unwrap_or(bad.len()),
                };
                bytes = &bad[skip..];
            }
        }
    }
}
