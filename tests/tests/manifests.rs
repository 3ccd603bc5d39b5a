//! The manifests keep their promises (issue 15, part 6):
//!
//! - every dependency from a registry has a real version requirement
//!   (`MAJOR.MINOR.PATCH`, as in Cargo.lock when it was written): no `*`,
//!   no bare major (`"1"`, `"0.4"`), in the workspace and in `fuzz/`;
//! - every workspace member declares the workspace `rust-version`, and no
//!   package in the build (Linux host, Cargo.lock as it is) needs a newer Rust.
//!
//! What our own code needs is checked by clippy's `incompatible_msrv` lint,
//! which `rust-version` turns on for every crate (`cargo clippy` in CI).
//! `scripts/check-msrv.sh` runs just this test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn metadata(manifest: &Path, extra: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(manifest)
        .args(extra)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata JSON")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("?")
}

fn packages(meta: &Value) -> &Vec<Value> {
    meta["packages"].as_array().expect("packages")
}

/// `1.89` / `1.89.0` → (1, 89, 0).
fn version(s: &str) -> (u64, u64, u64) {
    let mut it = s
        .split('.')
        .map(|p| p.parse::<u64>().expect("numeric version"));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// A requirement pinned to a full version: `^1.2.3`, `=1.2.3`, `~1.2.3`.
fn pinned(req: &str) -> bool {
    let v = req.trim_start_matches(['^', '=', '~']);
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn registry_dependencies_have_full_versions() {
    let root = workspace_root();
    let mut bad = Vec::new();
    for manifest in [root.join("Cargo.toml"), root.join("fuzz/Cargo.toml")] {
        let meta = metadata(&manifest, &["--no-deps"]);
        for p in packages(&meta) {
            for d in p["dependencies"].as_array().expect("dependencies") {
                if d.get("path").is_some_and(|v| !v.is_null()) {
                    continue; // a path dependency: no registry version to pin
                }
                let req = d["req"].as_str().unwrap_or("");
                if !pinned(req) {
                    bad.push(format!(
                        "{}: {} = {req:?}",
                        str_of(p, "name"),
                        str_of(d, "name")
                    ));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "dependencies without a MAJOR.MINOR.PATCH requirement (use the Cargo.lock version):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn no_dependency_needs_a_newer_rust_than_declared() {
    let root = workspace_root();
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV")
            .stdout,
    )
    .expect("utf-8");
    let host = host
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("host triple")
        .to_string();
    let meta = metadata(
        &root.join("Cargo.toml"),
        &["--locked", "--filter-platform", &host],
    );
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let resolved: Vec<&str> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let declared = packages(&meta)
        .iter()
        .find(|p| p["name"] == "qcow2")
        .and_then(|p| p["rust_version"].as_str())
        .expect("qcow2 declares the workspace rust-version");
    let mut bad = Vec::new();
    for p in packages(&meta) {
        let id = p["id"].as_str().unwrap_or("");
        let rv = p["rust_version"].as_str();
        if members.contains(&id) {
            if rv != Some(declared) {
                bad.push(format!(
                    "{} declares rust-version {rv:?}, not the workspace's {declared} \
                     (add rust-version.workspace = true)",
                    str_of(p, "name")
                ));
            }
        } else if resolved.contains(&id) {
            if let Some(rv) = rv {
                if version(rv) > version(declared) {
                    bad.push(format!(
                        "{} {} needs Rust {rv}; the workspace declares {declared}",
                        str_of(p, "name"),
                        str_of(p, "version")
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "\n  {}", bad.join("\n  "));
}

#[test]
fn pinned_requirements() {
    assert!(pinned("^0.18.1") && pinned("=1.2.3") && pinned("^0.4.35"));
    assert!(!pinned("*") && !pinned("^1") && !pinned("^0.4") && !pinned(">=1.2.3, <2"));
    assert_eq!(version("1.89"), (1, 89, 0));
    assert!(version("1.89.0") > version("1.85"));
}
