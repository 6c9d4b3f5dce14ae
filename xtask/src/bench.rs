//! `cargo xtask bench [sandbox]`: builds the benchmark's inputs, then runs it in release mode.

use crate::{build_guests, cargo, setup};
use anyhow::{Result, bail};

pub fn run(which: Option<&str>) -> Result<()> {
    match which.unwrap_or("sandbox") {
        "sandbox" => {
            setup::run()?;
            build_guests()?;
            // The native build of the example, with the same profile as the guest.
            cargo(&[
                "build",
                "--locked",
                "--profile",
                "guest",
                "-p",
                "synth-data",
            ])?;
            cargo(&["bench", "--locked", "-p", "grid-node", "--bench", "sandbox"])
        }
        other => bail!("unknown benchmark `{other}`; try `cargo xtask bench sandbox`"),
    }
}
