//! The `TS_HOSTNAME` value, bounded to one DNS label (63 characters).
//!
//! The kubelet expands `$(POD_NAME)` and `$(TS_POD_INDEX)` when the container starts, so the engine
//! cannot cut the final string. It bounds it instead, case by case:
//! - The pod has a fixed name at admission (`metadata.name`): the final hostname is computed here
//!   (no `$(POD_NAME)`) and [`bound_label`]ed.
//! - Only `generateName` is known: the apiserver cuts the base to 58 characters and adds 5 random
//!   ones (`names.SimpleNameGenerator`), so the pod name is at most `min(len, 58) + 5` long. The
//!   prefix is shortened so that `<prefix>-<pod name>` fits, or dropped when nothing fits.
//! - StatefulSet ordinals are int32 (at most 10 digits), so `<prefix>-$(TS_POD_INDEX)` fits once
//!   the prefix is at most 52 characters (the CRD caps `spec.hostname` there; a long TailscaleNode
//!   name used as the default prefix is bounded here).
//! - A template with neither name nor generateName (`tailnode inject` on a Deployment) keeps
//!   `<prefix>-$(POD_NAME)`: nothing bounds a pod name there. The webhook always sees one or the other.
//!
//! The `tailnode.dev/hostname` annotation is sanitised and bounded the same way.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

use super::WorkloadKind;
use super::sidecar::{POD_INDEX_ENV, SLOT_ENV};
use crate::api::{HOSTNAME_ANNOTATION, TailscaleNodeSpec};

/// The longest DNS label, and so the longest hostname tailnode hands to tailscale.
pub const MAX_HOSTNAME: usize = 63;
/// Hex characters of the hash that replaces a cut tail.
const HASH_LEN: usize = 6;
/// The apiserver's cap on the base of a generated name, and the random suffix it adds.
const MAX_GENERATE_BASE: usize = 58;
const GENERATED_SUFFIX: usize = 5;
/// Digits of the largest int32 StatefulSet ordinal.
const MAX_ORDINAL_DIGITS: usize = 10;

/// The `TS_HOSTNAME` of a slot pod: `<prefix>-$(TS_SLOT)`, bounded like a StatefulSet's.
pub(super) fn slot_hostname(node: &str, spec: &TailscaleNodeSpec) -> String {
    let prefix = bound_label(
        spec.hostname.as_deref().unwrap_or(node),
        MAX_HOSTNAME - 1 - MAX_ORDINAL_DIGITS,
    );
    format!("{prefix}-$({SLOT_ENV})")
}

/// The `TS_HOSTNAME` value: the pod annotation, else `<prefix>-$(TS_POD_INDEX)` for StatefulSet
/// replicas, else `[<prefix>-]<pod name>` (computed, or `$(POD_NAME)` for the kubelet to expand).
pub(super) fn hostname_for(meta: &ObjectMeta, node: &str, spec: &TailscaleNodeSpec, workload: WorkloadKind) -> String {
    if let Some(h) = meta.annotations.as_ref().and_then(|a| a.get(HOSTNAME_ANNOTATION)) {
        let bounded = bound_label(h, MAX_HOSTNAME);
        if !bounded.is_empty() {
            return bounded;
        }
    }
    let stateful = workload == WorkloadKind::StatefulSet
        || meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "StatefulSet" && o.controller == Some(true));
    if stateful {
        let prefix = spec.hostname.as_deref().unwrap_or(node);
        let prefix = bound_label(prefix, MAX_HOSTNAME - 1 - MAX_ORDINAL_DIGITS);
        return format!("{prefix}-$({POD_INDEX_ENV})");
    }
    let prefix = spec.hostname.as_deref().map(sanitize).filter(|p| !p.is_empty());
    if let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) {
        let full = match &prefix {
            Some(p) => format!("{p}-{name}"),
            None => name.to_string(),
        };
        return bound_label(&full, MAX_HOSTNAME);
    }
    let Some(prefix) = prefix else {
        return "$(POD_NAME)".to_string();
    };
    match meta.generate_name.as_deref().filter(|g| !g.is_empty()) {
        Some(generate) => {
            let name_len = generate.len().min(MAX_GENERATE_BASE) + GENERATED_SUFFIX;
            match (MAX_HOSTNAME - 1).checked_sub(name_len).filter(|room| *room > 0) {
                Some(room) => format!("{}-$(POD_NAME)", bound_label(&prefix, room)),
                None => "$(POD_NAME)".to_string(),
            }
        }
        None => format!("{prefix}-$(POD_NAME)"),
    }
}

/// Lower-case; every character outside `[a-z0-9-]` becomes `-`; no leading or trailing `-`.
fn sanitize(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    mapped.trim_matches('-').to_string()
}

/// Sanitises `s` (lower-case; anything but `[a-z0-9-]` becomes `-`; no leading or trailing `-`)
/// and fits it in `max` characters. A longer label keeps its head and ends in
/// `-` plus the first 6 hex characters of the SHA-256 of the whole sanitised label, so different
/// long names stay apart and the same name always gives the same label. Where `max` leaves no
/// room for a hash, the head alone is kept. The result may be empty only when `s` has no letter
/// or digit.
pub fn bound_label(s: &str, max: usize) -> String {
    let clean = sanitize(s);
    if clean.len() <= max {
        return clean;
    }
    // `clean` is ASCII, so byte indices are character boundaries.
    if max <= HASH_LEN + 1 {
        return clean[..max].trim_end_matches('-').to_string();
    }
    let digest = Sha256::digest(clean.as_bytes());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let head = clean[..max - HASH_LEN - 1].trim_end_matches('-');
    format!("{head}-{}", &hash[..HASH_LEN])
}
