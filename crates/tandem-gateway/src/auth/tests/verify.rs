//! Which tokens a verifier accepts and which it refuses, and why.

use super::*;

#[test]
fn test_auth_accepts_valid_hs256_token() {
    let exp = now() + 600;
    let token = hs256(&json!({ "sub": "alice", "exp": exp }));
    let identity = verifier(&hs_config()).verify(&token).unwrap();
    assert_eq!(
        identity,
        Identity {
            sub: "alice".to_owned(),
            expires_at: exp
        }
    );
}

#[test]
fn test_auth_accepts_valid_rs256_token() {
    let token = rs256(RSA_PRIVATE, &claims());
    let identity = verifier(&rsa_config()).verify(&token).unwrap();
    assert_eq!(identity.sub, "alice");
}

#[test]
fn test_auth_accepts_valid_es256_token() {
    let token = es256(EC_PRIVATE, &claims());
    let identity = verifier(&ec_config()).verify(&token).unwrap();
    assert_eq!(identity.sub, "alice");
}

#[test]
fn test_auth_tries_every_key_of_the_token_algorithm() {
    let config = AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        rs256_public_keys: vec![RSA_OTHER_PUBLIC.to_vec(), RSA_PUBLIC.to_vec()],
        es256_public_keys: vec![EC_OTHER_PUBLIC.to_vec(), EC_PUBLIC.to_vec()],
        ..AuthConfig::default()
    };
    let verifier = verifier(&config);
    for token in [
        hs256(&claims()),
        rs256(RSA_PRIVATE, &claims()),
        rs256(RSA_OTHER_PRIVATE, &claims()),
        es256(EC_PRIVATE, &claims()),
        es256(EC_OTHER_PRIVATE, &claims()),
    ] {
        assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
    }
}

#[test]
fn test_auth_rejects_token_expired_beyond_leeway() {
    let token = hs256(&json!({ "sub": "alice", "exp": now() - 31 - 5 }));
    assert_eq!(
        verifier(&hs_config()).verify(&token),
        Err(AuthError::Expired)
    );
}

#[test]
fn test_auth_accepts_token_expired_within_leeway() {
    let token = hs256(&json!({ "sub": "alice", "exp": now() - 20 }));
    assert!(verifier(&hs_config()).verify(&token).is_ok());

    let strict = AuthConfig {
        leeway_secs: 0,
        ..hs_config()
    };
    assert_eq!(verifier(&strict).verify(&token), Err(AuthError::Expired));
}

#[test]
fn test_auth_rejects_nbf_in_future() {
    let token = hs256(&json!({ "sub": "alice", "exp": now() + 600, "nbf": now() + 120 }));
    assert_eq!(
        verifier(&hs_config()).verify(&token),
        Err(AuthError::NotYetValid)
    );
}

#[test]
fn test_auth_accepts_nbf_within_leeway() {
    let token = hs256(&json!({ "sub": "alice", "exp": now() + 600, "nbf": now() + 10 }));
    assert!(verifier(&hs_config()).verify(&token).is_ok());
}

#[test]
fn test_auth_rejects_missing_exp() {
    let token = hs256(&json!({ "sub": "alice" }));
    assert_eq!(
        verifier(&hs_config()).verify(&token),
        Err(AuthError::MissingClaim("exp"))
    );
}

#[test]
fn test_auth_rejects_non_numeric_exp() {
    let token = hs256(&json!({ "sub": "alice", "exp": "tomorrow" }));
    assert!(verifier(&hs_config()).verify(&token).is_err());
    let token = hs256(&json!({ "sub": "alice", "exp": -5 }));
    assert!(verifier(&hs_config()).verify(&token).is_err());
}

