//! The Python package's tests (`python/`): pytest against a real local grid that its fixtures
//! start with `grid up`, and the example notebook (`examples/notebook/sweep.ipynb`) run
//! headless in a real IPython kernel. What they need is installed into Grid's venv, and the
//! package itself with `pip install ./python`, as a user installs it.

use crate::{root, setup, target_dir};
use anyhow::{Context, Result, bail};
use std::process::Command;

/// What the tests import, by the module name each installs.
const NEEDED: &[(&str, &str)] = &[
    ("pytest", "pytest"),
    ("pandas", "pandas"),
    ("numpy", "numpy"),
    ("tqdm", "tqdm"),
    ("nbclient", "nbclient"),
    ("nbformat", "nbformat"),
    ("ipykernel", "ipykernel"),
    ("matplotlib", "matplotlib"),
];

pub fn test() -> Result<()> {
    let python = setup::ensure_python_modules(NEEDED, "for the Python package's tests")?;
    let pip = python.with_file_name("pip");
    let package = root().join("python");
    let status = Command::new(&pip)
        .args(["install", "--quiet", "--no-deps", "--force-reinstall"])
        .arg(&package)
        .status()?;
    if !status.success() {
        bail!("`pip install {}` failed", package.display());
    }
    let grid = target_dir().join("debug/grid");
    if !grid.is_file() {
        bail!("{} is missing: `cargo test` builds it", grid.display());
    }
    let status = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(package.join("tests"))
        .env("GRID_BIN", &grid)
        .current_dir(&package)
        .status()
        .context("running pytest")?;
    if !status.success() {
        bail!("the Python package's tests failed");
    }
    Ok(())
}
