//! Who may join a room: signed access tokens (JSON Web Tokens), checked once per connection, at
//! the join. Nothing here touches the per-message path: a member's rights travel into the room
//! as an [`Access`] with its join.
//!
//! A relay started with a key (`--auth-key`, an HMAC-SHA256 secret, or `--auth-public-key`, an
//! Ed25519 public key in PEM, so the relay never holds the signing key) admits a connection only
//! with a token (the `token` query parameter of the WebSocket URL) that it signed, that has not
//! expired, and whose room claim covers the room joined. The claims:
//!
//! | claim | meaning |
//! | --- | --- |
//! | `sub` | the user's id (required); one user's members hold at most `--max-members-per-user` places in a room |
//! | `name` | the display name peers see; the member cannot change it (optional: without it, the member names itself) |
//! | `room` | the one room the token opens, by its exact name ... |
//! | `roomPrefix` | ... or every room whose name begins with this (`team-42/`); it must end with a separator, anything but a letter or a digit, or the token is refused |
//! | `access` | `"read"` or `"write"` (write includes read) |
//! | `exp` | the expiry, in seconds since the Unix epoch (required): the connection is closed then |
//! | `nbf` | not before, in seconds since the Unix epoch (optional; a minute of leeway) |
//! | `aud` | the services the token is for (a string or a list): with `--auth-audience`, it must name that one; without, a token that has one is refused |
//! | `iss` | who issued the token: with `--auth-issuer`, it must be that one |
//!
//! `aud` and `iss` matter where one key signs tokens for more than one service: without them, a
//! token minted for another service opens every room it names here too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pattern_mesh_core::room::Access;
use pattern_mesh_core::wire::close;
use serde::Deserialize;

/// How the relay checks tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKey {
    /// An HMAC-SHA256 secret, shared with whoever issues tokens.
    Secret(String),
    /// An Ed25519 public key, PEM-encoded: the issuer keeps the private key.
    Ed25519Pem(String),
}

/// The relay's token checker.
#[derive(Clone)]
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    /// The audience tokens must name (`--auth-audience`), if one is set.
    audience: Option<String>,
    /// The issuer tokens must come from (`--auth-issuer`), if one is set.
    issuer: Option<String>,
}

/// A token's claims (see the module's table).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    room_prefix: Option<String>,
    access: Right,
    exp: u64,
    /// The services the token is for: a string or a list of strings (checked by hand:
    /// jsonwebtoken takes an `aud` of another shape for none at all).
    #[serde(default)]
    aud: Option<serde_json::Value>,
    /// Who issued the token: one string (checked by hand: jsonwebtoken takes a list, and
    /// passes it if any of it matches).
    #[serde(default)]
    iss: Option<serde_json::Value>,
    /// Not before (seconds since the epoch), if given.
    #[serde(default)]
    nbf: Option<u64>,
}

/// How far ahead of the relay's clock a token's `nbf` may be: issuers set it to the time they
/// sign, and their clock may run a little ahead of the relay's.
const NBF_LEEWAY: u64 = 60;

/// The latest expiry a token may have, in seconds since 1970: the end of the year 9999.
const LAST_EXP: u64 = 253_402_300_799;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Right {
    Read,
    Write,
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user's id.
    pub user: String,
    /// The display name, if the token sets it.
    pub name: Option<String>,
    /// What the member may do.
    pub access: Access,
    /// When the token expires.
    pub expires: SystemTime,
    room: Option<String>,
    room_prefix: Option<String>,
}

/// Why a connection was refused: the close code and the reason it is closed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The close code: [`close::FORBIDDEN`], or [`close::TOKEN_EXPIRED`].
    pub code: u16,
    /// Why, for the close frame.
    pub reason: String,
}

/// A token's user as [`Access::user`]: the first 64 bits of the SHA-256 of its `sub`, never 0.
///
/// Two users with one hash would be one user to the relay: one's resume token would take the
/// other's node back, and they would share the per-user caps and budgets. Finding a `sub` of
/// another user's hash costs about 2^64 tries; a fast non-cryptographic hash such as FNV has
/// collisions a laptop finds in minutes.
pub fn user_hash(user: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, user.as_bytes());
    let mut first = [0; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first).max(1)
}

fn denied(reason: impl Into<String>) -> Denied {
    Denied {
        code: close::FORBIDDEN,
        reason: reason.into(),
    }
}

