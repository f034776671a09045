//! Cross-module tests: public API behaviour, monotonicity properties, published
//! settings. Timing is measured in BENCHMARKS.md, not in tests.

use super::*;
use serde::de::IntoDeserializer;
use serde::Deserialize;
use std::str::FromStr;

const KINDS: [AccountantKind; 2] = [AccountantKind::Rdp, AccountantKind::Pld];

fn eps(sigma: f64, q: f64, steps: u64, delta: f64, kind: AccountantKind) -> f64 {
    let l = Ledger::single(sigma, q, steps).unwrap();
    epsilon(&l, delta, kind).unwrap().epsilon
}

#[test]
fn monotone_in_steps_and_sample_rate() {
    for kind in KINDS {
        for &sigma in &[0.8, 1.5] {
            let mut prev_t = 0.0;
            for &t in &[1u64, 10, 100, 1000] {
                let e = eps(sigma, 0.02, t, 1e-5, kind);
                assert!(
                    e > prev_t,
                    "{kind}: ε not increasing in T at σ={sigma} T={t}"
                );
                prev_t = e;
            }
            let mut prev_q = 0.0;
            for &q in &[0.001, 0.01, 0.05, 0.2, 1.0] {
                let e = eps(sigma, q, 100, 1e-5, kind);
                assert!(
                    e > prev_q,
                    "{kind}: ε not increasing in q at σ={sigma} q={q}"
                );
                prev_q = e;
            }
        }
    }
}

#[test]
fn monotone_in_noise_and_delta() {
    // A small deterministic pseudo-random walk over (q, T) pairs (xorshift).
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    for _ in 0..4 {
        let q = 10f64.powf(-3.0 + 2.5 * next());
        let t = 1 + (10f64.powf(3.0 * next())) as u64;
        for kind in KINDS {
            let mut prev = f64::INFINITY;
            for &sigma in &[0.6, 0.9, 1.3, 2.0, 4.0] {
                let e = eps(sigma, q, t, 1e-5, kind);
                assert!(
                    e < prev || e == 0.0,
                    "{kind}: ε not decreasing in σ (q={q} T={t} σ={sigma})"
                );
                prev = e;
            }
            let mut prev = f64::INFINITY;
            for &d in &[1e-10, 1e-7, 1e-5, 1e-3, 0.1] {
                let e = eps(1.0, q, t, d, kind);
                assert!(
                    e < prev || e == 0.0,
                    "{kind}: ε not decreasing in δ (q={q} T={t} δ={d})"
                );
                prev = e;
            }
        }
    }
}

#[test]
fn tight_is_below_rdp_and_close_to_dp_accounting() {
    // Reference values computed with dp-accounting 0.6 (PLDAccountant with
    // value_discretization_interval = 1e-4; RdpAccountant with its default
    // orders), run offline; see docs/privacy.md. Both PLD implementations are
    // pessimistic with errors of a few 1e-3, so we allow 0.02.
    let q = 256.0 / 60000.0;
    let cases = [
        // (σ, steps, dp-accounting RDP, dp-accounting PLD)
        (1.1, 14063u64, 2.596655529521983, 2.381778812581751),
        (1.3, 3516, 0.9545639531461374, 0.8645889419787726),
        (0.7, 10547, 6.31974800597639, 5.63971643638149),
    ];
    for (sigma, steps, rdp_ref, pld_ref) in cases {
        let r = eps(sigma, q, steps, 1e-5, AccountantKind::Rdp);
        let p = eps(sigma, q, steps, 1e-5, AccountantKind::Pld);
        // dp-accounting sums absolute values at fractional orders (an upper
        // bound); our exact series can only be lower, and only slightly.
        assert!(
            r <= rdp_ref + 1e-9 && r > rdp_ref - 0.01,
            "rdp σ={sigma}: {r} vs {rdp_ref}"
        );
        assert!(
            (p - pld_ref).abs() < 0.02,
            "pld σ={sigma}: {p} vs {pld_ref}"
        );
        assert!(p < r);
    }
}

#[test]
fn heterogeneous_ledger_is_order_free_and_split_invariant() {
    let a = Segment::new(1.1, 0.01, 300).unwrap();
    let b = Segment::new(2.0, 0.05, 200).unwrap();
    let mut ab = Ledger::new();
    ab.push(a).unwrap();
    ab.push(b).unwrap();
    let mut ba = Ledger::new();
    ba.push(b).unwrap();
    ba.push(a).unwrap();
    // The same run recorded per step (as after many small pushes / resumes).
    let mut split = Ledger::new();
    for _ in 0..3 {
        split.push(Segment::new(1.1, 0.01, 100).unwrap()).unwrap();
    }
    split.push(b).unwrap();
    assert_eq!(split, ab, "push must merge adjacent equal (σ, q)");
    for kind in KINDS {
        let e1 = epsilon(&ab, 1e-5, kind).unwrap().epsilon;
        let e2 = epsilon(&ba, 1e-5, kind).unwrap().epsilon;
        assert!((e1 - e2).abs() < 1e-9, "{kind}: {e1} vs {e2}");
        // Composition of both is worse than either alone.
        let ea = epsilon(&Ledger::single(1.1, 0.01, 300).unwrap(), 1e-5, kind)
            .unwrap()
            .epsilon;
        assert!(e1 > ea);
    }
}

