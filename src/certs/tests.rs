use chrono::{DateTime, TimeDelta, Utc};

use super::*;

fn names() -> Vec<String> {
    vec![
        "tailnode-webhook.tailnode-system.svc".to_string(),
        "tailnode-webhook.tailnode-system.svc.cluster.local".to_string(),
    ]
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_780_000_000, 0).unwrap()
}

fn days(n: i64) -> TimeDelta {
    TimeDelta::days(n)
}

fn stored_from(material: &ServingMaterial, ca_key_pem: Option<&str>) -> Stored {
    Stored {
        cert_pem: Some(material.cert_pem.clone()),
        key_pem: Some(material.key_pem.clone()),
        ca_pem: Some(material.ca_pem.clone()),
        ca_key_pem: ca_key_pem.map(str::to_string),
    }
}

fn issued(plan: Plan) -> Issued {
    match plan {
        Plan::Issue(issued) => *issued,
        Plan::Keep(_) => panic!("expected new material, got Keep"),
    }
}

fn pem_count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

#[test]
fn serving_certificate_verifies_against_its_ca_for_every_name_through_its_validity() {
    let ca = generate_ca(now()).unwrap();
    let cert = issue_serving(&ca, &names(), now()).unwrap();
    assert_eq!(cert.not_after, now() + SERVING_VALIDITY);
    let check = |names: &[String], at: DateTime<Utc>, ca_pem: &str| {
        verify_serving(&cert.cert_pem, &cert.key_pem, ca_pem, names, &[at])
    };
    check(&names(), now(), &ca.cert_pem).unwrap();
    check(&names(), now() - TimeDelta::minutes(4), &ca.cert_pem).unwrap();
    check(&names(), cert.not_after, &ca.cert_pem).unwrap();
    assert!(matches!(
        check(&names(), cert.not_after + TimeDelta::seconds(1), &ca.cert_pem),
        Err(CertError::Verify { .. })
    ));
    assert!(check(&names(), now() - TimeDelta::minutes(6), &ca.cert_pem).is_err());
    assert!(check(&["other.svc".to_string()], now(), &ca.cert_pem).is_err());
    let other = generate_ca(now()).unwrap();
    assert!(check(&names(), now(), &other.cert_pem).is_err(), "another CA");
    // Key and certificate must belong together.
    let second = issue_serving(&ca, &names(), now()).unwrap();
    assert!(matches!(
        verify_serving(&cert.cert_pem, &second.key_pem, &ca.cert_pem, &names(), &[now()]),
        Err(CertError::LoadCert { .. })
    ));
}

#[test]
fn ip_addresses_become_ip_sans() {
    let ca = generate_ca(now()).unwrap();
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let cert = issue_serving(&ca, &names, now()).unwrap();
    verify_serving(&cert.cert_pem, &cert.key_pem, &ca.cert_pem, &names, &[now()]).unwrap();
}

#[test]
fn issuing_refuses_what_nobody_could_verify() {
    let ca = generate_ca(now()).unwrap();
    assert!(matches!(issue_serving(&ca, &[], now()), Err(CertError::NoDnsNames)));
    // The CA expires before a new serving certificate would.
    let old_ca = generate_ca(now() - CA_VALIDITY + days(100)).unwrap();
    assert!(matches!(
        issue_serving(&old_ca, &names(), now()),
        Err(CertError::CaExpiresTooSoon { .. })
    ));
    assert_eq!(not_after_from_pem(&old_ca.cert_pem).unwrap(), now() + days(100));
    // A CA key that does not belong to the CA certificate.
    let other = generate_ca(now()).unwrap();
    let mixed = CaBundle {
        cert_pem: ca.cert_pem.clone(),
        key_pem: other.key_pem.clone(),
    };
    assert!(issue_serving(&mixed, &names(), now()).is_err());
    let garbage = CaBundle {
        cert_pem: ca.cert_pem.clone(),
        key_pem: "garbage".into(),
    };
    assert!(matches!(
        issue_serving(&garbage, &names(), now()),
        Err(CertError::LoadCaKey { .. })
    ));
    // Times a certificate cannot express.
    let far = DateTime::from_timestamp(253_402_000_000, 0).unwrap();
    assert!(matches!(generate_ca(far), Err(CertError::TimeOutOfRange { .. })));
}

#[test]
fn rotation_is_due_with_a_third_of_the_lifetime_or_thirty_days_left() {
    let at = now();
    assert!(!needs_rotation(at + SERVING_VALIDITY, at));
    assert!(!needs_rotation(at + days(122), at));
    assert!(needs_rotation(at + days(121), at));
    assert!(needs_rotation(at + days(29), at));
    assert!(needs_rotation(at, at));
    assert!(needs_rotation(at - days(1), at));
    assert!(MIN_REMAINING < SERVING_VALIDITY / 3);
}

