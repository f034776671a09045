//! `ringtrain privacy` as a user calls it: JSON shape, agreement between the two
//! subcommands, and clear errors for bad parameters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn epsilon_reports_both_accountants_and_noise_inverts_it() {
    let base = [
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "1.1",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
    ];
    let mut rdp_args = base.to_vec();
    rdp_args.extend(["--accountant", "rdp"]);
    let (ok, rdp, stderr) = run_json(&rdp_args);
    assert!(ok, "{stderr}");
    assert_eq!(rdp["accountant"], "rdp");
    assert!(rdp["optimal_order"].as_f64().unwrap() > 1.0);
    let (ok, pld, stderr) = run_json(&base);
    assert!(ok, "{stderr}");
    assert_eq!(
        pld["accountant"], "pld",
        "the tight accountant is the default"
    );
    let (e_rdp, e_pld) = (
        rdp["epsilon"].as_f64().unwrap(),
        pld["epsilon"].as_f64().unwrap(),
    );
    assert!(
        e_pld > 0.0 && e_pld <= e_rdp,
        "pld {e_pld} should not exceed rdp {e_rdp}"
    );

    // Calibrating for the PLD epsilon gives back (about) the same sigma.
    let target = format!("{e_pld}");
    let (ok, noise, stderr) = run_json(&[
        "privacy",
        "noise",
        "--target-epsilon",
        &target,
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
    ]);
    assert!(ok, "{stderr}");
    let sigma = noise["noise_multiplier"].as_f64().unwrap();
    assert!((sigma - 1.1).abs() < 0.01, "sigma {sigma}");
    assert!(noise["epsilon"].as_f64().unwrap() <= e_pld + 1e-9);
}

#[test]
fn bad_parameters_are_clear_errors() {
    for (flag, value, needle) in [
        ("--sample-rate", "1.5", "sample rate"),
        ("--noise-multiplier", "0", "noise multiplier"),
        ("--delta", "1", "delta"),
        ("--steps", "0", "steps"),
    ] {
        let mut args = vec![
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1.1",
            "--sample-rate",
            "0.01",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ];
        let i = args.iter().position(|a| *a == flag).unwrap();
        args[i + 1] = value;
        let (ok, v, stderr) = run_json(&args);
        assert!(!ok, "{flag} {value} was accepted: {v}");
        assert!(stderr.to_lowercase().contains(needle), "{flag}: {stderr}");
    }
}