impl Auth {
    /// A checker for `key` that takes tokens for `audience` from `issuer` (see the module's
    /// table); an error says what is wrong with the key.
    pub fn new(
        key: &AuthKey,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<Self, String> {
        let (key, algorithm) = match key {
            AuthKey::Secret(secret) if secret.len() < 32 => {
                return Err(format!(
                    "the auth key is {} bytes; an HMAC-SHA256 secret needs at least 32",
                    secret.len()
                ))
            }
            AuthKey::Secret(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            AuthKey::Ed25519Pem(pem) => (
                DecodingKey::from_ed_pem(pem.as_bytes())
                    .map_err(|e| format!("the auth public key is not an Ed25519 PEM key: {e}"))?,
                Algorithm::EdDSA,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        // Checked by hand, with a leeway: see `NBF_LEEWAY`.
        validation.validate_nbf = false;
        // Checked by hand: see `Claims::aud` and `Claims::iss`.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            key,
            validation,
            audience: audience.map(str::to_owned),
            issuer: issuer.map(str::to_owned),
        })
    }

    /// Checks a connection's token: its signature, its expiry and its claims.
    pub fn check(&self, token: Option<&str>) -> Result<Grant, Denied> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(denied(
                "this relay requires an access token (the token parameter of the URL)",
            ));
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Denied {
                    code: close::TOKEN_EXPIRED,
                    reason: "the access token expired".into(),
                },
                ErrorKind::InvalidSignature => denied("the access token's signature is not valid"),
                ErrorKind::InvalidAlgorithm => {
                    denied("the access token is signed with another algorithm than this relay's")
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    denied(format!("the access token has no {claim} claim"))
                }
                _ => denied(format!("the access token is not valid: {e}")),
            })?
            .claims;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if claims.nbf.is_some_and(|nbf| nbf > now + NBF_LEEWAY) {
            return Err(denied("the access token is not valid yet (its nbf claim)"));
        }
        self.check_audience(claims.aud.as_ref())?;
        self.check_issuer(claims.iss.as_ref())?;
        if claims.room.is_none() && claims.room_prefix.is_none() {
            return Err(denied(
                "the access token names no room (room or roomPrefix)",
            ));
        }
        if let Some(prefix) = &claims.room_prefix {
            check_prefix(prefix)?;
        }
        Ok(Grant {
            access: Access {
                write: claims.access == Right::Write,
                fixed_name: claims.name.is_some(),
                user: user_hash(&claims.sub),
            },
            user: claims.sub,
            name: claims.name,
            // An `exp` past what a system time holds ("never", to its issuer) is the last
            // second of the year 9999.
            expires: UNIX_EPOCH + Duration::from_secs(claims.exp.min(LAST_EXP)),
            room: claims.room,
            room_prefix: claims.room_prefix,
        })
    }

    /// A token whose `aud` does not name this relay's audience is refused, and so is any token
    /// with an `aud` when the relay has no audience: it was minted for another service (RFC
    /// 7519 §4.1.3). An `aud` of null counts as none.
    fn check_audience(&self, aud: Option<&serde_json::Value>) -> Result<(), Denied> {
        use serde_json::Value;
        let named: Vec<&str> = match aud {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(one)) => vec![one],
            Some(Value::Array(many)) => many
                .iter()
                .map(Value::as_str)
                .collect::<Option<_>>()
                .ok_or_else(|| denied(NOT_AN_AUDIENCE))?,
            Some(_) => return Err(denied(NOT_AN_AUDIENCE)),
        };
        match (&self.audience, aud.is_some_and(|a| !a.is_null())) {
            (None, false) => Ok(()),
            (None, true) => Err(denied(
                "the access token is for another service (its aud claim; this relay has no --auth-audience)",
            )),
            (Some(_), false) => Err(denied("the access token has no aud claim")),
            (Some(audience), true) if named.contains(&audience.as_str()) => Ok(()),
            (Some(audience), true) => Err(denied(format!(
                "the access token is for another service (its aud claim does not name {audience:?})"
            ))),
        }
    }

    /// With an issuer set, a token must name exactly it in `iss`, a string (RFC 7519 §4.1.1).
    fn check_issuer(&self, iss: Option<&serde_json::Value>) -> Result<(), Denied> {
        let Some(issuer) = &self.issuer else {
            return Ok(());
        };
        match iss {
            None => Err(denied("the access token has no iss claim")),
            Some(serde_json::Value::String(iss)) if iss == issuer => Ok(()),
            Some(serde_json::Value::String(_)) => Err(denied(format!(
                "the access token comes from another issuer than {issuer:?} (its iss claim)"
            ))),
            Some(_) => Err(denied("the access token's iss claim is not a string")),
        }
    }
}