#[test]
fn plan_creates_then_keeps_material() {
    let first = issued(plan(&Stored::default(), &names(), now()).unwrap());
    assert_eq!(first.reason, IssueReason::Missing);
    assert!(first.new_ca);
    assert_eq!(pem_count(&first.material.ca_pem), 1);
    let stored = stored_from(&first.material, Some(&first.ca_key_pem));
    assert_eq!(
        plan(&stored, &names(), now()).unwrap(),
        Plan::Keep(first.material.clone())
    );
    // Still kept eight months later; then renewed with the same CA.
    assert!(matches!(
        plan(&stored, &names(), now() + days(240)).unwrap(),
        Plan::Keep(_)
    ));
    let renewed = issued(plan(&stored, &names(), now() + days(250)).unwrap());
    assert_eq!(renewed.reason, IssueReason::Expiring);
    assert!(!renewed.new_ca);
    assert_eq!(renewed.material.ca_pem, first.material.ca_pem);
    assert_eq!(renewed.ca_key_pem, first.ca_key_pem);
    assert_ne!(renewed.material.cert_pem, first.material.cert_pem);
    assert_eq!(renewed.material.not_after, now() + days(250) + SERVING_VALIDITY);
}

#[test]
fn plan_reissues_with_the_same_ca_when_the_serving_certificate_is_unusable() {
    let first = issued(plan(&Stored::default(), &names(), now()).unwrap());
    let good = stored_from(&first.material, Some(&first.ca_key_pem));
    let other = issue_serving(&generate_ca(now()).unwrap(), &names(), now()).unwrap();
    let variants = [
        Stored {
            cert_pem: Some("garbage".into()),
            ..good.clone()
        },
        Stored {
            key_pem: None,
            ..good.clone()
        },
        // A serving certificate from another CA.
        Stored {
            cert_pem: Some(other.cert_pem.clone()),
            key_pem: Some(other.key_pem.clone()),
            ..good.clone()
        },
    ];
    for stored in variants {
        let next = issued(plan(&stored, &names(), now()).unwrap());
        assert_eq!(next.reason, IssueReason::Missing, "{stored:?}");
        assert!(!next.new_ca, "{stored:?}");
        assert_eq!(next.material.ca_pem, first.material.ca_pem);
    }
    // New names: the old certificate does not cover them.
    let more: Vec<String> = names().into_iter().chain(["extra.svc".to_string()]).collect();
    let next = issued(plan(&good, &more, now()).unwrap());
    assert!(!next.new_ca);
    verify_serving(
        &next.material.cert_pem,
        &next.material.key_pem,
        &next.material.ca_pem,
        &more,
        &[now()],
    )
    .unwrap();
}

#[test]
fn plan_starts_a_new_ca_without_a_usable_one_and_keeps_the_old_one_trusted_meanwhile() {
    let first = issued(plan(&Stored::default(), &names(), now()).unwrap());
    // No CA key: keep while usable, new CA when due.
    let no_key = stored_from(&first.material, None);
    assert!(matches!(plan(&no_key, &names(), now()).unwrap(), Plan::Keep(_)));
    let later = now() + days(300);
    let next = issued(plan(&no_key, &names(), later).unwrap());
    assert!(next.new_ca);
    assert_eq!(
        pem_count(&next.material.ca_pem),
        2,
        "new CA first, then the previous one"
    );
    assert!(!next.material.ca_pem.starts_with(first.material.ca_pem.trim_end()));
    assert!(
        next.material
            .ca_pem
            .ends_with(&format!("{}\n", first.material.ca_pem.trim_end()))
    );
    // Both the old and the new serving certificate verify against the published bundle.
    let bundle = &next.material.ca_pem;
    verify_serving(
        &first.material.cert_pem,
        &first.material.key_pem,
        bundle,
        &names(),
        &[later],
    )
    .unwrap();
    verify_serving(
        &next.material.cert_pem,
        &next.material.key_pem,
        bundle,
        &names(),
        &[later],
    )
    .unwrap();
    // The new material is kept, and its next renewal reuses the new CA and bundle.
    let stored = stored_from(&next.material, Some(&next.ca_key_pem));
    assert!(matches!(plan(&stored, &names(), later).unwrap(), Plan::Keep(_)));
    let renewed = issued(plan(&stored, &names(), later + days(300)).unwrap());
    assert!(!renewed.new_ca);
    assert_eq!(&renewed.material.ca_pem, bundle);

    // An expired old certificate: its CA is not carried over.
    let expired = issued(plan(&no_key, &names(), now() + days(400)).unwrap());
    assert!(expired.new_ca);
    assert_eq!(pem_count(&expired.material.ca_pem), 1);
}

#[test]
fn plan_starts_a_new_ca_when_the_old_one_expires_too_soon() {
    let start = now() - CA_VALIDITY + days(200);
    let first = issued(plan(&Stored::default(), &names(), start).unwrap());
    let stored = stored_from(&first.material, Some(&first.ca_key_pem));
    let next = issued(plan(&stored, &names(), now()).unwrap());
    assert!(
        next.new_ca,
        "the CA has 200 days left, less than a serving certificate's lifetime"
    );
}

#[test]
fn debug_output_never_contains_keys() {
    let first = issued(plan(&Stored::default(), &names(), now()).unwrap());
    let ca = CaBundle {
        cert_pem: first.material.ca_pem.clone(),
        key_pem: first.ca_key_pem.clone(),
    };
    let stored = stored_from(&first.material, Some(&first.ca_key_pem));
    for text in [
        format!("{first:?}"),
        format!("{:?}", first.material),
        format!("{ca:?}"),
        format!("{stored:?}"),
        format!("{:?}", Plan::Keep(first.material.clone())),
    ] {
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(text.contains("BEGIN CERTIFICATE"), "{text}");
    }
}

#[test]
fn plan_needs_names() {
    assert!(matches!(
        plan(&Stored::default(), &[], now()),
        Err(CertError::NoDnsNames)
    ));
}