#[test]
fn reports_order_and_boundary_flag() {
    let r = epsilon(
        &Ledger::single(1.1, 0.01, 1000).unwrap(),
        1e-5,
        AccountantKind::Rdp,
    )
    .unwrap();
    assert!(r.optimal_order.is_some());
    assert!(!r.optimal_order_at_boundary);
    assert!(r.error_bound.is_none());
    // Huge noise, tiny rate: the best order is the largest one (1024).
    let r = epsilon(
        &Ledger::single(50.0, 1e-4, 10).unwrap(),
        1e-5,
        AccountantKind::Rdp,
    )
    .unwrap();
    assert_eq!(r.optimal_order, Some(1024.0));
    assert!(r.optimal_order_at_boundary);
    let p = epsilon(
        &Ledger::single(1.1, 0.01, 1000).unwrap(),
        1e-5,
        AccountantKind::Pld,
    )
    .unwrap();
    assert!(p.error_bound.is_some_and(|e| e > 0.0 && e < 0.01));
}

#[test]
fn empty_ledger_is_zero() {
    for kind in KINDS {
        assert_eq!(epsilon(&Ledger::new(), 1e-5, kind).unwrap().epsilon, 0.0);
    }
}

#[test]
fn bad_parameters_are_typed_errors_with_clear_messages() {
    let l = Ledger::single(1.0, 0.1, 10).unwrap();
    for d in [0.0, 1.0, -1e-5, f64::NAN] {
        assert!(matches!(
            epsilon(&l, d, AccountantKind::Rdp),
            Err(PrivacyError::Delta(_))
        ));
    }
    for q in [0.0, 1.5, -0.1, f64::NAN] {
        assert!(matches!(
            Segment::new(1.0, q, 10),
            Err(PrivacyError::SampleRate(_))
        ));
    }
    for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            Segment::new(s, 0.1, 10),
            Err(PrivacyError::NoiseMultiplier(_))
        ));
    }
    assert_eq!(Segment::new(1.0, 0.1, 0), Err(PrivacyError::ZeroSteps));
    // A ledger deserialised from a checkpoint bypasses `push`: still checked.
    let bad = Ledger {
        segments: vec![Segment {
            noise_multiplier: 1.0,
            sample_rate: 1.5,
            steps: 3,
        }],
    };
    let err = epsilon(&bad, 1e-5, AccountantKind::Pld).unwrap_err();
    assert_eq!(
        err.to_string(),
        "sample rate 1.5 is outside (0, 1]: pass --sample-rate as batch_size / dataset_size"
    );
    let all = [
        PrivacyError::SampleRate(f64::NAN),
        PrivacyError::NoiseMultiplier(-1.0),
        PrivacyError::Delta(2.0),
        PrivacyError::ZeroSteps,
        PrivacyError::TargetEpsilon(0.0),
        PrivacyError::UnknownAccountant("gdp".into()),
        PrivacyError::Unreachable {
            target: 1e-4,
            max_noise: 1e5,
            best: 0.1,
        },
    ];
    for e in all {
        let m = e.to_string();
        assert!(m.chars().next().is_some_and(|c| c.is_lowercase()), "{m}");
        assert!(!m.ends_with('.'), "{m}");
    }
    assert!(PrivacyError::NoiseMultiplier(-1.0)
        .to_string()
        .contains("noise multiplier -1"));
    assert!(PrivacyError::Delta(2.0).to_string().contains("(0, 1)"));
}

#[test]
fn accountant_kind_parses_and_deserializes_lowercase() {
    assert_eq!(AccountantKind::from_str("rdp"), Ok(AccountantKind::Rdp));
    assert_eq!(AccountantKind::from_str("PLD"), Ok(AccountantKind::Pld));
    assert!(AccountantKind::from_str("gdp").is_err());
    assert_eq!(AccountantKind::Pld.to_string(), "pld");
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        "pld".into_deserializer();
    assert_eq!(AccountantKind::deserialize(de), Ok(AccountantKind::Pld));
}

#[test]
fn a_ledger_round_trips_through_json_and_accounts_the_same() {
    // The ledger goes into checkpoints as JSON: a resumed job must account identically.
    let mut l = Ledger::new();
    l.push(Segment::new(1.1, 0.01, 500).unwrap()).unwrap();
    l.push(Segment::new(0.9, 0.02, 250).unwrap()).unwrap();
    let text = serde_json::to_string(&l).unwrap();
    let back: Ledger = serde_json::from_str(&text).unwrap();
    assert_eq!(back, l);
    let a = epsilon(&l, 1e-5, AccountantKind::Rdp).unwrap().epsilon;
    let b = epsilon(&back, 1e-5, AccountantKind::Rdp).unwrap().epsilon;
    assert_eq!(a.to_bits(), b.to_bits());
}

/// A checkpoint's ledger goes through JSON (meta.json) and must come back bit for bit:
/// a σ one ulp off would start a new segment on resume and move ε. 1.2141452107861361
/// is a value serde_json's default fast float parser reads one ulp low.
#[test]
fn a_ledger_reads_back_from_json_bit_for_bit() {
    let mut l = Ledger::new();
    for (sigma, q) in [
        (1.2141452107861361, 0.01),
        (1.3571427762508392, 0.032),
        (0.1 + 0.2, 1.0 / 3.0),
    ] {
        l.push(Segment::new(sigma, q, 7).unwrap()).unwrap();
    }
    let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
    assert_eq!(back.segments.len(), l.segments.len());
    for (a, b) in back.segments.iter().zip(&l.segments) {
        assert_eq!(a.noise_multiplier.to_bits(), b.noise_multiplier.to_bits());
        assert_eq!(a.sample_rate.to_bits(), b.sample_rate.to_bits());
        assert_eq!(a.steps, b.steps);
    }
}