#[test]
fn test_auth_rejects_wrong_hs256_secret() {
    let token = hmac_token(Algorithm::HS256, OTHER_SECRET, &claims());
    assert_eq!(
        verifier(&hs_config()).verify(&token),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_rejects_rs256_signed_by_other_key() {
    let token = rs256(RSA_OTHER_PRIVATE, &claims());
    assert_eq!(
        verifier(&rsa_config()).verify(&token),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_rejects_es256_signed_by_other_key() {
    let token = es256(EC_OTHER_PRIVATE, &claims());
    assert_eq!(
        verifier(&ec_config()).verify(&token),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_rejects_tampered_payload() {
    let token = hs256(&claims());
    let mut parts = token.split('.').collect::<Vec<_>>();
    let forged = b64url(
        json!({ "sub": "root", "exp": now() + 600 })
            .to_string()
            .as_bytes(),
    );
    parts[1] = &forged;
    assert_eq!(
        verifier(&hs_config()).verify(&parts.join(".")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_rejects_alg_none() {
    let config = AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
        es256_public_keys: vec![EC_PUBLIC.to_vec()],
        ..AuthConfig::default()
    };
    let verifier = verifier(&config);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({ "alg": alg, "typ": "JWT" });
        for sig in ["", "AAAA"] {
            let token = raw_token(&header, &claims(), sig);
            assert_eq!(
                verifier.verify(&token),
                Err(AuthError::UnsupportedAlgorithm(alg.to_owned())),
                "{token}"
            );
        }
    }
}

#[test]
fn test_auth_rejects_hs256_signed_with_rsa_pem_when_only_rsa_configured() {
    let token = hmac_token(Algorithm::HS256, RSA_PUBLIC, &claims());
    assert_eq!(
        verifier(&rsa_config()).verify(&token),
        Err(AuthError::UnsupportedAlgorithm("HS256".to_owned()))
    );
}

#[test]
fn test_auth_rejects_hs256_signed_with_rsa_pem_when_secret_and_rsa_configured() {
    let config = AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
        ..AuthConfig::default()
    };
    let token = hmac_token(Algorithm::HS256, RSA_PUBLIC, &claims());
    assert_eq!(
        verifier(&config).verify(&token),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_rejects_hs256_signed_with_ec_pem_when_only_ec_configured() {
    let token = hmac_token(Algorithm::HS256, EC_PUBLIC, &claims());
    assert_eq!(
        verifier(&ec_config()).verify(&token),
        Err(AuthError::UnsupportedAlgorithm("HS256".to_owned()))
    );
}

#[test]
fn test_auth_rejects_hs384_and_hs512() {
    let verifier = verifier(&hs_config());
    for (alg, name) in [(Algorithm::HS384, "HS384"), (Algorithm::HS512, "HS512")] {
        let token = hmac_token(alg, SECRET, &claims());
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::UnsupportedAlgorithm(name.to_owned()))
        );
    }
}

#[test]
fn test_auth_rejects_other_rsa_and_ec_algorithms() {
    let config = AuthConfig {
        rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
        es256_public_keys: vec![EC_PUBLIC.to_vec()],
        ..AuthConfig::default()
    };
    let verifier = verifier(&config);
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    for (alg, name) in [
        (Algorithm::PS256, "PS256"),
        (Algorithm::RS384, "RS384"),
        (Algorithm::RS512, "RS512"),
    ] {
        let token = sign(alg, &rsa, &claims());
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::UnsupportedAlgorithm(name.to_owned()))
        );
    }
    for name in ["ES384", "EdDSA", "HS1", ""] {
        let token = raw_token(&json!({ "alg": name }), &claims(), "AAAA");
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::UnsupportedAlgorithm(name.to_owned()))
        );
    }
}

#[test]
fn test_auth_rejects_algorithm_without_configured_key() {
    let token = rs256(RSA_PRIVATE, &claims());
    assert_eq!(
        verifier(&hs_config()).verify(&token),
        Err(AuthError::UnsupportedAlgorithm("RS256".to_owned()))
    );
    let token = es256(EC_PRIVATE, &claims());
    assert_eq!(
        verifier(&rsa_config()).verify(&token),
        Err(AuthError::UnsupportedAlgorithm("ES256".to_owned()))
    );
}

#[test]
fn test_auth_rejects_rs256_header_on_es256_signature() {
    // An ES256 signature relabelled RS256 must be checked as RS256, and fail.
    let config = AuthConfig {
        rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
        es256_public_keys: vec![EC_PUBLIC.to_vec()],
        ..AuthConfig::default()
    };
    let token = es256(EC_PRIVATE, &claims());
    let sig = token.rsplit('.').next().unwrap();
    let relabelled = raw_token(&json!({ "alg": "RS256" }), &claims(), sig);
    assert_eq!(
        verifier(&config).verify(&relabelled),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_sanitizes_echoed_algorithm() {
    let alg = format!("x\n\u{1b}[31m{}", "A".repeat(100));
    let token = raw_token(&json!({ "alg": alg }), &claims(), "");
    let Err(AuthError::UnsupportedAlgorithm(shown)) = verifier(&hs_config()).verify(&token) else {
        panic!("expected an unsupported algorithm");
    };
    assert_eq!(shown.chars().count(), MAX_ECHOED_ALG_CHARS);
    assert!(shown.chars().all(|c| c.is_ascii_graphic()), "{shown}");
}

#[test]
fn test_auth_checks_issuer_when_configured() {
    let config = AuthConfig {
        issuer: Some("https://issuer.example".to_owned()),
        ..hs_config()
    };
    let verifier = verifier(&config);
    let exp = now() + 600;
    let ok = hs256(&json!({ "sub": "a", "exp": exp, "iss": "https://issuer.example" }));
    assert!(verifier.verify(&ok).is_ok());
    let wrong = hs256(&json!({ "sub": "a", "exp": exp, "iss": "https://evil.example" }));
    assert_eq!(verifier.verify(&wrong), Err(AuthError::WrongIssuer));
    let missing = hs256(&json!({ "sub": "a", "exp": exp }));
    assert_eq!(
        verifier.verify(&missing),
        Err(AuthError::MissingClaim("iss"))
    );
}

#[test]
fn test_auth_ignores_issuer_when_not_configured() {
    let token = hs256(&json!({ "sub": "a", "exp": now() + 600, "iss": "anyone" }));
    assert!(verifier(&hs_config()).verify(&token).is_ok());
}

#[test]
fn test_auth_checks_audience_when_configured() {
    let config = AuthConfig {
        audience: Some("tandem".to_owned()),
        ..hs_config()
    };
    let verifier = verifier(&config);
    let exp = now() + 600;
    let ok = hs256(&json!({ "sub": "a", "exp": exp, "aud": "tandem" }));
    assert!(verifier.verify(&ok).is_ok());
    let ok_in_list = hs256(&json!({ "sub": "a", "exp": exp, "aud": ["other", "tandem"] }));
    assert!(verifier.verify(&ok_in_list).is_ok());
    let wrong = hs256(&json!({ "sub": "a", "exp": exp, "aud": "other" }));
    assert_eq!(verifier.verify(&wrong), Err(AuthError::WrongAudience));
    let wrong_list = hs256(&json!({ "sub": "a", "exp": exp, "aud": ["x", "y"] }));
    assert_eq!(verifier.verify(&wrong_list), Err(AuthError::WrongAudience));
    let missing = hs256(&json!({ "sub": "a", "exp": exp }));
    assert_eq!(
        verifier.verify(&missing),
        Err(AuthError::MissingClaim("aud"))
    );
}

#[test]
fn test_auth_accepts_audience_when_not_configured() {
    let verifier = verifier(&hs_config());
    let exp = now() + 600;
    for aud in [json!("somebody"), json!(["a", "b"])] {
        let token = hs256(&json!({ "sub": "a", "exp": exp, "aud": aud }));
        assert!(verifier.verify(&token).is_ok());
    }
}

#[test]
fn test_auth_rejects_missing_or_invalid_sub() {
    let verifier = verifier(&hs_config());
    let exp = now() + 600;
    let missing = hs256(&json!({ "exp": exp }));
    assert_eq!(
        verifier.verify(&missing),
        Err(AuthError::MissingClaim("sub"))
    );
    let null = hs256(&json!({ "sub": null, "exp": exp }));
    assert_eq!(verifier.verify(&null), Err(AuthError::MissingClaim("sub")));
    for sub in [
        json!(""),
        json!("x".repeat(MAX_SUBJECT_BYTES + 1)),
        json!("ali\u{0}ce"),
        json!("alice\n"),
        json!("\u{7f}"),
        json!("a\u{85}b"),
    ] {
        let token = hs256(&json!({ "sub": sub, "exp": exp }));
        assert_eq!(verifier.verify(&token), Err(AuthError::InvalidSubject));
    }
    for sub in [json!(42), json!(["alice"]), json!({ "id": "alice" })] {
        let token = hs256(&json!({ "sub": sub, "exp": exp }));
        assert!(verifier.verify(&token).is_err(), "{sub}");
    }
}

#[test]
fn test_auth_accepts_sub_of_max_length_and_unicode() {
    let verifier = verifier(&hs_config());
    let exp = now() + 600;
    for sub in ["x".repeat(MAX_SUBJECT_BYTES), "zoë@example.com".to_owned()] {
        let token = hs256(&json!({ "sub": sub, "exp": exp }));
        assert_eq!(verifier.verify(&token).unwrap().sub, sub);
    }
}

#[test]
fn test_auth_accepts_fractional_exp() {
    let exp = now() + 600;
    let token = hs256(&json!({ "sub": "alice", "exp": exp as f64 + 0.25 }));
    assert_eq!(
        verifier(&hs_config()).verify(&token).unwrap().expires_at,
        exp
    );
}

#[test]
fn test_auth_rejects_garbage_tokens_as_malformed() {
    let verifier = verifier(&hs_config());
    let good = hs256(&claims());
    let mut parts = good.split('.');
    let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());
    let oversized = format!("{header}.{}.sig", "A".repeat(MAX_TOKEN_BYTES));
    let garbage = [
        "".to_owned(),
        "abc".to_owned(),
        "a.b.c".to_owned(),
        "a.b".to_owned(),
        "..".to_owned(),
        "a.b.c.d".to_owned(),
        "é.é.é".to_owned(),
        "eyJhbGciOiJIUzI1NiJ9".to_owned(),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.sig.extra"),
        format!("{header}=.{payload}.sig"),
        format!("{header}.{payload}.not*base64"),
        format!("{}.{payload}.sig", b64url(b"not json")),
        format!("{}.{payload}.sig", b64url(b"[\"HS256\"]")),
        format!("{}.{payload}.sig", b64url(b"{\"alg\":5}")),
        format!("{}.{payload}.sig", b64url(b"{\"typ\":\"JWT\"}")),
        format!(
            "{}.{payload}.sig",
            b64url(b"{\"alg\":\"HS256\",\"alg\":\"none\"}")
        ),
        oversized,
    ];
    for token in garbage {
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::Malformed),
            "{token}"
        );
    }
    // The signature is checked before the payload is even decoded.
    assert_eq!(
        verifier.verify(&format!("{header}.!!!.sig")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn test_auth_rejects_signed_non_json_payload_as_malformed() {
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64url(b"not json");
    let message = format!("{header}.{payload}");
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .unwrap();
    assert_eq!(
        verifier(&hs_config()).verify(&format!("{message}.{sig}")),
        Err(AuthError::Malformed)
    );
}

#[test]
fn test_auth_base64url_decoder_is_strict() {
    for len in 0..20 {
        let bytes = (0..len).map(|i| (i * 37 + 11) as u8).collect::<Vec<_>>();
        assert_eq!(base64url_decode(&b64url(&bytes)), Some(bytes));
    }
    assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
    assert_eq!(base64url_decode("AA"), Some(vec![0]));
    // Padding, whitespace, the standard alphabet, a lone sextet, and non-zero trailing
    // bits ("AB", "AAB") are all refused.
    for bad in ["A", "AA==", "A B", "AB+/", "AA/", "AB", "AAB", "é"] {
        assert_eq!(base64url_decode(bad), None, "{bad}");
    }
}
