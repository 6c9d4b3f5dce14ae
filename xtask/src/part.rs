//! A process of a test grid (nats-server, the broker, a node) that can be killed and started
//! again the same way, its output appended to a log. `cargo xtask chaos` kills and restarts
//! them; `cargo xtask netgrid` runs them inside network namespaces.

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Part {
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Part {
    /// Starts `cmd` (program and arguments) with `env` added, output to `log`.
    pub fn new(cmd: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Result<Self> {
        let mut part = Self {
            cmd,
            env,
            log,
            child: None,
        };
        part.start()?;
        Ok(part)
    }

    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut command = Command::new(&self.cmd[0]);
        command
            .args(&self.cmd[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Killed with xtask, whatever ends it: no grid outlives the run that made it.
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.cmd.join(" ")))?;
        self.child = Some(child);
        Ok(())
    }

    /// The running process's id (what `/proc` knows it by).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> &std::path::Path {
        &self.log
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        self.kill();
    }
}