/// A `roomPrefix` must end with a separator (`/`, `:`, `-`, anything but a letter or a digit):
/// `team-42` would open `team-420/notes` as well as `team-42/notes`, and an empty prefix every
/// room of the relay. Such a token is refused rather than read as its issuer may have meant it.
fn check_prefix(prefix: &str) -> Result<(), Denied> {
    // Close reasons hold 123 bytes: these name no prefix.
    match prefix.chars().last() {
        None => Err(denied(
            "the access token's roomPrefix is empty: it would open every room",
        )),
        Some(last) if last.is_alphanumeric() => Err(denied(
            "the access token's roomPrefix ends in a letter or digit, so it opens rooms of other names too; end it with \"/\"",
        )),
        Some(_) => Ok(()),
    }
}

/// Why a token whose `aud` has neither shape RFC 7519 allows is refused.
const NOT_AN_AUDIENCE: &str = "the access token's aud claim is not a string or a list of strings";

impl Grant {
    /// Whether the token opens `room`; if not, why.
    pub fn admits(&self, room: &str) -> Result<(), Denied> {
        let exact = self.room.as_deref() == Some(room);
        let prefixed = self
            .room_prefix
            .as_deref()
            .is_some_and(|prefix| room.starts_with(prefix));
        if exact || prefixed {
            return Ok(());
        }
        let opens = match (&self.room, &self.room_prefix) {
            (Some(room), _) => format!("the room {room:?}"),
            (None, Some(prefix)) => format!("the rooms under {prefix:?}"),
            (None, None) => "no room".into(),
        };
        Err(denied(format!(
            "the access token opens {opens}, not {room:?}"
        )))
    }

    /// How long until the token expires (zero if it has).
    pub fn remaining(&self) -> Duration {
        self.expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

/// The `token` parameter of a URL's query, if any.
pub fn token_of(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "a development secret of 32 bytes!";

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn later() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    }

    #[test]
    fn a_token_grants_its_room_its_rights_and_its_name() {
        let auth = Auth::new(&AuthKey::Secret(SECRET.into()), None, None).unwrap();
        let grant = auth
            .check(Some(&token(serde_json::json!({
                "sub": "u1", "name": "Ada", "roomPrefix": "team-42/", "access": "read", "exp": later()
            }))))
            .unwrap();
        assert_eq!(grant.user, "u1");
        assert_eq!(grant.name.as_deref(), Some("Ada"));
        assert_eq!(
            grant.access,
            Access {
                write: false,
                fixed_name: true,
                user: user_hash("u1"),
            }
        );
        assert!(grant.admits("team-42/doc").is_ok());
        let other = grant.admits("team-43/doc").unwrap_err();
        assert_eq!(other.code, close::FORBIDDEN);
        assert_eq!(
            other.reason,
            r#"the access token opens the rooms under "team-42/", not "team-43/doc""#
        );
    }

    #[test]
    fn each_bad_token_is_refused_with_a_reason_that_says_why() {
        let auth = Auth::new(&AuthKey::Secret(SECRET.into()), None, None).unwrap();
        let check = |token: Option<&str>| auth.check(token).unwrap_err();
        assert!(check(None).reason.contains("requires an access token"));
        let expired = check(Some(&token(serde_json::json!({
            "sub": "u1", "room": "r", "access": "write", "exp": 1_000
        }))));
        assert_eq!(expired.code, close::TOKEN_EXPIRED);
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "u1", "room": "r", "access": "write", "exp": later() }),
            &EncodingKey::from_secret(b"another secret, also of 32 bytes"),
        )
        .unwrap();
        assert_eq!(
            check(Some(&forged)).reason,
            "the access token's signature is not valid"
        );
        assert!(check(Some("not.a.token"))
            .reason
            .starts_with("the access token is not valid"));
        let roomless = token(serde_json::json!({ "sub": "u1", "access": "write", "exp": later() }));
        assert!(check(Some(&roomless)).reason.contains("names no room"));
        assert!(Auth::new(&AuthKey::Secret("short".into()), None, None).is_err());
        assert_eq!(token_of(Some("a=1&token=xyz")), Some("xyz"));
        assert_eq!(token_of(Some("a=1")), None);
    }
}
