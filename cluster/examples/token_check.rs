//! What checking one API token costs: parse the bearer secret, find the token among
//! 1,000, verify its keyed hash, check its address and model globs. The gateway does
//! this (plus a rate-limit bucket and a usage count) on every request when auth is on.
//!
//! `cargo run --release -p cohort-cluster --example token_check`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use cohort_cluster::tokens::{glob_match, ip_allowed, parse_secret};
use cohort_cluster::{TokenKey, TokenRecord, TokenRole, TokenStatus};

fn main() {
    let key = TokenKey::from_cookie("bench cookie");
    let mut table = BTreeMap::new();
    let mut secret = String::new();
    for i in 0..1000 {
        let m = key.mint().expect("randomness");
        if i == 500 {
            secret = m.secret.clone();
        }
        table.insert(
            m.id.clone(),
            TokenRecord {
                id: m.id,
                name: format!("t{i}"),
                key_hash: m.hash,
                role: TokenRole::User,
                allowed_models: vec!["bert-*".into(), "ml?".into()],
                ip_allow: vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()],
                rate_per_minute: Some(600),
                monthly_quota: Some(1_000_000),
                used: 0,
                used_month: 0,
                expires_at_ms: None,
                status: TokenStatus::Active,
                created_at_ms: 0,
                created_by: "bench".into(),
            },
        );
    }
    let ip = "127.0.0.1".parse().expect("ip");
    let n = 1_000_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let (id, k) = parse_secret(black_box(&secret)).expect("secret");
        let t = table.get(id).expect("token");
        let ok = key.verify(k, &t.key_hash)
            && ip_allowed(&t.ip_allow, ip)
            && t.allowed_models
                .iter()
                .any(|p| glob_match(p, black_box("mlp")));
        assert!(ok);
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((n as f64 - 1.0) * p) as usize];
    println!(
        "token check, {n} runs: p50 {} ns, p90 {} ns, p99 {} ns, max {} ns",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        samples[n - 1]
    );
}
