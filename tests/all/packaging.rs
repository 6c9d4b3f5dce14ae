//! The systemd units in `packaging/`, as `systemd-analyze verify` reads them: the site's leaf
//! node and a provider's node (the template, instantiated). Their programs are pointed at the
//! ones these tests run (`grid`, nats-server), since verify checks that each is executable.

use std::process::Command;

#[test]
fn the_packaged_units_pass_systemd_analyze_verify() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let nats_server = grid_client::find_nats_server().expect("nats-server (cargo xtask setup)");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (file, instance) in [
        ("grid-leaf.service", "grid-leaf.service"),
        ("grid-node@.service", "grid-node@lab-3.service"),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            text.contains("/usr/local/bin/"),
            "{file} runs installed programs"
        );
        let text = text
            .replace(
                "/usr/local/bin/nats-server",
                &nats_server.display().to_string(),
            )
            .replace(
                "/usr/local/bin/grid ",
                &format!("{} ", env!("CARGO_BIN_EXE_grid")),
            );
        let path = dir.path().join(instance);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian's systemd package) checks the units");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // A misspelt key is only a warning to verify: none is allowed.
    for unit in ["grid-leaf.service", "grid-node@lab-3.service"] {
        assert!(!said.contains(unit), "systemd-analyze verify warns: {said}");
    }
}
