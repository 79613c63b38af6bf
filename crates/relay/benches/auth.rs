//! What checking an access token costs a join (it is checked once per connection, never per
//! message): an HS256 token and an EdDSA (Ed25519) token, signature, expiry and claims.

use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pattern_mesh_relay::auth::Auth;
use pattern_mesh_relay::AuthKey;

#[path = "../tests/common/ed25519.rs"]
mod ed25519;

fn claims() -> serde_json::Value {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3_600;
    serde_json::json!({ "sub": "user-1", "name": "Ada", "room": "doc", "access": "write", "exp": exp })
}

fn tokens(c: &mut Criterion) {
    let secret = "a benchmark secret of 32 bytes!!";
    let hs = Auth::new(&AuthKey::Secret(secret.into()), None, None).unwrap();
    let hs_token = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    c.bench_function("token check per join: HS256", |b| {
        b.iter(|| hs.check(Some(&hs_token)).unwrap().admits("doc").unwrap())
    });

    let (pkcs8, pem) = ed25519::key_pair();
    let ed = Auth::new(&AuthKey::Ed25519Pem(pem), None, None).unwrap();
    let ed_token = encode(
        &Header::new(Algorithm::EdDSA),
        &claims(),
        &EncodingKey::from_ed_der(&pkcs8),
    )
    .unwrap();
    c.bench_function("token check per join: EdDSA", |b| {
        b.iter(|| ed.check(Some(&ed_token)).unwrap().admits("doc").unwrap())
    });
}

criterion_group!(benches, tokens);
criterion_main!(benches);
