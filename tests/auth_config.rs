//! The verification flags: the two ways to name issuers and their JWKS,
//! the introspection flags and their secret file, and the max stale time.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use wsticket::config::{Cli, Command, Config, JwksSource, TokenKind};

fn parse(args: &[&str]) -> Result<Config, String> {
    let mut argv = vec!["wsticket", "serve", "--audience", "app"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|err| err.to_string())?;
    let Command::Serve(args) = cli.command else {
        return Err("not serve".into());
    };
    Config::from_args(*args).map_err(|err| err.to_string())
}

#[test]
fn short_form_shares_one_jwks() {
    let config = parse(&[
        "--issuer",
        "https://a.example",
        "--issuer",
        "https://b.example",
        "--jwks-url",
        "https://idp.example/jwks",
    ])
    .expect("valid");
    assert!(matches!(config.jwks, Some(JwksSource::Url(_))));
    assert_eq!(config.issuers.len(), 2);
    assert!(config.trusted_issuers.is_empty());
    assert_eq!(config.jwks_max_stale, Duration::from_secs(24 * 3600));
    assert_eq!(config.token_kind, TokenKind::Auto);
}

#[test]
fn trusted_issuers_need_no_issuer_flag() {
    let config = parse(&[
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks?v=1",
        "--trusted-issuer",
        "https://b.example=https://b.example/jwks",
    ])
    .expect("valid");
    assert!(config.jwks.is_none());
    assert_eq!(config.trusted_issuers.len(), 2);
    assert_eq!(config.trusted_issuers[0].issuer, "https://a.example");
    let JwksSource::Url(url) = &config.trusted_issuers[0].jwks else {
        panic!("a URL source");
    };
    assert_eq!(url.as_str(), "https://a.example/jwks?v=1");
}

#[test]
fn key_source_is_required() {
    let err = parse(&[]).expect_err("no key source");
    assert!(
        err.contains("--jwks-url") || err.contains("--trusted-issuer"),
        "{err}"
    );
    let err = parse(&["--issuer", "https://a.example"]).expect_err("issuer without JWKS");
    assert!(err.contains("jwks"), "{err}");
    let err = parse(&["--jwks-url", "https://idp.example/jwks"]).expect_err("JWKS without issuer");
    assert!(err.contains("issuer"), "{err}");
}

#[test]
fn malformed_trusted_issuer_rejected() {
    let err = parse(&["--trusted-issuer", "https://a.example"]).expect_err("no '='");
    assert!(err.contains("ISSUER=JWKS_URL"), "{err}");
    let err = parse(&["--trusted-issuer", "https://a.example=ftp://a.example/jwks"])
        .expect_err("bad scheme");
    assert!(err.contains("trusted-issuer"), "{err}");
}

#[test]
fn issuer_given_twice_rejected() {
    let err = parse(&[
        "--issuer",
        "https://a.example",
        "--jwks-url",
        "https://idp.example/jwks",
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks",
    ])
    .expect_err("issuer twice");
    assert!(err.contains("given twice"), "{err}");
}

#[test]
fn max_stale_below_refresh_max_rejected() {
    let err = parse(&[
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks",
        "--jwks-max-stale",
        "10m",
    ])
    .expect_err("max stale under refresh max");
    assert!(err.contains("jwks-max-stale"), "{err}");
}

#[test]
fn introspection_secret_read_from_file() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    writeln!(file, "  top-secret-value  ").expect("write");
    let path = file.path().to_str().expect("UTF-8 path").to_string();
    let config = parse(&[
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks",
        "--token-kind",
        "opaque",
        "--introspection-url",
        "https://a.example/introspect",
        "--introspection-client-id",
        "wsticket",
        "--introspection-client-secret-file",
        &path,
    ])
    .expect("valid");
    let introspection = config.introspection.as_ref().expect("configured");
    assert_eq!(introspection.client_secret.expose(), "top-secret-value");
    assert_eq!(introspection.cache_ttl, Duration::from_secs(60));
    assert!(!format!("{config:?}").contains("top-secret-value"));
}

#[test]
fn introspection_flags_go_together() {
    let err = parse(&[
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks",
        "--introspection-url",
        "https://a.example/introspect",
    ])
    .expect_err("no client credentials");
    assert!(err.contains("introspection-client"), "{err}");

    let err = parse(&[
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks",
        "--token-kind",
        "opaque",
    ])
    .expect_err("opaque without introspection");
    assert!(err.contains("introspection-url"), "{err}");

    let err = parse(&[
        "--trusted-issuer",
        "https://a.example=https://a.example/jwks",
        "--introspection-url",
        "https://a.example/introspect",
        "--introspection-client-id",
        "wsticket",
        "--introspection-client-secret-file",
        "/nonexistent/secret",
    ])
    .expect_err("missing secret file");
    assert!(err.contains("/nonexistent/secret"), "{err}");
}
